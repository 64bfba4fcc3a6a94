"""The score phase of a step: the teacher group turns rollout refs into teacher-table refs.

Rollout i goes to teacher worker i % n. Whole-model workers take one call per rollout (Ray pipelines them); a
ZeRO-3 group (`actors/teacher_zero3.py`) takes one collective call per worker with its whole share, since its
workers must run in step. The payloads stay in the object store: only the small stats dicts reach the driver.
"""

from __future__ import annotations

import ray

from actors.runtime.group import ActorGroup


def score_rollouts(teachers: ActorGroup, rollout_refs: list, zero3: bool) -> tuple[list, list[dict]]:
    """(teacher table refs, one per rollout ref in the same order; the stats dict of each)."""
    n = len(teachers)
    if not zero3:
        scored = [teachers.actors[i % n].score.options(num_returns=2).remote(ref)
                  for i, ref in enumerate(rollout_refs)]
        return [s[0] for s in scored], ray.get([s[1] for s in scored])
    shares = [rollout_refs[w::n] for w in range(n)]
    outs = [a.score_shards.options(num_returns=len(share) + 1).remote(*share)
            for a, share in zip(teachers.actors, shares)]
    outs = [out if share else [out] for out, share in zip(outs, shares)]  # num_returns=1 gives a bare ref
    _wait_for_group(teachers, [out[-1] for out in outs])
    stats_per_worker = ray.get([out[-1] for out in outs])
    refs = [outs[i % n][i // n] for i in range(len(rollout_refs))]
    return refs, [stats_per_worker[i % n][i // n] for i in range(len(rollout_refs))]


def _wait_for_group(teachers: ActorGroup, pending: list) -> None:
    """Wait for every worker's call, raising as soon as one fails. When a worker dies, its peers' collectives
    may fail first (or hang): the death itself is raised then, which the training loop recovers from, rather
    than a peer's error."""
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
    except ray.exceptions.RayTaskError:
        pings = [a.ping.remote() for a in teachers.actors]
        # One deadline for all: live peers may be stuck in a collective and never answer.
        for ping in ray.wait(pings, num_returns=len(pings), timeout=30)[0]:
            ray.get(ping)  # a dead worker raises ActorDiedError here
        raise
