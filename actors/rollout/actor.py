"""The rollout worker's Ray shell: all logic lives in `RolloutWorker` and the sync receiver mixin."""

from __future__ import annotations

import ray

from actors.rollout.worker import RolloutWorker
from actors.sync.broadcast import RolloutWeightReceiver


@ray.remote
class RolloutActor(RolloutWorker, RolloutWeightReceiver):
    pass
