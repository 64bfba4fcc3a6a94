"""Timing of the benchmark scripts: interleaved repetitions, per-pair ratios, medians and spreads (the rules
are in `_common`'s docstring; `_common` re-exports these)."""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, Sequence


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class Timings(dict):
    """name -> wall seconds per call; `.cpu`: name -> CPU seconds of this process per call."""

    def __init__(self, names):
        super().__init__({n: [] for n in names})
        self.cpu: dict[str, list[float]] = {n: [] for n in names}


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, time.process_time() - c0, res


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                after: Callable[[str, Any], None] | None = None) -> Timings:
    """Seconds per call of each fn, run interleaved; the order alternates every repetition.
    `after(name, result)` runs after each timed call, outside the timing."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = Timings(names)
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            wall, cpu, res = timed(fns[n])
            out[n].append(wall)
            out.cpu[n].append(cpu)
            if after is not None:
                after(n, res)
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repetitions of num[i] / den[i]."""
    return median(pair_ratios(num, den))


def pair_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] for every repetition i (pairs with den[i] <= 0 left out)."""
    return [a / b for a, b in zip(num, den) if b > 0]


def spread_of(xs: Sequence[float]) -> dict[str, Any]:
    """The spread of repeated measurements: lower and upper quartile (`low`, `high`: the interquartile range,
    which one stalled repetition cannot move far), min, max and their count. Quartiles as
    `statistics.quantiles(method="inclusive")`; with one value all four are that value."""
    xs = [float(x) for x in xs if math.isfinite(x)]
    if not xs:
        return {"low": float("nan"), "high": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0,
                "kind": "iqr"}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"low": q[0], "high": q[2], "min": min(xs), "max": max(xs), "n": len(xs), "kind": "iqr"}
