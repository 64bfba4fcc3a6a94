"""How a list of work items is split over a group's workers: one rule for rollouts, scoring and evaluation."""

from __future__ import annotations

import numpy as np


def shard_slices(n_items: int, n_workers: int) -> list[slice]:
    """n_workers contiguous slices covering range(n_items) in order, whose sizes differ by at most one
    (trailing ones may be empty when there are fewer items than workers)."""
    bounds = np.linspace(0, n_items, n_workers + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def length_groups(lengths: list[int], max_rows: int, forward_tokens: int) -> list[list[int]]:
    """Rows split into padded batches that waste the least: indices of `lengths` (each row's tokens) in
    groups of at most `max_rows`, each group's rows of neighbouring lengths, the groups in ascending length.

    Minimises the padded tokens (a group costs its rows x its longest row) plus `forward_tokens` for each
    group, the fixed price of one more forward, so that rows are not split into many small batches whose
    matrices run slowly. Exact, by dynamic programming over the rows in length order: O(n x max_rows)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0] + [float("inf")] * n  # best[j]: least cost of the j shortest rows
    start = [0] * (n + 1)  # start[j]: where the last group of that best split begins
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * longest + forward_tokens
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[start[j]:j])
        j = start[j]
    return groups[::-1]
