"""The entropy analysis script on tiny models (no Ray): its figures and numbers are consistent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_analysis_on_tiny_models(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "analysis"
    cmd = [sys.executable, str(ROOT / "examples" / "analyze_entropy.py"), "--out", str(out), "--teacher", teacher,
           "--students", f"a={student},same_as_teacher={teacher}", "--limit", "6", "--n", "2", "--max-new-tokens", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "analysis.json").read_text())["results"]
    assert set(res) == {"teacher", "a", "same_as_teacher"}
    for r in res.values():
        assert 0 <= r["high_entropy_fraction"] <= 1 and r["tokens"] > 0
    # A "student" identical to the teacher has zero forward KL to it where the KL is renormalised over the
    # teacher's top-k only if k covers its support; in general it is -log(top-k mass) >= 0, and it must be
    # smaller than that of a different model.
    assert res["same_as_teacher"]["fkl_high_entropy"] >= 0
    assert res["same_as_teacher"]["fkl_high_entropy"] < res["a"]["fkl_high_entropy"]
    assert (out / "entropy_hist.png").stat().st_size > 5_000
