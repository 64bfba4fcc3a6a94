"""Weight sync from student rank 0 to the rollout engines, behind one interface.

`ObjectStoreWeightSync` (CPU, any cluster): rank 0 exports its weights as numpy arrays into the object store
and every rollout worker loads them from there; the driver only passes the reference along. The NCCL
broadcast for GPU engines implements the same `sync()`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import ray

from actors.group import ActorGroup


class WeightSync(ABC):
    @abstractmethod
    def sync(self) -> dict[str, float]:
        """Push the current student weights to every rollout engine; returns timing metrics."""


class ObjectStoreWeightSync(WeightSync):
    def __init__(self, students: ActorGroup, rollouts: ActorGroup):
        self.students, self.rollouts = students, rollouts

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        refs = self.students.call("export_weights")  # every rank joins (ZeRO-3 gathers); rank 0 returns
        weights_ref = refs[0]
        load_s = ray.get(self.rollouts.call("update_weights", weights_ref) + refs[1:])[:len(self.rollouts)]
        return {"time/sync": time.perf_counter() - t0, "time/sync_load": max(load_s)}
