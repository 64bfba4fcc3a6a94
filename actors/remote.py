"""Ray shells over the plain worker classes. All logic lives in the plain classes; these only add the
Ray decorator and, for the student, the node address Ray knows."""

from __future__ import annotations

import ray

from actors.rollout import RolloutWorker
from actors.student import StudentTrainer, free_port
from actors.teacher import TeacherScorer


@ray.remote
class RolloutActor(RolloutWorker):
    pass


@ray.remote
class TeacherActor(TeacherScorer):
    pass


@ray.remote
class StudentActor(StudentTrainer):
    def master_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()
