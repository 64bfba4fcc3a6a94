"""Weight sync in buckets from student rank 0 to every engine worker, through Ray: the actor mixins and the two
`WeightSync` implementations that use the primitives of `actors/sync/buckets.py`.

1. Mixins for the Ray shells (`actors/student/actor.py`, `actors/rollout/actor.py`): `StudentWeightSender`
   (ZeRO-3 parameters are gathered bucket by bucket with `deepspeed.zero.GatheredParameters`, every rank
   joining) and `RolloutWeightReceiver` (forwards to the engine: vLLM loads the buckets in its workers inside
   one weight-update session, the transformers engine copies them into its parameters).
2. `NcclWeightSync` (disaggregated: one dedicated group, NCCL on GPUs and gloo on CPU, student rank 0 = rank 0,
   engine worker j of engine i = rank 1 + i * tp + j) and `IpcWeightSync` (colocated: engine i opens the
   bucket that student rank i built on the same GPU), both implementing `WeightSync.sync() -> timing metrics`.
"""

from __future__ import annotations

import time

import ray
import torch

from actors.sync.buckets import (DTYPES, MIB, ParamMeta, device_uuid, flatten, ipc_handle, iter_student_buckets,
                                 param_metas, plan_buckets, weight_group)
from actors.sync.check import teacher_forced_logprobs
from actors.sync.base import WeightSync


# ---- Mixins for the Ray shells ----------------------------------------------------------------------


class StudentWeightSender:
    """Sending side, mixed into StudentActor. Uses the StudentTrainer's DeepSpeed engine (`self.engine`),
    `self.trainer.zero_stage`, `self.rank` and `self.dtype` (the wire dtype: the engines' compute dtype)."""

    _weight_comm = None
    _ipc_keep = None

    def weight_metas(self) -> list[ParamMeta]:
        return param_metas(self.engine.module, self.dtype)

    def init_weight_group(self, addr: str, port: int, world_size: int) -> bool:
        """Rank 0 joins the dedicated group as its rank 0; the other ranks have nothing to do."""
        if self.rank == 0:
            # the trainer's device: CUDA with the NCCL backend (NCCL group), else CPU (gloo group)
            self._weight_comm = weight_group(addr, port, 0, world_size, self.device)
        return True

    def broadcast_weights(self, bucket_mb: int) -> float:
        """Every rank calls this (ZeRO-3 gathers are collective); rank 0 broadcasts each bucket. Seconds."""
        t0 = time.perf_counter()
        metas = self.weight_metas()
        device = self.device
        for _, flat in iter_student_buckets(self.engine.module, metas, bucket_mb * MIB, self.trainer.zero_stage,
                                            self.rank, device):
            if flat is not None:
                self._weight_comm.broadcast(flat, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def sync_check_logprobs(self, prompt_ids, response_ids) -> list | None:
        """The student's side of the post-sync check: teacher-forced log-probs of the given rows, from rank 0.
        Every rank runs the forward (under ZeRO-3 the parameters are gathered collectively)."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            out = [teacher_forced_logprobs(module, p, r, self.vocab_size) for p, r in zip(prompt_ids, response_ids)]
        finally:
            module.train(was_training)
        return out if self.rank == 0 else None

    def ipc_bucket(self, index: int, bucket_mb: int) -> dict:
        """Colocated: build bucket `index` on this rank's GPU and return {GPU uuid: handle}. Under ZeRO-3 every
        rank gathers the bucket, so every rank can serve the engine on its own GPU."""
        metas = self.weight_metas()
        idx = plan_buckets(metas, bucket_mb * MIB)[index]
        bucket = [metas[i] for i in idx]
        params = dict(self.engine.module.named_parameters())
        tensors = [params[m.name] for m in bucket]
        device = torch.device("cuda", torch.cuda.current_device())
        if self.trainer.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
                flat = flatten([t.detach() for t in tensors], DTYPES[bucket[0].dtype], device)
        else:
            flat = flatten([t.detach() for t in tensors], DTYPES[bucket[0].dtype], device)
        torch.cuda.synchronize()
        self._ipc_keep = flat  # alive until the engines have copied it (release_ipc)
        return {device_uuid(): ipc_handle(flat)}

    def release_ipc(self) -> bool:
        self._ipc_keep = None
        return True


class RolloutWeightReceiver:
    """Receiving side, mixed into RolloutActor: forwards to the engine (`self.engine`: a VLLMEngine, or the
    transformers engine on CPU, which receives over gloo)."""

    def init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> bool:
        self.engine.init_weight_group(addr, port, rank_offset, world_size)
        return True

    def weight_mismatches(self, metas: list[ParamMeta]) -> list[str]:
        return self.engine.weight_mismatches(metas)

    def receive_weights(self, metas: list[ParamMeta], bucket_mb: int) -> float:
        t0 = time.perf_counter()
        self.engine.receive_weights(metas, bucket_mb * MIB)
        return time.perf_counter() - t0

    def receive_ipc_bucket(self, metas: list[ParamMeta], handles: dict) -> float:
        t0 = time.perf_counter()
        self.engine.receive_ipc_bucket(metas, handles)
        return time.perf_counter() - t0

    def score_tokens(self, prompt_ids, response_ids) -> list:
        """The engine's teacher-forced log-probs of given tokens (for `check_synced_logprobs`)."""
        return self.engine.score_tokens(prompt_ids, response_ids)

    def weight_sync_begin(self) -> bool:
        self.engine.weight_sync_begin()
        return True

    def weight_sync_end(self) -> bool:
        self.engine.weight_sync_end()
        return True


# ---- The WeightSync implementations (Ray) ------------------------------------------------------------


class NcclWeightSync(WeightSync):
    """Disaggregated: one NCCL group of student rank 0 and every engine worker; buckets broadcast from rank 0."""

    def __init__(self, students, rollouts, bucket_mb: int, tensor_parallel_size: int):
        self.students, self.rollouts, self.bucket_mb = students, rollouts, bucket_mb
        self.tp = tensor_parallel_size
        self.metas = ray.get(students.actors[0].weight_metas.remote())
        self._connect()

    def _connect(self) -> None:
        """(Re)build the group over the engines present now. An NCCL group cannot gain or lose members, so
        when rollout workers left or joined (elastic runs) every member builds a new one on a fresh port."""
        # Checked before any bucket moves: a receiver failing halfway would leave the sender blocked.
        problems = sorted({p for ps in ray.get(self.rollouts.call("weight_mismatches", self.metas)) for p in ps})
        if problems:
            raise RuntimeError(f"weight sync: the rollout engines' model does not match the student's: "
                               f"{'; '.join(problems[:5])}. Start the engines from the same model.student.")
        world = 1 + len(self.rollouts) * self.tp
        addr, port = ray.get(self.students.actors[0].master_address.remote())
        # All members create the group together (rank 0 hosts its store), so submit everything, then wait.
        ray.get(self.students.call("init_weight_group", addr, port, world)
                + [a.init_weight_group.remote(addr, port, 1 + i * self.tp, world)
                   for i, a in enumerate(self.rollouts.actors)])
        self._members = [a._actor_id for a in self.rollouts.actors]

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        if [a._actor_id for a in self.rollouts.actors] != self._members:
            self._connect()
        ray.get(self.rollouts.call("weight_sync_begin"))
        send = self.students.call("broadcast_weights", self.bucket_mb)
        recv = self.rollouts.call("receive_weights", self.metas, self.bucket_mb)
        times = ray.get(send + recv)
        ray.get(self.rollouts.call("weight_sync_end"))
        return {"time/sync": time.perf_counter() - t0, "time/sync_send": times[0],
                "time/sync_load": max(times[len(send):])}


class IpcWeightSync(WeightSync):
    """Colocated: per bucket, every student rank builds it on its GPU, engine i opens the one on its GPU."""

    def __init__(self, students, rollouts, bucket_mb: int):
        self.students, self.rollouts, self.bucket_mb = students, rollouts, bucket_mb
        self.metas = ray.get(students.actors[0].weight_metas.remote())
        self.buckets = plan_buckets(self.metas, bucket_mb * MIB)

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        load = 0.0
        ray.get(self.rollouts.call("weight_sync_begin"))  # a full wake-up (weights and KV cache) of sleeping engines
        for b, idx in enumerate(self.buckets):
            handles: dict = {}
            for part in self.students.run("ipc_bucket", b, self.bucket_mb):
                handles.update(part)
            load += max(self.rollouts.run("receive_ipc_bucket", [self.metas[i] for i in idx], handles))
            self.students.run("release_ipc")
        ray.get(self.rollouts.call("weight_sync_end"))
        return {"time/sync": time.perf_counter() - t0, "time/sync_load": load}
