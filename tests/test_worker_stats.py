"""The driver's reduction of per-worker stats: the stats of the pooled batch, each key by its declared kind."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eopd_ray.worker_stats import KINDS, MIN, SUM, WORKER_STATS, mean_over, reduce_worker_stats


def _worker_stats(lengths, correct, entropies, seconds):
    """What one rollout worker reports of its share (the definitions of actors/rollout/worker.py), plus the
    response count the driver adds."""
    tokens = np.concatenate(entropies) if entropies else np.zeros(0)
    return {"rollout/accuracy": float(np.mean(correct)) if correct else 0.0,
            "rollout/response_length": float(np.mean(lengths)) if lengths else 0.0,
            "rollout/tokens": int(sum(lengths)),
            "rollout/entropy": float(tokens.mean()) if tokens.size else 0.0,
            "rollout/high_entropy_fraction": float((tokens >= 1.0).mean()) if tokens.size else 0.0,
            "rollout/cut_at_padded_id": 0.0, "time/generate": seconds, "rollout/responses": len(lengths)}


def test_reduced_stats_are_the_stats_of_the_pooled_batch():
    rng = np.random.default_rng(0)
    shares = [[3, 40, 2, 7, 1], [25], [], [6, 6, 9]]  # response lengths per worker: unequal shares, one empty
    correct = [[1, 0, 1, 1, 1], [0], [], [0, 0, 1]]
    ents = [[rng.exponential(0.8, n) for n in lengths] for lengths in shares]
    seconds = [1.5, 0.25, 0.1, 2.75]
    stats = [_worker_stats(*args) for args in zip(shares, correct, ents, seconds)]
    row = reduce_worker_stats(stats)
    pooled = _worker_stats(sum(shares, []), sum(correct, []), sum(ents, []), 0.0)  # one worker with everything
    assert row["rollout/tokens"] == pooled["rollout/tokens"] == 99 and row["rollout/responses"] == 9
    assert isinstance(row["rollout/tokens"], int)
    for key in ("rollout/accuracy", "rollout/response_length", "rollout/entropy", "rollout/high_entropy_fraction"):
        assert row[key] == pytest.approx(pooled[key], rel=0, abs=1e-12), key
    assert row["time/generate"] == 2.75  # the phase waits for the slowest worker
    assert list(row) == list(stats[0])
    # the plain average of the workers' means, as the driver took it before, is far from the batch's
    plain = sum(s["rollout/accuracy"] for s in stats) / len(stats)
    assert abs(plain - pooled["rollout/accuracy"]) > 0.1


def test_empty_counts_and_nan_means():
    empty = {"teacher/tokens": 0, "teacher/entropy_rollout": 0.0, "teacher/high_entropy_fraction": 0.0,
             "time/teacher": 0.5}
    assert reduce_worker_stats([empty, dict(empty, **{"time/teacher": 0.75})]) == {
        "teacher/tokens": 0, "teacher/entropy_rollout": 0.0, "teacher/high_entropy_fraction": 0.0,
        "time/teacher": 0.75}
    # vLLM gives no entropy: every worker's mean is NaN, and so is the batch's
    nan = {"rollout/tokens": 5, "rollout/entropy": float("nan")}
    assert math.isnan(reduce_worker_stats([nan, dict(nan, **{"rollout/tokens": 2})])["rollout/entropy"])
    # a worker without tokens contributes its placeholder to nothing
    row = reduce_worker_stats([{"rollout/tokens": 0, "rollout/entropy": float("nan")},
                               {"rollout/tokens": 4, "rollout/entropy": 0.5}])
    assert row == {"rollout/tokens": 4, "rollout/entropy": 0.5}
    assert reduce_worker_stats([]) == {}


def test_kinds_are_declared_and_checked():
    for key, r in WORKER_STATS.items():
        assert r.kind in KINDS, key
        if r.kind == "mean":  # a mean is weighted by a count the same workers report, summed
            assert WORKER_STATS[r.weight] == SUM, key
    table = {"a": SUM, "m": mean_over("a"), "lo": MIN}
    assert reduce_worker_stats([{"a": 1, "m": 2.0, "lo": 3.0}, {"a": 3, "m": 6.0, "lo": -1.0}], table) == {
        "a": 4, "m": 5.0, "lo": -1.0}
    with pytest.raises(ValueError, match="'rollout/new' has no declared reduction.*WORKER_STATS"):
        reduce_worker_stats([{"rollout/new": 1.0}])
    with pytest.raises(ValueError, match="worker 1's stats have keys"):
        reduce_worker_stats([{"rollout/tokens": 1}, {"rollout/tokens": 1, "time/generate": 1.0}])
    with pytest.raises(ValueError, match="mean over 'rollout/responses', which the workers do not report"):
        reduce_worker_stats([{"rollout/accuracy": 1.0}])
