"""Ray shells over the plain worker classes. All logic lives in the plain classes; these only add the
Ray decorator, for the student the node address Ray knows, and the GPU weight-sync methods
(`actors/nccl_sync.py` mixins; unused on CPU, where the object-store sync calls the plain classes)."""

from __future__ import annotations

import ray

from actors.nccl_sync import RolloutWeightReceiver, StudentWeightSender
from actors.rollout import RolloutWorker
from actors.dist_init import free_port
from actors.student import StudentTrainer
from actors.teacher import TeacherScorer
from actors.teacher_zero3 import ShardedTeacherScorer


@ray.remote
class RolloutActor(RolloutWorker, RolloutWeightReceiver):
    pass


@ray.remote
class TeacherActor(TeacherScorer):
    pass


class _NodeAddress:
    """Rank 0 of a process group hosts it on the node address Ray knows."""

    def master_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()


@ray.remote
class ShardedTeacherActor(_NodeAddress, ShardedTeacherScorer):
    pass


@ray.remote
class StudentActor(_NodeAddress, StudentTrainer, StudentWeightSender):
    pass
