"""Weight sync from student rank 0 to the rollout engines, behind one interface.

`ObjectStoreWeightSync` (CPU, any cluster): rank 0 exports its weights as numpy arrays into the object store
and every rollout worker loads them from there; the driver only passes the reference along. The NCCL
broadcast for GPU engines implements the same `sync()`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import ray

from actors.runtime.group import ActorGroup
from actors.sync.check import check_synced_logprobs, sync_limits


@dataclass
class SyncReference:
    """Rows for the post-sync check and both sides' log-probs of them before the student trained: `engines`
    {actor id: (T_i,) arrays per row}; `student` rank 0's, as object refs (one per rank) until `verify` fetches
    them. `syncs` counts the checks made against it."""

    prompt_ids: list
    response_ids: list
    engines: dict
    student: list
    syncs: int = 0


class WeightSync(ABC):
    students: ActorGroup
    rollouts: ActorGroup
    reference: SyncReference | None = None

    @abstractmethod
    def sync(self) -> dict[str, float]:
        """Push the current student weights to every rollout engine; returns timing metrics."""

    def record_reference(self, prompt_ids: list, response_ids: list) -> None:
        """Before the student trains: every engine's and the student's log-probs of the given rows under the
        weights they hold now, for `verify()` to measure how far each moved since. The engines are awaited (a
        colocated vLLM engine must be asleep again before the student uses the GPU); the student's call is
        only submitted: an actor runs one caller's calls in order, so it runs before the training."""
        if not any(len(r) for r in response_ids):
            self.reference = None  # no tokens to score: a reference at the next step
            return
        engines = ray.get(self.rollouts.call("score_tokens", prompt_ids, response_ids))
        student = self.students.call("sync_check_logprobs", prompt_ids, response_ids)  # every rank: ZeRO-3 gathers
        self.reference = SyncReference(prompt_ids, response_ids,
                                       {a._actor_id: e for a, e in zip(self.rollouts.actors, engines)}, student)

    def verify(self, prompt_ids: list | None = None, response_ids: list | None = None,
               dtype: str = "float32") -> dict[str, float]:
        """After a sync: every engine's teacher-forced log-probs of the given rows must equal the student's
        within the limits for `dtype` (the dtype engines and student run in; `actors.sync.check.sync_limits`);
        raises SyncCheckError naming the worst position otherwise. Without rows: the rows of `self.reference`,
        and each engine present then must also have moved with the student since (`check_synced_logprobs`;
        an engine that joined later is held to the limits only). Returns sync/check_* metrics ({} without
        response tokens); `sync/check_conclusive` is 1.0 only when the movement since the reference told new
        weights from the previous ones, for every engine."""
        ref = self.reference if prompt_ids is None else None
        if prompt_ids is None and ref is None:
            return {}
        if ref is not None:
            prompt_ids, response_ids = ref.prompt_ids, ref.response_ids
            if isinstance(ref.student[0], ray.ObjectRef):
                ref.student = ray.get(ref.student)[0]  # rank 0's rows
            ref.syncs += 1
        if not any(len(r) for r in response_ids):
            return {}
        limits = sync_limits(dtype)
        # Engines first: a colocated vLLM engine goes back to sleep after scoring, freeing the GPU for the student.
        engines = ray.get(self.rollouts.call("score_tokens", prompt_ids, response_ids))
        student = ray.get(self.students.call("sync_check_logprobs", prompt_ids, response_ids))[0]
        before = [ref.engines.get(a._actor_id) if ref else None for a in self.rollouts.actors]
        stats = [check_synced_logprobs(e, student, *limits, engine_before=b,
                                       student_before=ref.student if ref else None)
                 for e, b in zip(engines, before)]
        metrics = {"sync/check_max_abs": max(s["max_abs"] for s in stats),
                   "sync/check_mean_abs": max(s["mean_abs"] for s in stats)}
        moving = [s for s in stats if "moved" in s]
        if moving:
            metrics.update({"sync/check_moved": moving[0]["moved"],
                            "sync/check_noise": max(s["noise"] for s in moving),
                            "sync/check_unfollowed": max(s["unfollowed"] for s in moving)})
        metrics["sync/check_conclusive"] = float(bool(moving) and all(s["conclusive"] for s in moving))
        return metrics


class ObjectStoreWeightSync(WeightSync):
    def __init__(self, students: ActorGroup, rollouts: ActorGroup):
        self.students, self.rollouts = students, rollouts

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        refs = self.students.call("export_weights")  # every rank joins (ZeRO-3 gathers); rank 0 returns
        weights_ref = refs[0]
        load_s = ray.get(self.rollouts.call("update_weights", weights_ref) + refs[1:])[:len(self.rollouts)]
        return {"time/sync": time.perf_counter() - t0, "time/sync_load": max(load_s)}
