"""The teacher as DeepSpeed ZeRO-3 inference, for teachers that do not fit one GPU (`teacher.zero_stage=3`).

Each of the `teacher.num_workers` workers holds 1/world of every parameter, in GPU memory or, with
`teacher.offload=cpu`, in pinned host memory; a layer's parameters are gathered just before it runs and freed
after. The model is loaded under `HfDeepSpeedConfig`, so transformers builds it inside `deepspeed.zero.Init`
and copies the checkpoint into the partitions module by module: no GPU ever holds the whole teacher (rank 0
reads the whole checkpoint on the host while loading).

The workers still score different rollouts (data parallel), but ZeRO-3's gathers are collective: every worker
must make the same sequence of module calls. So `score_shards` runs on all workers at once, each with its own
share of the rollout tables, and they agree first on the number of row chunks (a worker with fewer scores
one-token stand-in chunks and drops them) and then, chunk by chunk, on the number of positions to project
through the output head (a worker with fewer pads with zero hidden states and drops their statistics).
The statistics equal the whole-model teacher's (tests/test_teacher_zero3.py).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from actors.runtime.dist import join_process_group, master_address
from actors.runtime.faults import maybe_fail
from actors.teacher.scorer import TeacherScorer, _empty_columns
from eopd_ray.stats import TokenStats
from eopd_ray.models import load_causal_lm


def zero3_inference_config(dtype: str, offload: str, persistence_threshold: int, on_cuda: bool) -> dict:
    """The DeepSpeed config of a frozen ZeRO-3 model: no optimizer, parameters partitioned (and offloaded)."""
    offload_param = {"device": offload}
    if offload == "cpu":
        offload_param["pin_memory"] = on_cuda  # pinned host pages make the per-layer copies asynchronous
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed's config checks; nothing is trained
        "zero_optimization": {"stage": 3, "offload_param": offload_param,
                              "stage3_param_persistence_threshold": persistence_threshold},
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }


def _rebuild_buffers(model: torch.nn.Module) -> None:
    """Recompute the buffers of parameter-free submodules built from the config (rotary embeddings) outside
    zero.Init. Under zero.Init every floating tensor is created in the ZeRO dtype, so a rotary table that a
    plain load computes in float32 came out rounded to bf16 (transformers 5.19 with DeepSpeed 0.19.8: 1e-4 in
    the frequencies, 1e-2 nats in the teacher's log-probs against the whole bf16 teacher)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or next(module.parameters(recurse=False), None) is not None \
                or not any(b is not None for b in module.buffers(recurse=False)):
            continue
        try:
            fresh = type(module)(config)
        except TypeError:  # another constructor: leave it as built
            continue
        for name, buf in fresh.named_buffers(recurse=False):
            module._buffers[name] = buf


class ShardedTeacherScorer(TeacherScorer):
    def __init__(self, model_path: str, top_k: int, vocab_size: int, pad_id: int, rank: int, world_size: int,
                 chunk_size: int = 1024, dtype: str = "float32", trust_remote_code: bool = False,
                 num_threads: int | None = None, max_batch: int = 64, backend: str = "gloo", offload: str = "none",
                 persistence_threshold: int = 100_000, end_swap: tuple[int, int] | None = None,
                 forward_tokens: int = 0):
        # No model yet: it is loaded into partitions by `setup`, once every rank has joined the group.
        self._configure(top_k, vocab_size, pad_id, chunk_size, max_batch, num_threads, end_swap, forward_tokens)
        self.model_path, self.dtype, self.trust_remote_code = model_path, dtype, trust_remote_code
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.offload, self.persistence_threshold = offload, persistence_threshold
        self.device = torch.device("cpu")
        self.model = self.engine = None

    def master_address(self) -> tuple[str, int]:
        return master_address()

    def setup(self, master_addr: str, master_port: int) -> bool:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.device = join_process_group(self.rank, self.world_size, master_addr, master_port, self.backend)
        ds_config = zero3_inference_config(self.dtype, self.offload, self.persistence_threshold,
                                           self.device.type == "cuda")
        # Kept alive for the model's lifetime: while it exists, from_pretrained builds models inside zero.Init.
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = load_causal_lm(self.model_path, self.dtype, self.trust_remote_code)
        # Held: the engine's destructor removes the ZeRO-3 hooks that gather each layer's parameters.
        self.engine = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)[0]
        model = self.engine.module
        _rebuild_buffers(model)
        # zero.Init places parameters; buffers (rotary tables, ...) stay wherever the constructor put them.
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.device != self.device:
                    module._buffers[name] = buf.to(self.device)
        self._attach(model)  # the output-head probe runs on every rank together
        return True

    def partition_numel(self) -> tuple[int, int]:
        """(parameter elements resident on this worker between forwards, elements of the whole model).
        A partitioned parameter holds only its partition (`ds_tensor`); one kept whole (smaller than the
        persistence threshold) holds its full data as well."""
        params = list(self.model.parameters())
        local = sum(p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in params)
        return local, sum(getattr(p, "ds_numel", p.numel()) for p in params)

    def score(self, rollout: pa.Table) -> tuple[pa.Table, dict]:
        raise RuntimeError("a ZeRO-3 teacher scores on all workers at once: call score_shards on every worker")

    @torch.no_grad()
    def score_shards(self, *rollouts: pa.Table) -> tuple:
        """Called on every worker together, each with its own (possibly empty) list of rollout tables.
        Returns (*teacher tables in the same order, [stats of each table]); `([],)` for no tables.
        Under Ray: `num_returns=len(rollouts) + 1`."""
        import torch.distributed as dist

        maybe_fail("teacher")
        t0 = time.perf_counter()
        chunks = [(i, rows, p, r) for i, rollout in enumerate(rollouts) for rows, p, r in self._row_chunks(rollout)]
        count = torch.tensor([len(chunks)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        cols = [_empty_columns() for _ in rollouts]
        stand_in = ([np.array([self.pad_id], dtype=np.int64)], [np.array([self.pad_id], dtype=np.int64)])
        seconds = [0.0] * len(rollouts)
        for c in range(int(count.item())):
            t = time.perf_counter()
            if c < len(chunks):
                i, rows, prompts, responses = chunks[c]
                self._score_chunk(prompts, responses, cols[i], rows)
                seconds[i] += time.perf_counter() - t
            else:
                self._score_chunk(*stand_in, _empty_columns(), [0])  # keeps this worker in step; result dropped
        results = [self._result(rollout, col, s) for rollout, col, s in zip(rollouts, cols, seconds)]
        for _, stats in results:
            stats["time/teacher_shards"] = time.perf_counter() - t0
        return (*[table for table, _ in results], [stats for _, stats in results])

    def _position_stats(self, hidden_NH: torch.Tensor, tokens_N: torch.Tensor) -> TokenStats:
        import torch.distributed as dist

        n = hidden_NH.shape[0]
        most = torch.tensor([n], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        pad = int(most.item()) - n  # the same number of head chunks (and so of lm_head gathers) on every rank
        if pad:
            hidden_NH = torch.cat([hidden_NH, hidden_NH.new_zeros(pad, hidden_NH.shape[1])])
            tokens_N = torch.cat([tokens_N, tokens_N.new_zeros(pad)])
        return super()._position_stats(hidden_NH, tokens_N).index(slice(0, n))
