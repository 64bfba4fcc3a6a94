"""The student rank's Ray shell: the DeepSpeed trainer plus the sending side of the weight sync."""

from __future__ import annotations

import ray

from actors.runtime.node import NodeAddress
from actors.student.trainer import StudentTrainer
from actors.sync.broadcast import StudentWeightSender


@ray.remote
class StudentActor(NodeAddress, StudentTrainer, StudentWeightSender):
    pass
