"""Several teachers, one batch: a rollout table split by each row's teacher, the teachers' tables merged back
into the rollout's row order, and each teacher's own statistics on its rows.

The trainer reads one teacher table per rollout table, row for row, whatever scored each row; so routing
lives entirely between the two phases (`actors/driver/routing.py` runs these functions as Ray tasks). Every
teacher table has the same schema (`eopd_ray.batch.TEACHER_SCHEMA`: top-k ids in the student's vocabulary,
an empty `teacher_mask` row where every position carries statistics), so tables of a shared-tokenizer and a
cross-tokenizer teacher concatenate as they are.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from eopd_ray.batch import list_rows, teacher_mask_rows
from eopd_ray.worker_stats import SUM, Reduction, mean_over

# What `route_stats` reports for one teacher's rows of one table, and how several tables' are combined.
ROUTE_STATS: dict[str, Reduction] = {
    "positions": SUM,  # response positions the teacher gave statistics for (the weight of the means)
    "tau_fraction": mean_over("positions"),  # share of them at or above loss.tau: where EOPD's gate opens
    "kl_reverse": mean_over("positions"),  # mean log pi_old - log pi_te at the sampled tokens (the rollout's)
}


def route_rows(sample_ids: np.ndarray, route: dict[int, int], num_groups: int) -> list[np.ndarray]:
    """(N,) sample ids of a rollout table and {sample id: teacher group} -> per group, the (N_g,) int64 row
    indices it scores, in row order. A sample id without a route is a KeyError naming it."""
    groups = np.empty(len(sample_ids), dtype=np.int64)
    for j, sid in enumerate(sample_ids.tolist()):
        if sid not in route:
            raise KeyError(f"rollout row {j}: sample id {sid} has no teacher (routing covers the step's prompts only)")
        groups[j] = route[sid]
    return [np.flatnonzero(groups == g) for g in range(num_groups)]


def merge_rows(pieces: list[pa.Table], rows: list[np.ndarray], num_rows: int) -> pa.Table:
    """Tables of disjoint row sets (piece i holds rows `rows[i]` of the original, in that order) -> one table of
    `num_rows` rows in the original order. Every row must come from exactly one piece."""
    if sum(len(r) for r in rows) != num_rows or any(p.num_rows != len(r) for p, r in zip(pieces, rows)):
        raise ValueError(f"pieces of {[p.num_rows for p in pieces]} rows for row sets of {[len(r) for r in rows]}, "
                         f"{num_rows} rows in all: each piece must hold exactly its rows")
    origin = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    if not np.array_equal(np.sort(origin), np.arange(num_rows)):
        raise ValueError("the row sets overlap or leave rows out: each row must be scored by exactly one teacher")
    merged = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    order = np.empty(num_rows, dtype=np.int64)
    order[origin] = np.arange(num_rows)  # order[j]: where original row j sits in the concatenation
    return merged.take(pa.array(order))


def route_stats(rollout: pa.Table, teacher: pa.Table, tau: float) -> dict[str, float]:
    """One teacher's statistics over the positions it scored (its `teacher_mask`) of `rollout`'s rows (the
    rollout rows it was given and its table of them, row for row); keys as ROUTE_STATS declares."""
    lengths = [len(r) for r in list_rows(rollout.column("response_ids"))]
    mask = teacher_mask_rows(teacher, lengths)
    valid = np.concatenate(mask) if mask else np.zeros(0, dtype=bool)
    n = int(valid.sum())
    if not n:
        return {"positions": 0, "tau_fraction": 0.0, "kl_reverse": 0.0}

    def flat(table, column):
        rows = list_rows(table.column(column))
        return np.concatenate(rows).astype(np.float64)[valid] if rows else np.zeros(0)

    entropy = flat(teacher, "teacher_entropy")
    return {"positions": n, "tau_fraction": float((entropy >= tau).mean()),
            "kl_reverse": float((flat(rollout, "logprobs") - flat(teacher, "teacher_logprobs")).mean())}
