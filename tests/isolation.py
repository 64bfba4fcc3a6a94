"""Keeping one pytest process's tests apart when several of them set up torch.distributed in-process."""

from __future__ import annotations


def reset_distributed() -> None:
    """Leave the default process group and forget DeepSpeed's cached groups, so that the next DeepSpeed
    trainer or vLLM engine in this process starts afresh. DeepSpeed caches its world and data-parallel groups
    at module level, and an in-process vLLM engine adopts (and at shutdown destroys) a group it finds: a later
    trainer would then meet a destroyed group ("Group ... is not registered")."""
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        setattr(ds_groups, name, None)
