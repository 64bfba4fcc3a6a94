"""Elastic runs through Ray (issue 6): a checkpoint made with N rollout workers and M student ranks resumes
with other N and M, and rollout workers may leave and join while the loop runs."""

from __future__ import annotations

import json

import pytest
import torch

from test_e2e_ray import final_weights, run_job

pytestmark = pytest.mark.e2e
# Batch 6 splits over 1, 2 or 3 rollout workers; mini-batch 2 over 1 or 2 student ranks.
ARGS = ["trainer.max_steps=4", "trainer.batch_size=6", "trainer.mini_batch_size=2", "eval.enabled=false",
        "trainer.lr=1e-3"]
BIG = ["rollout.num_workers=2", "trainer.num_ranks=2", "trainer.zero_stage=2"]


def _metrics(out):
    return json.loads((out / "results.json").read_text())["train"]["metrics"]


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory, tiny_models):
    """An uninterrupted run with 2 rollout workers and 2 ZeRO-2 ranks, and one stopped after step 2."""
    root = tmp_path_factory.mktemp("elastic")
    full, part = root / "full", root / "part"
    run_job(full, tiny_models, *ARGS, *BIG)
    run_job(part, tiny_models, *ARGS, *BIG, "--stop-after", "2")
    return full, part


def _resume_copy(part, tmp_path):
    import shutil

    dst = tmp_path / "resumed"
    shutil.copytree(part, dst)
    return dst


def test_fewer_student_ranks_continue_exactly(big_runs, tmp_path, tiny_models):
    # Same rollout workers (so the same samples), 1 rank at ZeRO-0 instead of 2 at ZeRO-2: the resumed steps
    # and final weights equal the uninterrupted run's (one rank's loss equals the sum over two).
    full, part = big_runs
    out = _resume_copy(part, tmp_path)
    # run_job's own small defaults come first: ARGS restores this run's values after them.
    proc = run_job(out, tiny_models, *ARGS, "--resume", str(out), "trainer.num_ranks=1", "trainer.zero_stage=0")
    assert "resuming from" in proc.stdout and "step 2" in proc.stdout
    a, b = _metrics(full), _metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        assert (rb["data/epoch"], rb["data/position"]) == (ra["data/epoch"], ra["data/position"])
        for key in ("loss/total", "loss/fkl", "optim/lr", "rollout/response_length"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = final_weights(full), final_weights(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.parametrize("workers,ranks", [(1, 1), (3, 2)])
def test_other_rollout_worker_counts_continue_from_the_right_step(big_runs, tmp_path, tiny_models, workers, ranks):
    full, part = big_runs
    out = _resume_copy(part, tmp_path)
    run_job(out, tiny_models, *ARGS, "--resume", str(out), f"rollout.num_workers={workers}",
            f"trainer.num_ranks={ranks}")
    a, b = _metrics(full), _metrics(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["rollout/workers"] for r in b] == [2, 2, workers, workers]
    for ra, rb in zip(a, b):  # the same prompts in the same order: data position and lr follow the step
        assert (rb["data/epoch"], rb["data/position"]) == (ra["data/epoch"], ra["data/position"])
        assert rb["optim/lr"] == pytest.approx(ra["optim/lr"], rel=1e-9)
    assert b[1]["loss/total"] == pytest.approx(a[1]["loss/total"], rel=1e-5)  # before the resume: the same run
    assert json.loads((out / "config.json").read_text())["rollout"]["num_workers"] == workers


def test_rollout_workers_leave_and_join_while_the_loop_runs(tmp_path, tiny_models, monkeypatch):
    # One of 2 rollout workers dies in step 2: the step is redone by the survivor, and a replacement joins
    # (with the current weights) before step 3. No restart from a checkpoint, no step lost.
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"role": "rollout", "call": 2}]))
    monkeypatch.setenv("EOPD_FAULT_INJECT", str(faults))
    out = tmp_path / "run"
    # One update per step, so the PPO ratio is exactly 1 unless a worker sampled with stale weights.
    proc = run_job(out, tiny_models, *ARGS, "rollout.num_workers=2", "trainer.mini_batch_size=6",
                   "rollout.join_wait_s=300")
    log = proc.stdout + proc.stderr
    assert json.loads(faults.read_text()) == []
    assert "[elastic] 1 rollout worker(s) left at step 2; 1 still working" in log
    assert "[elastic] 1 rollout worker(s) joined; 2 working" in log
    assert "[fault]" not in log  # handled without rebuilding the actors
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["rollout/workers"] for r in rows] == [2, 1, 2, 2]
    assert all(r["train/tokens"] > 0 for r in rows)
    # The joined worker samples with the trained weights: with one update per step the ratio pi/pi_old is 1
    # on every token only if every worker's behaviour log-probs came from the current student.
    for r in rows:
        assert r["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-4), r["step"]
    assert final_weights(out)  # finished and checkpointed


def test_a_rollout_worker_lost_during_evaluation_is_replaced(tmp_path, tiny_models, monkeypatch):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"role": "rollout_eval", "call": 2}]))  # in the initial student's evaluation
    monkeypatch.setenv("EOPD_FAULT_INJECT", str(faults))
    out = tmp_path / "run"
    proc = run_job(out, tiny_models, "trainer.max_steps=1", "rollout.num_workers=2")
    log = proc.stdout + proc.stderr
    assert json.loads(faults.read_text()) == []
    assert "[elastic] 1 rollout worker(s) left during evaluation; 1 still working" in log
    results = json.loads((out / "results.json").read_text())
    assert set(results["eval"]) == {"teacher", "student_initial", "student"}
    for ev in results["eval"].values():
        assert 0 <= ev["avg_at_k"] <= ev["pass_at_k"] <= 1
