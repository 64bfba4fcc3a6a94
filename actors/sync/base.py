"""Weight sync from student rank 0 to the rollout engines, behind one interface.

`ObjectStoreWeightSync` (CPU, any cluster): rank 0 exports its weights as numpy arrays into the object store
and every rollout worker loads them from there; the driver only passes the reference along. The NCCL
broadcast for GPU engines implements the same `sync()`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import ray

from actors.runtime.group import ActorGroup
from actors.sync.check import check_synced_logprobs, sync_limits


class WeightSync(ABC):
    students: ActorGroup
    rollouts: ActorGroup

    @abstractmethod
    def sync(self) -> dict[str, float]:
        """Push the current student weights to every rollout engine; returns timing metrics."""

    def verify(self, prompt_ids: list, response_ids: list, dtype: str) -> dict[str, float]:
        """After a sync: every engine's teacher-forced log-probs of the given rows must equal the student's
        within the limits for `dtype` (the dtype engines and student run in; `actors.sync.check.sync_limits`);
        raises SyncCheckError naming the worst position otherwise. Returns sync/check_* metrics ({} without
        rows)."""
        if not any(len(r) for r in response_ids):
            return {}
        limits = sync_limits(dtype)
        # Engines first: a colocated vLLM engine goes back to sleep after scoring, freeing the GPU for the student.
        engines = ray.get(self.rollouts.call("score_tokens", prompt_ids, response_ids))
        student = ray.get(self.students.call("sync_check_logprobs", prompt_ids, response_ids))[0]
        stats = [check_synced_logprobs(e, student, *limits) for e in engines]
        return {"sync/check_max_abs": max(s["max_abs"] for s in stats),
                "sync/check_mean_abs": max(s["mean_abs"] for s in stats)}


class ObjectStoreWeightSync(WeightSync):
    def __init__(self, students: ActorGroup, rollouts: ActorGroup):
        self.students, self.rollouts = students, rollouts

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        refs = self.students.call("export_weights")  # every rank joins (ZeRO-3 gathers); rank 0 returns
        weights_ref = refs[0]
        load_s = ray.get(self.rollouts.call("update_weights", weights_ref) + refs[1:])[:len(self.rollouts)]
        return {"time/sync": time.perf_counter() - t0, "time/sync_load": max(load_s)}
