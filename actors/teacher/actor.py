"""The teacher's Ray shells: whole-model scoring, a teacher of another tokenizer, and the ZeRO-3 group."""

from __future__ import annotations

import ray

from actors.runtime.node import NodeAddress
from actors.teacher.cross import CrossTeacherScorer
from actors.teacher.scorer import TeacherScorer
from actors.teacher.zero3 import ShardedTeacherScorer


@ray.remote
class TeacherActor(TeacherScorer):
    pass


@ray.remote
class ShardedTeacherActor(NodeAddress, ShardedTeacherScorer):
    pass


@ray.remote
class CrossTeacherActor(CrossTeacherScorer):
    pass
