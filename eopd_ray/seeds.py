"""Every seed the run derives, in one place. Each depends only on the configured seed and where it is used
(step, shard, mini-batch, rank), never on timing or on how many actors there are, so a resumed or rebuilt run
draws exactly what the uninterrupted one drew."""

from __future__ import annotations


def rollout_seed(seed: int, step: int, shard: int) -> int:
    """Sampling seed of rollout shard `shard` (its worker's share of the batch) at `step`."""
    return seed * 1_000_003 + step * 1009 + shard


def request_seed(seed: int, i: int) -> int:
    """Seed of the i-th request of an engine call (vLLM: one seed per request), a 31-bit int."""
    return (seed * 1_000_003 + i * 7_919) % (2**31 - 1)


def gate_seed(random_seed: int, step: int, mini_batch: int, rank: int) -> int:
    """Seed of the random forward-KL gate (`random_fkl`) of one rank's share of one mini-batch."""
    return random_seed * 1_000_003 + step * 10_007 + mini_batch * 101 + rank


def eval_seed(seed: int) -> int:
    """Sampling seed of the final evaluation (the same for every model evaluated)."""
    return seed + 777
