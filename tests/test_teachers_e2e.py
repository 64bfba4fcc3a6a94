"""Two teachers through the whole job (Ray, DeepSpeed, the transformers engine): the tiny teacher through the
shared path and the same teacher with shuffled token ids through the cross-tokenizer path, each scoring the
prompts routed to it. Both give the tiny teacher's statistics, so the student must train exactly as with the
one shared teacher; the metrics and the held-out fidelity come per teacher."""

from __future__ import annotations

import json

import pytest

from tests.cross_models import build_permuted_teacher
from tests.test_e2e_ray import SMALL, final_weights, run_job

pytestmark = pytest.mark.e2e
BOTH = ["trainer.max_steps=2", "teacher.prompt_template=teacher", "eval.teacher=false"]


def test_a_shared_and_a_cross_teacher_reproduce_the_one_teacher_run(tmp_path, tiny_models):
    teacher, student = tiny_models
    permuted = build_permuted_teacher(teacher, tmp_path / "permuted")
    run_job(tmp_path / "one", tiny_models, *BOTH)
    two = f"teachers=[{{name: plain, model: {teacher}}}, {{name: shuffled, model: {permuted}, tokenizer: cross}}]"
    proc = run_job(tmp_path / "two", tiny_models, *BOTH, two)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert "1 + 2 teacher" not in proc.stdout and "teacher_shuffled" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for row, ref in zip(rows, one):
        assert row["teacher/plain/tokens"] + row["teacher/shuffled/tokens"] == row["teacher/tokens"] == ref["teacher/tokens"]
        assert row["teacher/plain/tokens"] > 0 and row["teacher/shuffled/tokens"] > 0
        assert row["teacher/shuffled/cross_aligned_fraction"] == 1.0
        assert "teacher/plain/cross_aligned_fraction" not in row
        assert row["gate/fraction"] == pytest.approx(ref["gate/fraction"], abs=1e-6)
    results = json.loads((tmp_path / "two" / "results.json").read_text())["eval"]
    problems = int(next(x for x in SMALL if x.startswith("data.num_eval_problems")).split("=")[1])
    for name in ("student", "student_initial"):
        by = results[name]["fidelity_by_teacher"]
        assert set(by) == {"plain", "shuffled"}
        assert by["plain"]["problems"] + by["shuffled"]["problems"] == problems
        assert by["shuffled"]["estimator"] == "sequence" and by["plain"].get("estimator") != "sequence"
    assert "fidelity to plain" in proc.stdout and "fidelity to shuffled" in proc.stdout
