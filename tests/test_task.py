"""The embedded task: valid traces, every order reachable, disjoint splits, strict grading, JSONL I/O."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from eopd_ray import task as T


def check_trace(problem: T.Problem, trace: str) -> None:
    """Independent checker: each step is acc+term=sum, every term used once, answer = total."""
    body, answer = trace.split("#")
    steps = body.rstrip(";").split(";")
    assert len(steps) == len(problem.terms) - 1
    used, acc = [], None
    for step in steps:
        lhs, result = step.split("=")
        a, b = (int(x) for x in lhs.split("+"))
        assert a + b == int(result), step
        if acc is None:
            used += [a, b]
        else:
            assert a == acc, step  # the running sum comes first
            used.append(b)
        acc = int(result)
    assert Counter(used) == Counter(problem.terms)
    assert answer == str(sum(problem.terms)) == problem.answer == str(acc)


def test_sampled_traces_are_valid():
    rng = np.random.default_rng(0)
    for p in T.make_problems(200, seed=1) + T.make_problems(50, seed=1, distinct=False):
        for trace in T.solution_traces(p, rng, n=3) + [T.canonical_trace(p)]:
            check_trace(p, trace)
            assert T.is_valid_trace(p, trace) and T.grade(trace, p.answer)
            assert len(trace) <= 32


def test_every_order_is_reachable_and_uniform():
    p = T.problem_from_terms([3, 5, 2])
    counts = Counter(T.sample_trace(p, rng) for rng in [np.random.default_rng(0)] for _ in range(1200))
    assert set(counts) == set(T.all_traces(p)) and len(counts) == 6  # 3! orders
    assert min(counts.values()) > 150  # about 200 each
    assert len(T.all_traces(T.problem_from_terms([1, 2, 3, 4]))) == 24


def test_canonical_trace_and_examples():
    p = T.problem_from_terms([3, 5, 2])
    assert p.prompt == "3+5+2=" and p.answer == "10" and p.prompt == "3+5+2="
    assert T.canonical_trace(p) == "3+5=8;8+2=10;#10"
    assert "5+2=7;7+3=10;#10" in T.all_traces(p)
    assert T.extract_answer(T.canonical_trace(p)) == "10"


def test_next_char_distributions_match_the_choices():
    p = T.problem_from_terms([3, 5, 2, 7])
    trace = "3+5=8;8+2=10;10+7=17;#17"
    dists = T.next_char_distributions(p, trace)
    assert len(dists) == len(trace) + 1 and all(math.isclose(sum(d.values()), 1.0) for d in dists)
    assert dists[0] == pytest.approx({"2": 0.25, "3": 0.25, "5": 0.25, "7": 0.25})
    assert dists[2] == pytest.approx({"2": 1 / 3, "5": 1 / 3, "7": 1 / 3})
    assert dists[-1] == {"": 1.0}
    branching = T.branching(p, trace, include_end=True)
    assert [i for i, b in enumerate(branching) if b > 1] == [0, 2, 8]  # 4, 3 and 2 choices
    assert sorted(b for b in branching if b > 1) == [2, 3, 4]
    assert T.branching(p, "3+6=9;", include_end=False)[3:] == [0, 0, 0]  # left every valid trace
    # a repeated term: the choice is between values, weighted by orders
    assert T.next_char_distributions(T.problem_from_terms([3, 3, 2]), "3+")[-1] == pytest.approx(
        {"3": 0.5, "2": 0.5})


def test_train_and_test_are_disjoint_and_deterministic():
    train = T.make_problems(2000, seed=0, split="train")
    test = T.make_problems(300, seed=0, split="test")
    key = lambda p: tuple(sorted(p.terms))  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert all(T.split_of(p.terms) == "test" for p in test)
    assert [p.id for p in test] == list(range(300))
    assert len({p.prompt for p in test}) == 300  # no repeats while the space allows
    assert all(len(set(p.terms)) == len(p.terms) and 3 <= len(p.terms) <= 4 for p in test)
    assert test == T.make_problems(300, seed=0, split="test")
    assert test != T.make_problems(300, seed=1, split="test")
    with pytest.raises(ValueError, match="split='dev' is invalid"):
        T.make_problems(3, split="dev")


@pytest.mark.parametrize("response, answer, ok", [
    ("3+5=8;8+2=10;#10", "10", True),
    ("3+5=8;8+2=10;#10;#11 junk", "10", True),  # anything after the first answer is ignored
    ("3+5=8;8+2=10;#10<eos><pad>", "10", True),
    ("3+5=8;8+2=10;#10", "11", False),
    ("3+5=8;8+2=10;#100", "10", False),  # exact, not a prefix match
    ("3+5=8;8+2=10;", "10", False),  # no final answer
    ("3+5=8;8+2=10;#", "10", False),
    ("10", "10", False),
    ("", "10", False),
])
def test_grade(response, answer, ok):
    assert T.grade(response, answer) is ok


def test_jsonl_round_trip(tmp_path):
    problems = T.make_problems(20, seed=3, split="test")
    path = T.write_jsonl(problems, tmp_path / "sub" / "test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(rows[0]) == {"id", "prompt", "answer"} and rows[0]["id"] == 0
    assert T.read_jsonl(path) == problems
