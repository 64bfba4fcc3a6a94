"""How a list of work items is split over a group's workers: one rule for rollouts, scoring and evaluation."""

from __future__ import annotations

import numpy as np


def shard_slices(n_items: int, n_workers: int) -> list[slice]:
    """n_workers contiguous slices covering range(n_items) in order, whose sizes differ by at most one
    (trailing ones may be empty when there are fewer items than workers)."""
    bounds = np.linspace(0, n_items, n_workers + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
