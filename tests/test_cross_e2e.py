"""teacher.tokenizer=cross through the whole job (Ray, DeepSpeed, the transformers engine): a teacher whose
tokenizer is the tiny teacher's with its ids shuffled must train the student exactly as the tiny teacher does
through the same-tokenizer path, and the same-tokenizer path must refuse it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cross_models import build_permuted_teacher
from tests.test_e2e_ray import final_weights, run_job

pytestmark = pytest.mark.e2e
BOTH = ["trainer.max_steps=2", "teacher.prompt_template=teacher", "eval.teacher=false"]


@pytest.fixture(scope="module")
def permuted(tiny_models, tmp_path_factory):
    return str(build_permuted_teacher(tiny_models[0], tmp_path_factory.mktemp("permuted")))


def test_a_permuted_teacher_through_the_cross_path_reproduces_the_shared_run(tmp_path, tiny_models, permuted):
    teacher, student = tiny_models
    run_job(tmp_path / "shared", tiny_models, *BOTH)
    proc = run_job(tmp_path / "cross", (permuted, student), *BOTH, "teacher.tokenizer=cross")
    a, b = final_weights(tmp_path / "shared"), final_weights(tmp_path / "cross")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    from safetensors.torch import load_file

    initial = load_file(f"{student}/model.safetensors")
    assert any(not torch.equal(initial[k], b[k]) for k in initial)
    rows = [json.loads(line) for line in (tmp_path / "cross" / "metrics.jsonl").read_text().splitlines()]
    assert [r["cross/aligned_fraction"] for r in rows if "cross/aligned_fraction" in r] == [1.0, 1.0]
    shared = json.loads((tmp_path / "shared" / "results.json").read_text())["eval"]
    cross = json.loads((tmp_path / "cross" / "results.json").read_text())["eval"]
    for name in ("student", "student_initial"):
        f = cross[name]["fidelity"]
        assert f["estimator"] == "sequence" and f["teacher_tokens"] == f["response_tokens"]
        # the same characters as one token each on both sides: the teacher's NLL per token is the shared one
        assert f["teacher_nll"] == pytest.approx(shared[name]["fidelity"]["teacher_nll"], abs=1e-4)
    assert "whole responses, per teacher token" in proc.stdout


def test_the_shared_path_refuses_the_permuted_teacher_and_names_cross(tmp_path, tiny_models, permuted):
    proc = run_job(tmp_path / "o", (permuted, tiny_models[1]), *BOTH, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "teacher.tokenizer=cross" in proc.stderr and "tokenizers differ" in proc.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()
