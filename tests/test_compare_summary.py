"""The comparison's summary over seeds (eopd_ray/comparison.py): means, sample standard deviations, the table."""

from __future__ import annotations

import numpy as np
import pytest

from eopd_ray import comparison as cm


def _run(avg, pas, frac, fkl, wall):
    ev = {"student": {"avg_at_k": avg, "pass_at_k": pas, "high_entropy_fraction": frac, "k": 8},
          "teacher": {"avg_at_k": 0.9, "pass_at_k": 1.0, "high_entropy_fraction": 0.07},
          "student_initial": {"avg_at_k": avg / 2, "pass_at_k": 0.5, "high_entropy_fraction": 0.4}}
    return {"eval": ev, "train": {"metrics": [{"fkl/high_entropy_mean": fkl, "student/entropy": 0.5}]}, "wall_s": wall}


def test_mean_and_sample_std_over_seeds():
    runs = [_run(0.2, 0.8, 0.19, 1.0, 30), _run(0.3, 0.9, 0.21, None, 40), _run(0.25, 0.7, float("nan"), 1.2, 50)]
    s = cm.summarize({"eopd": runs, "opd": runs[:1]})
    e = s["methods"]["eopd"]
    assert e["seeds"] == 3 and e["avg_at_k"] == pytest.approx(0.25)
    assert e["avg_at_k_std"] == pytest.approx(np.std([0.2, 0.3, 0.25], ddof=1))
    assert e["high_entropy_fraction"] == pytest.approx(0.20)  # the NaN run (no entropy) is left out
    assert e["fkl_high_entropy_final"] == pytest.approx(1.1)  # so is the missing value
    assert "avg_at_k_std" not in s["methods"]["opd"] and s["methods"]["opd"]["avg_at_k"] == 0.2
    # References: one per seed (every method's run of a seed evaluates them identically), not one per run.
    assert s["student_initial"]["avg_at_k"] == pytest.approx(0.125)
    assert s["student_initial"]["avg_at_k_std"] == pytest.approx(np.std([0.1, 0.15, 0.125], ddof=1))
    table = cm.markdown(s, "cmd")
    assert "over 3 seeds" in table and "| EOPD | 0.250 ± 0.050 |" in table and "| OPD | 0.200 |" in table
