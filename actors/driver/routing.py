"""The score phase with several teachers: each rollout table split by its rows' teachers (a Ray task next to
the data), each part scored by its teacher group, the parts merged back into row order (another task), so the
trainer gets one teacher table per rollout table as with one teacher. Only row indices and stats dicts reach
the driver. The functions the tasks run are `eopd_ray/routing.py`."""

from __future__ import annotations

import ray

from actors.runtime.group import ActorGroup
from eopd_ray.routing import ROUTE_STATS, merge_rows, route_rows, route_stats
from eopd_ray.worker_stats import WORKER_STATS, reduce_worker_stats


@ray.remote(num_cpus=0)
def _split(rollout, route: dict, num_groups: int):
    """rollout table -> (its rows of each group as tables..., the row indices of each group)."""
    rows = route_rows(rollout.column("sample_id").to_numpy(), route, num_groups)
    return (*[rollout.take(r) for r in rows], rows)


@ray.remote(num_cpus=0)
def _merge(rollout, rows: list, tau: float, *teacher_parts):
    """The groups' teacher tables of one rollout table (only groups with rows, in group order) -> (the table in
    the rollout's row order, each group's `route_stats` on its rows)."""
    merged = merge_rows(list(teacher_parts), rows, rollout.num_rows)
    return merged, [route_stats(rollout.take(r), part, tau) for r, part in zip(rows, teacher_parts)]


def per_teacher(name: str, stats: dict) -> dict:
    """Stats of one group under `teacher/<name>/...`: `teacher/tokens` -> `teacher/<name>/tokens`,
    `cross/aligned_fraction` -> `teacher/<name>/cross_aligned_fraction`, `time/teacher` -> `teacher/<name>/time`."""
    out = {}
    for key, value in stats.items():
        section, _, stat = key.partition("/")
        stat = stat if section == "teacher" else "time" if key == "time/teacher" else f"{section}_{stat}" if stat else section
        out[f"teacher/{name}/{stat}"] = value
    return out


def score_routed(groups: list[tuple[str, ActorGroup]], rollout_refs: list, route: dict, tau: float,
                 score) -> tuple[list, dict, dict]:
    """Score every rollout table with the teacher group each row is routed to (`route`: sample id -> group).

    score(group, refs) -> (teacher table refs, stats per ref): one group's score phase (`phases.score_rollouts`).
    Returns (one merged teacher table ref per rollout ref, in order; the phase's stats: those every teacher
    reports, over all of them, and each group's under `teacher/<name>/...`; per group name with rows, the first
    (rollout part ref, teacher part ref) pair, for the alignment check)."""
    g = len(groups)
    splits = [_split.options(num_returns=g + 1).remote(ref, route, g) for ref in rollout_refs]
    rows = ray.get([s[-1] for s in splits])  # per table, per group: row indices (small)
    parts: list[list] = [[] for _ in range(g)]  # per group: (table index, rollout part ref)
    for t, (split, table_rows) in enumerate(zip(splits, rows)):
        for k in range(g):
            if len(table_rows[k]):
                parts[k].append((t, split[k]))
    scored: dict[tuple[int, int], object] = {}
    worker_stats: list[list[dict]] = [[] for _ in range(g)]
    firsts = {}
    for k, (name, group) in enumerate(groups):
        if not parts[k]:
            continue
        refs, stats = score(group, [ref for _, ref in parts[k]])
        worker_stats[k] = stats
        scored.update({(t, k): ref for (t, _), ref in zip(parts[k], refs)})
        firsts[name] = (parts[k][0][1], refs[0])
    merged, route_parts = [], [[] for _ in range(g)]
    merges = []
    for t, ref in enumerate(rollout_refs):
        present = [k for k in range(g) if len(rows[t][k])]
        merges.append((present, _merge.options(num_returns=2).remote(
            ref, [rows[t][k] for k in present], tau, *[scored[(t, k)] for k in present])))
    for present, (table_ref, stats_ref) in merges:
        merged.append(table_ref)
        for k, stats in zip(present, ray.get(stats_ref)):
            route_parts[k].append(stats)
    metrics = _common_stats([s for per_group in worker_stats for s in per_group])
    for k, (name, _) in enumerate(groups):
        if worker_stats[k]:
            route = reduce_worker_stats(route_parts[k], ROUTE_STATS)
            route.pop("positions")  # the teacher's own `teacher/tokens` already counts them
            metrics.update(per_teacher(name, {**reduce_worker_stats(worker_stats[k]), **route}))
    return merged, metrics, firsts


def _common_stats(stats: list[dict]) -> dict:
    """The statistics every teacher reports (a cross-tokenizer group adds its own `cross/*`), over all of them."""
    common = [key for key in stats[0] if all(key in s for s in stats)] if stats else []
    return reduce_worker_stats([{key: s[key] for key in common} for s in stats], WORKER_STATS)

