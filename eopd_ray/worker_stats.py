"""One metrics row from the stats dicts of several workers, each key reduced by its kind.

Workers report statistics of their own share: counts (a sum over the share), means over the share's responses
or tokens, and times. The driver's row must be the statistic of the whole batch, so a count is summed, a mean is
weighted by the count it is a mean over (an average of means would weigh a worker with 2 responses like one
with 200), and a time is the slowest worker's (a phase waits for all of them). The kinds are declared once, in
`WORKER_STATS`; a key not declared there is an error rather than a silent average.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("sum", "mean", "max", "min")


@dataclass(frozen=True)
class Reduction:
    """kind: one of KINDS; weight: for "mean", the key of the count (a "sum" key of the same dicts) that each
    worker's mean is taken over."""

    kind: str
    weight: str = ""


SUM, MAX, MIN = Reduction("sum"), Reduction("max"), Reduction("min")


def mean_over(count_key: str) -> Reduction:
    return Reduction("mean", count_key)


WORKER_STATS: dict[str, Reduction] = {
    # rollout workers (actors/rollout/worker.py), one dict per worker; rollout/responses is added by the
    # driver (the rows it asked the worker for: prompts x rollout.n_samples_per_prompt)
    "rollout/responses": SUM,
    "rollout/tokens": SUM,
    "rollout/accuracy": mean_over("rollout/responses"),
    "rollout/response_length": mean_over("rollout/responses"),
    "rollout/cut_at_padded_id": mean_over("rollout/responses"),
    # means over the tokens with a finite entropy: all of them (transformers) or none, NaN (vLLM)
    "rollout/entropy": mean_over("rollout/tokens"),
    "rollout/high_entropy_fraction": mean_over("rollout/tokens"),
    "time/generate": MAX,
    # teacher workers (actors/teacher/scorer.py, zero3.py), one dict per scored rollout table
    "teacher/tokens": SUM,
    "teacher/entropy_rollout": mean_over("teacher/tokens"),
    "teacher/high_entropy_fraction": mean_over("teacher/tokens"),
    "time/teacher": MAX,
    "time/teacher_shards": MAX,
    # a teacher of another tokenizer (actors/teacher/cross.py): teacher/tokens are then the aligned positions
    "cross/positions": SUM,
    "cross/aligned_fraction": mean_over("cross/positions"),
    "cross/unmatched_mass": mean_over("teacher/tokens"),
}


def reduce_worker_stats(stats: list[dict], kinds: dict[str, Reduction] | None = None) -> dict[str, float]:
    """The stats of the whole batch from one dict per worker (or per table), every dict with the same keys,
    each key reduced as `kinds` (default WORKER_STATS) declares: summed, the mean weighted by its count, the
    maximum or the minimum. A worker whose count is 0 adds nothing to a mean (its value is a placeholder,
    0.0 or NaN); when every count is 0 the mean is the plain average of those placeholders. NaN means
    (no finite value on a worker with a count) stay NaN. Keys keep the order of the first dict."""
    kinds = WORKER_STATS if kinds is None else kinds
    if not stats:
        return {}
    keys = list(stats[0])
    for i, s in enumerate(stats[1:], start=1):
        if set(s) != set(keys):
            raise ValueError(f"worker {i}'s stats have keys {sorted(s)}, worker 0's {sorted(keys)}: every "
                             "worker of a phase must report the same statistics")
    out: dict[str, float] = {}
    for key in keys:
        r = kinds.get(key)
        if r is None or r.kind not in KINDS:
            raise ValueError(f"worker statistic {key!r} has no declared reduction: declare it in "
                             f"eopd_ray.worker_stats.WORKER_STATS as one of {', '.join(KINDS)}")
        values = [s[key] for s in stats]
        if r.kind == "sum":
            out[key] = sum(values)
        elif r.kind == "max":
            out[key] = max(values)
        elif r.kind == "min":
            out[key] = min(values)
        else:
            if r.weight not in keys:
                raise ValueError(f"worker statistic {key!r} is a mean over {r.weight!r}, which the workers do "
                                 "not report")
            pairs = [(float(s[r.weight]), float(s[key])) for s in stats]
            total = sum(w for w, _ in pairs)
            out[key] = (sum(w * v for w, v in pairs if w > 0) / total if total > 0
                        else sum(v for _, v in pairs) / len(pairs))
    return out
