"""What runs inside vLLM's workers: a weight-transfer backend registered with vLLM, and the worker extension
whose import registers it.

vLLM imports this module in every worker process (`LLM(worker_extension_cls=WORKER_EXTENSION)`) before it
loads the model, and then builds the configured weight-transfer engine (`weight_transfer_config={"backend":
BACKEND}`) next to the model. From there on vLLM's own session protocol applies, called on every worker
through `LLM.collective_rpc`: `init_weight_transfer_engine(init_info)` once per sync group, and per sync
`start_weight_update`, one or more `update_weights(update_info)`, `finish_weight_update`.

Why vLLM's session and not the model's `load_weights` directly: after loading, vLLM post-processes layers
(its CPU backend repacks every linear weight into a private copy; quantised layers are converted), so
`layer.weight` no longer takes a plain copy. `start_weight_update` puts every layer back into checkpoint
form (`initialize_layerwise_reload`), each layer is processed again as soon as all of its weights arrived,
and `finish_weight_update` processes what is left (`finalize_layerwise_reload`). A layer's weights may arrive
over several `update_weights` calls; what must not happen is a session per piece, which processes a layer
half-loaded from uninitialised memory.

Every update goes through `EopdWeightTransferEngine.receive_weights`, whatever carries the tensors: pickled
pairs (object-store sync, one call per chunk), buckets broadcast from student rank 0 (`receive_buckets`, over
gloo on CPU or NCCL on GPUs: only the communicator differs), CUDA IPC handles (colocated) or safetensors
files (`load_model` of the same architecture). Tied weights arrive once and are also loaded under their
aliases, because vLLM holds a tied output head as a layer of its own (on CPU: its own packed copy, processed
only when a weight is loaded into it).

Arguments cross `collective_rpc` as builtins and bytes only: with the engine core in its own process they
pass a msgpack boundary that turns tensors into untyped lists (vllm/v1/serial_utils.py).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from actors.sync.buckets import (device_uuid, metas_from_wire, open_ipc_handle, receive_buckets, unflatten,
                                 weight_group, with_aliases)
from actors.rollout.vllm_engine import BACKEND

UPDATE_KINDS = ("pairs", "buckets", "ipc", "path")


@dataclass
class EopdInitInfo(WeightTransferInitInfo):
    """The dedicated sync group: rank 0 (student rank 0) hosts it at addr:port; this engine's workers are
    ranks rank_offset + tensor-parallel rank."""

    addr: str
    port: int
    rank_offset: int
    world_size: int


@dataclass
class EopdUpdateInfo(WeightTransferUpdateInfo):
    """One `update_weights` call. kind: pairs (`pairs`: pickled [(name, numpy array)]), buckets (`metas`,
    `bucket_bytes`: received from the sync group), ipc (`metas`, `handles`: pickled {GPU uuid: handle}) or
    path (`path`: a local checkpoint directory). `aliases`: {alias: name sent} of tied weights."""

    kind: str
    aliases: dict = field(default_factory=dict)
    pairs: bytes = b""
    metas: list = field(default_factory=list)
    bucket_bytes: int = 0
    handles: bytes = b""
    path: str = ""

    def __post_init__(self):
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"update kind {self.kind!r} is invalid: allowed {', '.join(UPDATE_KINDS)}")


class EopdWeightTransferEngine(WeightTransferEngine[EopdInitInfo, EopdUpdateInfo]):
    """vLLM weight-transfer backend `eopd`: checkpoint-format weights, loaded through the layerwise reload."""

    init_info_cls = EopdInitInfo
    update_info_cls = EopdUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.comm = None

    def init_transfer_engine(self, init_info: EopdInitInfo) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = init_info.rank_offset + get_tensor_model_parallel_rank()
        self.comm = weight_group(init_info.addr, init_info.port, rank, init_info.world_size, self.device)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, info: EopdUpdateInfo) -> None:
        def load(pairs) -> None:
            self.model.load_weights(with_aliases(pairs, info.aliases))

        if info.kind == "pairs":
            load([(n, torch.from_numpy(a).to(self.device)) for n, a in pickle.loads(info.pairs)])
        elif info.kind == "buckets":
            if self.comm is None:
                raise RuntimeError("bucketed weight update before init_weight_transfer_engine")
            receive_buckets(self.comm, metas_from_wire(info.metas), info.bucket_bytes, self.device, load)
        elif info.kind == "ipc":
            handles = pickle.loads(info.handles)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            uuid = device_uuid(index)
            if uuid not in handles:
                raise RuntimeError(f"colocated weight sync: no student rank shares this engine's GPU {uuid}; "
                                   f"handles came from {sorted(handles)}")
            load(unflatten(open_ipc_handle(handles[uuid], index), metas_from_wire(info.metas)))
        else:
            from safetensors import safe_open

            for file in sorted(Path(info.path).glob("*.safetensors")):
                with safe_open(str(file), framework="pt", device=str(self.device)) as fh:
                    load([(k, fh.get_tensor(k)) for k in fh.keys()])

    def shutdown(self) -> None:
        self.comm = None


try:
    WeightTransferEngineFactory.register_engine(BACKEND, EopdWeightTransferEngine)
except ValueError:  # registered already: this module was imported before in this process
    pass


class EngineWorkerExtension:
    """Mixed into each vLLM worker (`worker_extension_cls`); importing it registers the backend above."""

    def eopd_transfer_engine(self) -> str:
        """The class of the weight-transfer engine vLLM built for this worker (checked at start-up)."""
        return type(getattr(self, "weight_transfer_engine", None)).__name__
