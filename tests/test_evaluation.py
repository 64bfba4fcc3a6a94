"""Pass@k against brute-force subset enumeration; Avg@k; entropy fraction; answer grading."""

import itertools

import numpy as np
import pytest

from eopd_ray.evaluation import grade, grade_response, high_entropy_fraction, pass_at_k, summarize_correct


def brute_pass_at_k(outcomes, k):
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_correct():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    s = summarize_correct(correct, k=4)
    assert s["avg_at_k"] == pytest.approx(5 / 12)
    assert s["pass_at_k"] == pytest.approx(2 / 3)
    s1 = summarize_correct(correct, k=1)
    assert s1["pass_at_k"] == pytest.approx(s["avg_at_k"])  # Pass@1 estimator equals mean accuracy


def test_high_entropy_fraction():
    assert high_entropy_fraction([np.array([0.1, 1.0, 2.0]), np.array([0.99])], 1.0) == pytest.approx(0.5)
    assert high_entropy_fraction([], 1.0) == 0.0


def test_grade_response_dispatch():
    assert grade_response(r"... \boxed{12}.", "12") and grade(r"\boxed{12.0}", "12")
    assert not grade_response(r"\boxed{13}", "12")
    assert grade_response("3+4=7;7+5=12;#12", "12")  # the synthetic task's answer marker
    assert not grade_response("3+4=7;#7", "12")
