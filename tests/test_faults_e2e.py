"""Fault tolerance through Ray: a killed rollout worker is replaced in place, other killed workers are rebuilt
from the last checkpoint, and the run ends as if nothing happened; a recurring fault stops the run with a
clear error and keeps the last good checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch

from test_e2e_ray import final_weights, run_job

pytestmark = pytest.mark.e2e
ARGS = ["trainer.max_steps=4", "trainer.save_every=2", "eval.enabled=false"]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("clean") / "run"
    run_job(out, tiny_models, *ARGS)
    return out


def _faults(tmp_path, faults, monkeypatch):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(faults))
    monkeypatch.setenv("EOPD_FAULT_INJECT", str(path))
    return path


def test_killed_rollout_and_student_workers_are_recovered(tmp_path, tiny_models, clean_run, monkeypatch):
    # The only rollout worker dies in step 3: a replacement joins with the current weights and redoes the
    # step's sampling (no replay). A student rank dies too: every actor is rebuilt and the steps since the
    # last checkpoint are replayed.
    path = _faults(tmp_path, [{"role": "rollout", "call": 3}, {"role": "student", "call": 2}], monkeypatch)
    out = tmp_path / "faulty"
    proc = run_job(out, tiny_models, *ARGS)
    assert json.loads(path.read_text()) == []  # both faults fired
    log = proc.stdout + proc.stderr
    assert log.count("[fault]") == 1  # the student death; the rollout death needed no rebuild
    assert "[elastic] 1 rollout worker(s) left" in log and "[elastic] 1 rollout worker(s) joined; 1 working" in log
    a = json.loads((clean_run / "results.json").read_text())["train"]["metrics"]
    b = json.loads((out / "results.json").read_text())["train"]["metrics"]
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # no step lost, none logged twice
    for ra, rb in zip(a, b):
        assert rb["loss/total"] == pytest.approx(ra["loss/total"], rel=1e-5, abs=1e-7)
    wa, wb = final_weights(clean_run), final_weights(out)
    for k in wa:  # no update applied twice or lost
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_a_worker_lost_during_the_rebuild_is_caught_and_rebuilt_again(tmp_path, tiny_models, clean_run, monkeypatch):
    """A student rank dies in step 3; its replacement dies too, while loading step 2's checkpoint (a second
    node lost while the replacements start). Both losses count as restarts, the second rebuild succeeds, and
    the run ends with the uninterrupted run's weights."""
    path = _faults(tmp_path, [{"role": "student", "call": 3}, {"role": "student_load", "call": 1}], monkeypatch)
    out = tmp_path / "twice"
    proc = run_job(out, tiny_models, *ARGS)
    assert json.loads(path.read_text()) == []  # both fired
    log = proc.stdout + proc.stderr
    assert re.search(r"\[fault\] \w+ at step 3: .* restart 1/3: rebuilding the actors from \S+step_000002", log)
    assert re.search(r"\[fault\] \w+ while rebuilding for step 3: .* restart 2/3: rebuilding the actors from "
                     r"\S+step_000002", log)
    assert log.count("[fault]") == 2
    assert [r["step"] for r in json.loads((out / "results.json").read_text())["train"]["metrics"]] == [1, 2, 3, 4]
    wa, wb = final_weights(clean_run), final_weights(out)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_killed_zero3_teacher_worker_is_recovered(tmp_path, tiny_models, clean_run, monkeypatch):
    """One of two ZeRO-3 teacher workers dies in step 3 while its peer waits in a collective: the group is
    rebuilt from the last checkpoint and the run ends with the uninterrupted run's losses and weights."""
    path = _faults(tmp_path, [{"role": "teacher", "call": 3}], monkeypatch)
    out = tmp_path / "zero3"
    proc = run_job(out, tiny_models, *ARGS, "teacher.num_workers=2", "teacher.zero_stage=3",
                   "teacher.zero3_persistence_threshold=0")
    assert json.loads(path.read_text()) == []
    assert (proc.stdout + proc.stderr).count("[fault]") == 1
    a = json.loads((clean_run / "results.json").read_text())["train"]["metrics"]
    b = json.loads((out / "results.json").read_text())["train"]["metrics"]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss/total"] == pytest.approx(ra["loss/total"], rel=1e-5, abs=1e-7)
    wa, wb = final_weights(clean_run), final_weights(out)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_recurring_fault_stops_with_a_clear_error(tmp_path, tiny_models, monkeypatch):
    _faults(tmp_path, [{"role": "teacher", "call": 3}] + [{"role": "teacher", "call": 1}] * 3, monkeypatch)
    out = tmp_path / "doomed"
    proc = run_job(out, tiny_models, *ARGS, "trainer.max_restarts=2", check=False)
    assert proc.returncode != 0
    assert "3 actor failures (trainer.max_restarts=2)" in proc.stderr
    assert "step_000002" in proc.stderr  # names the last good checkpoint, which is still there and complete
    from eopd_ray import checkpoint

    assert checkpoint.latest(out / "checkpoints").name == "step_000002"
