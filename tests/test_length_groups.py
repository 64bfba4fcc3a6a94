"""eopd_ray/sharding.py::length_groups against an exhaustive search over every split of the rows."""

from __future__ import annotations

import itertools
import random

import pytest

from eopd_ray.sharding import length_groups


def _cost(lengths, groups, forward_tokens):
    return sum(len(g) * max(lengths[i] for i in g) + forward_tokens for g in groups)


def _brute_force(lengths, max_rows, forward_tokens):
    """The least cost over every way to put the rows into groups of at most max_rows (set partitions)."""
    n = len(lengths)
    best = float("inf")
    for labels in itertools.product(range(n), repeat=n):  # group label of each row; n <= 6 keeps this small
        groups = [[i for i in range(n) if labels[i] == g] for g in set(labels)]
        if all(len(g) <= max_rows for g in groups):
            best = min(best, _cost(lengths, groups, forward_tokens))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_least_padded_cost_over_every_split(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    lengths = [rng.randint(1, 40) for _ in range(n)]
    max_rows, forward_tokens = rng.randint(1, 4), rng.choice([0, 3, 20, 200])
    groups = length_groups(lengths, max_rows, forward_tokens)
    assert sorted(i for g in groups for i in g) == list(range(n))  # every row exactly once
    assert all(1 <= len(g) <= max_rows for g in groups)
    assert _cost(lengths, groups, forward_tokens) == _brute_force(lengths, max_rows, forward_tokens)


def test_extremes_and_bad_input():
    lengths = [5, 30, 6, 31, 4]
    assert length_groups(lengths, 8, 10**9) == [[4, 0, 2, 1, 3]]  # one forward: all rows, shortest first
    assert length_groups(lengths, 8, 0) == [[4], [0], [2], [1], [3]]  # forwards free: no padding at all
    assert length_groups(lengths, 8, 10) == [[4, 0, 2], [1, 3]]
    assert length_groups([], 4, 10) == []
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        length_groups(lengths, 0, 10)
