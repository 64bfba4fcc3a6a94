"""The embedded default task: multi-term addition with a verifiable answer and genuine branching.

A prompt lists 3-4 different terms from 1-9, e.g. ``3+5+2=``. The solution trace adds the terms up one at a
time in ANY order (a running sum) and ends with the answer after the marker ``#``::

    3+5+2=   ->   5+2=7;7+3=10;#10      or   3+5=8;8+2=10;#10      or   2+3=5;5+5=10;#10 ...

Which term comes next is a free choice: a teacher trained on all orders has entropy about ln(number of
unused terms) there (first of 4 terms: ln 4 = 1.39 nats, then ln 3 = 1.10, then ln 2 = 0.69); the sums,
``+ = ;``, ``#`` and the answer are determined (entropy near 0). Train and test problems are disjoint by the
multiset of their terms (a stable hash, the same in every process). Pure Python + numpy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

ANSWER_MARKER = "#"
STEP_SEP = ";"
MIN_TERMS, MAX_TERMS, MAX_TERM = 3, 4, 9  # defaults of the embedded task
DISTINCT = True  # terms of one problem differ (no repeated term to keep count of)
TEST_FRACTION = 0.2  # share of term multisets held out for the test split
SPLITS = ("train", "test")
_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"(\d+)")


@dataclass(frozen=True)
class Problem:
    """One task instance: `prompt` is the text given to the model, `answer` the exact expected string."""

    prompt: str
    answer: str
    id: int

    @property
    def terms(self) -> tuple[int, ...]:
        """The terms in prompt order, parsed from ``a+b+c=``."""
        return tuple(int(t) for t in self.prompt.rstrip("=").split("+"))


def split_of(terms: Iterable[int]) -> str:
    """`"train"` or `"test"`: a stable hash of the sorted term multiset (order does not matter)."""
    key = "+".join(str(t) for t in sorted(terms)).encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return "test" if (h % 1000) < TEST_FRACTION * 1000 else "train"


def problem_from_terms(terms: Sequence[int], id: int = 0) -> Problem:
    return Problem(prompt="+".join(str(t) for t in terms) + "=", answer=str(sum(terms)), id=id)


def sample_terms(rng: np.random.Generator, split: str = "train", min_terms: int = MIN_TERMS,
                 max_terms: int = MAX_TERMS, max_term: int = MAX_TERM,
                 distinct: bool = DISTINCT) -> tuple[int, ...]:
    """Random terms (1..max_term, count in [min_terms, max_terms], pairwise different if `distinct`)
    whose multiset belongs to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed one of {', '.join(SPLITS)}")
    if not 2 <= min_terms <= max_terms or (distinct and max_terms > max_term):
        raise ValueError(f"need 2 <= min_terms <= max_terms (<= max_term when distinct), got "
                         f"min_terms={min_terms}, max_terms={max_terms}, max_term={max_term}")
    for _ in range(10_000):
        k = int(rng.integers(min_terms, max_terms + 1))
        if distinct:
            terms = tuple(int(t) + 1 for t in rng.choice(max_term, size=k, replace=False))
        else:
            terms = tuple(int(t) for t in rng.integers(1, max_term + 1, size=k))
        if split_of(terms) == split:
            return terms
    raise RuntimeError(f"no {split} problem found with max_term={max_term}; widen the task")


def make_problems(n: int, seed: int = 0, split: str = "train", min_terms: int = MIN_TERMS,
                  max_terms: int = MAX_TERMS, max_term: int = MAX_TERM,
                  distinct: bool = DISTINCT) -> list[Problem]:
    """`n` problems of `split` (ids 0..n-1), distinct prompts where the space allows; deterministic in
    `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        terms = sample_terms(rng, split, min_terms, max_terms, max_term, distinct)
        p = problem_from_terms(terms, id=len(out))
        tries += 1
        if p.prompt in seen and tries < 20 * n:  # avoid repeats unless the space is exhausted
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _render(steps: list[tuple[int, int]], total: int) -> str:
    return "".join(f"{a}+{b}={a + b}{STEP_SEP}" for a, b in steps) + f"{ANSWER_MARKER}{total}"


def _chain(order: Sequence[int]) -> str:
    steps, acc = [], order[0]
    for t in order[1:]:
        steps.append((acc, t))
        acc += t
    return _render(steps, acc)


def sample_trace(problem: Problem, rng=None) -> str:
    """One valid trace, uniform over the orders in which the terms are accumulated."""
    rng = _as_rng(rng)
    terms = problem.terms
    return _chain([terms[i] for i in rng.permutation(len(terms))])


def solution_traces(problem: Problem, rng=None, n: int = 1) -> list[str]:
    """`n` independently sampled valid traces (see `sample_trace`)."""
    rng = _as_rng(rng)
    return [sample_trace(problem, rng) for _ in range(n)]


def canonical_trace(problem: Problem) -> str:
    """The left-to-right trace: ``a+b=s1;s1+c=s2;...;#total``."""
    return _chain(problem.terms)


def all_traces(problem: Problem) -> list[str]:
    """Every distinct valid trace string of `problem` (at most 24 for 4 terms)."""
    return [t for t, _ in _order_counts(tuple(sorted(problem.terms)))]


def next_char_distributions(problem: Problem, response: str) -> list[dict[str, float]]:
    """For each position 0..len(response): the distribution of the next character when a trace is drawn
    uniformly over accumulation orders (as `sample_trace` does) conditioned on ``response[:i]``; the key
    ``""`` is the end of the response. An empty dict means the prefix has left every valid trace. This is
    what a perfect teacher predicts, and the soft target the tiny teacher is trained on."""
    counts = _order_counts(tuple(sorted(problem.terms)))
    out = []
    for i in range(len(response) + 1):
        prefix = response[:i]
        dist: dict[str, float] = {}
        for t, c in counts:
            if t.startswith(prefix):
                ch = t[i] if len(t) > i else ""
                dist[ch] = dist.get(ch, 0.0) + c
        z = sum(dist.values())
        out.append({k: v / z for k, v in dist.items()})
    return out


@lru_cache(maxsize=4096)
def _order_counts(terms: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for order in itertools.permutations(terms):
        t = _chain(order)
        counts[t] = counts.get(t, 0) + 1
    return tuple(sorted(counts.items()))


def branching(problem: Problem, response: str, include_end: bool = False) -> list[int]:
    """Per character of `response`: how many distinct options are valid there given the text before it,
    where ending the response counts as one option. >= 2 marks a decision point, 1 a determined position,
    0 a position whose prefix has already left every valid trace. With `include_end`, one more entry is
    appended for the position after the response (where the end-of-sequence token goes)."""
    dists = next_char_distributions(problem, response)
    return [len(d) for d in dists[: len(response) + (1 if include_end else 0)]]


def is_valid_trace(problem: Problem, response: str) -> bool:
    """True if `response` (stripped of anything after the answer) is exactly one of the valid traces."""
    m = _ANSWER_RE.search(response)
    return m is not None and response[: m.end()] in set(all_traces(problem))


def extract_answer(response: str) -> str | None:
    """The digits right after the first ``#`` (anything after them is ignored: a model that does not stop
    may babble on); None when there is no ``#`` followed by a digit."""
    m = _ANSWER_RE.search(response)
    return m.group(1) if m else None


def grade(response: str, answer: str) -> bool:
    """Exact match of the extracted answer with `answer`; a response with no ``#<digits>`` is wrong."""
    got = extract_answer(response)
    return got is not None and got == str(answer).strip()


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """One ``{"id": ..., "prompt": ..., "answer": ...}`` object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Problem]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(prompt=r["prompt"], answer=str(r["answer"]), id=int(r["id"])) for r in rows]


__all__ = [
    "Problem", "make_problems", "sample_terms", "split_of", "problem_from_terms",
    "sample_trace", "solution_traces", "canonical_trace", "all_traces", "next_char_distributions",
    "branching", "is_valid_trace", "extract_answer", "grade", "write_jsonl", "read_jsonl",
]
