"""The score phase's handling of a ZeRO-3 teacher group (actors/driver/phases.py), through Ray with stand-in
workers: tables come back in rollout order, and a worker's death is what the driver sees even when a peer's
error arrives first."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import pytest
import ray

from actors.runtime.group import ActorGroup
from actors.driver.phases import score_rollouts

pytestmark = pytest.mark.e2e


@ray.remote
class StandIn:
    """Answers score_shards like a ZeRO-3 teacher worker: one 'table' per rollout, then the stats list."""

    def __init__(self, behaviour: str = "ok"):
        self.behaviour = behaviour

    def ping(self) -> bool:
        return True

    def score_shards(self, *rollouts):
        if self.behaviour == "raise":  # a peer's collective failing at once
            raise RuntimeError("gloo: connection closed by peer")
        if self.behaviour == "die":  # dies a moment later, after the peer has already failed
            time.sleep(1.0)
            os._exit(1)
        return (*[f"scored {r}" for r in rollouts], [{"rows": r} for r in rollouts])


@contextmanager
def group(*behaviours: str):
    """A real ActorGroup (placement group, ranks) of stand-in workers, removed afterwards."""
    teachers = ActorGroup("teacher", StandIn, len(behaviours), lambda rank: {"behaviour": behaviours[rank]},
                          num_cpus=0.25)
    try:
        yield teachers
    finally:
        teachers.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_shares_come_back_in_rollout_order_with_an_idle_worker(local_ray):
    with group("ok", "ok", "ok") as teachers:
        refs, stats = score_rollouts(teachers, [ray.put(i) for i in range(2)], zero3=True)  # worker 2: no share
        assert ray.get(refs) == ["scored 0", "scored 1"]
        assert stats == [{"rows": 0}, {"rows": 1}]
        refs, stats = score_rollouts(teachers, [ray.put(i) for i in range(7)], zero3=True)
        assert ray.get(refs) == [f"scored {i}" for i in range(7)] and [s["rows"] for s in stats] == list(range(7))


def test_a_dead_worker_is_reported_even_when_a_peer_fails_first(local_ray):
    with group("raise", "die") as teachers, pytest.raises(ray.exceptions.RayActorError):
        score_rollouts(teachers, [ray.put(i) for i in range(4)], zero3=True)
    with group("raise", "ok") as teachers, pytest.raises(ray.exceptions.RayTaskError, match="connection closed"):
        score_rollouts(teachers, [ray.put(i) for i in range(4)], zero3=True)  # no death: the real error
