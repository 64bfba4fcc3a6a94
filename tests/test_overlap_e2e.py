"""rollout.overlap end to end: the next step's batch is generated while the student trains, one step off policy;
a resumed run equals an uninterrupted one, and the overlapped mode trains."""

from __future__ import annotations

import json

import pytest
import torch

from test_e2e_ray import final_weights, run_job

pytestmark = pytest.mark.e2e

ONE_UPDATE = ["trainer.mini_batch_size=8"]  # one optimizer update per step: a fresh batch has ratio 1 exactly


def _metrics(out):
    return json.loads((out / "results.json").read_text())["train"]["metrics"]


def test_overlapped_resume_matches_uninterrupted_and_runs_one_step_off_policy(tmp_path, tiny_models):
    args = ["trainer.max_steps=4", "eval.enabled=false", "rollout.overlap=true", *ONE_UPDATE]
    full, part = tmp_path / "full", tmp_path / "part"
    run_job(full, tiny_models, *args)
    run_job(part, tiny_models, *args, "--stop-after", "2")
    ckpt = part / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "driver_state.json").read_text())
    assert state["ahead"]["step"] == 2 and list((ckpt / "rollouts_ahead").glob("rollout_*.arrow"))
    proc = run_job(part, tiny_models, "--resume", str(part), *ONE_UPDATE)  # run_job re-applies its SMALL args
    assert "resuming from" in proc.stdout
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):  # the resumed run trains on the very batch generated ahead before the stop
        for key in ("loss/total", "loss/fkl", "rollout/response_length", "rollout/tokens", "pg/ratio_mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = final_weights(full), final_weights(part)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    # Step 1's batch comes from the weights being trained (ratio 1 up to float32 rounding); every later batch
    # from the weights before the previous update, so the ratio moves off 1 and the run differs from the
    # synchronous one from step 2 on.
    assert abs(a[0]["pg/ratio_mean"] - 1) < 1e-5
    assert max(abs(r["pg/ratio_mean"] - 1) for r in a[1:]) > 1e-3
    sync = run_job(tmp_path / "sync", tiny_models, "trainer.max_steps=2", "eval.enabled=false", *ONE_UPDATE)
    assert "resolved config" in sync.stdout
    s = _metrics(tmp_path / "sync")
    assert s[0]["loss/total"] == pytest.approx(a[0]["loss/total"], rel=1e-6)
    assert abs(s[1]["pg/ratio_mean"] - 1) < 1e-5
    assert s[1]["loss/total"] != pytest.approx(a[1]["loss/total"], rel=1e-4)


@pytest.fixture(scope="module")
def embedded_models():
    """The embedded default pair (the test pair's student is too weak to solve any problem): built once per
    machine into the same cache the default job uses (about 2 minutes on 2 cores), then reused."""
    from eopd_ray.tiny_models import ensure_tiny_models

    teacher, student = ensure_tiny_models(progress=False)
    return str(teacher), str(student)


def test_overlapped_mode_trains_the_student(tmp_path, embedded_models):
    out = tmp_path / "run"
    run_job(out, embedded_models, "rollout.overlap=true", "trainer.max_steps=16", "trainer.batch_size=32",
            "trainer.mini_batch_size=8", "rollout.max_new_tokens=40", "data.num_train_problems=1024",
            "data.num_eval_problems=32", "eval.k=4", "eval.teacher=false")
    ev = json.loads((out / "results.json").read_text())["eval"]
    trained, initial = ev["student"], ev["student_initial"]
    assert trained["avg_at_k"] > initial["avg_at_k"] + 0.05, (trained, initial)
    assert trained["high_entropy_fraction"] < initial["high_entropy_fraction"]
