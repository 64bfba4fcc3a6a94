"""End to end through Ray on CPU with tiny models: the main job, resume, several ranks, `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_eopd.py"
pytestmark = pytest.mark.e2e

SMALL = ["trainer.batch_size=8", "trainer.mini_batch_size=4", "rollout.max_new_tokens=24",
         "data.num_train_problems=64", "data.num_eval_problems=6", "eval.k=2"]


def run_job(tmp_out, tiny_models, *args, check=True, timeout=600):
    teacher, student = tiny_models
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_out), f"model.teacher={teacher}",
           f"model.student={student}", *SMALL, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"train_eopd.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _env():
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"))
    return load_file(str(ckpts[-1] / "hf" / "model.safetensors"))


def test_two_iterations_write_everything(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = run_job(out, tiny_models, "trainer.max_steps=2", "rollout.num_workers=2")
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps_done"] == 2 and len(results["train"]["metrics"]) == 2
    row = results["train"]["metrics"][0]
    for key in ("loss/total", "loss/pg", "loss/fkl", "gate/fraction", "teacher/entropy", "student/entropy",
                "fkl/gated_mean", "rollout/accuracy", "time/rollout", "time/score", "time/train", "time/sync"):
        assert key in row and np.isfinite(row[key]), key
    for r in results["train"]["metrics"]:  # two rollout workers: their counts are summed, not averaged
        assert r["rollout/responses"] == 8 and r["rollout/tokens"] == r["teacher/tokens"] == r["train/tokens"] > 0
    assert results["config"]["loss"]["objective"] == "eopd"
    for name in ("teacher", "student_initial", "student"):
        ev = results["eval"][name]
        assert ev["k"] == 2 and 0 <= ev["avg_at_k"] <= ev["pass_at_k"] <= 1
        assert 0 <= ev["high_entropy_fraction"] <= 1
    ckpt = sorted((out / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpt] == ["step_000002"] and (ckpt[0] / "MANIFEST.json").exists()
    AutoModelForCausalLM.from_pretrained(ckpt[0] / "hf")  # HF format, safetensors
    for png in ("training_curves.png", "entropy_hist.png"):
        assert (out / png).stat().st_size > 10_000
    assert (out / "config.yaml").exists()
    assert "resolved config" in proc.stdout and "EOPD" in proc.stderr  # printed config, progress bar


def test_resume_matches_uninterrupted_run(tmp_path, tiny_models):
    args = ["trainer.max_steps=4", "eval.enabled=false"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_job(full, tiny_models, *args)
    run_job(part, tiny_models, *args, "--stop-after", "2")
    assert not (part / "results.json").exists()
    assert sorted(p.name for p in (part / "checkpoints").glob("step_*")) == ["step_000002"]
    proc = run_job(part, tiny_models, "--resume", str(part))
    assert "resuming from" in proc.stdout and "step 2" in proc.stdout
    a = json.loads((full / "results.json").read_text())["train"]["metrics"]
    b = json.loads((part / "results.json").read_text())["train"]["metrics"]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/fkl", "rollout/response_length", "optim/lr", "gate/fraction"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = final_weights(full), final_weights(part)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_two_student_ranks_zero2_match_one_rank(tmp_path, tiny_models):
    common = ["trainer.max_steps=1", "eval.enabled=false", "trainer.lr=1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_job(one, tiny_models, *common)
    run_job(two, tiny_models, *common, "trainer.num_ranks=2", "trainer.zero_stage=2")
    a = json.loads((one / "results.json").read_text())["train"]["metrics"][0]
    b = json.loads((two / "results.json").read_text())["train"]["metrics"][0]
    for key in ("loss/total", "loss/pg", "loss/fkl", "gate/fraction", "student/entropy", "train/tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert b["optim/grad_norm"] == pytest.approx(a["optim/grad_norm"], rel=1e-4)
    wa, wb = final_weights(one), final_weights(two)
    diffs = [float((wa[k] - wb[k]).abs().max()) for k in wa]
    assert max(diffs) < 1e-5


def test_zero3_teacher_group_matches_one_whole_teacher(tmp_path, tiny_models):
    """Two ZeRO-3 teacher workers (parameters partitioned over gloo) scoring 2 + 1 rollout shards in step give
    the training the same teacher statistics as one whole teacher scoring all three."""
    common = ["trainer.max_steps=2", "rollout.num_workers=3"]
    one, two = tmp_path / "one", tmp_path / "zero3"
    run_job(one, tiny_models, *common, "eval.enabled=false")
    proc = run_job(two, tiny_models, *common, "teacher.num_workers=2", "teacher.zero_stage=3",
                   "teacher.zero3_persistence_threshold=0", "eval.teacher=false")
    assert "ZeRO-3 inference, each of the 2 workers holds 1/2" in proc.stdout  # the plan says so
    evaluated = json.loads((two / "results.json").read_text())["eval"]
    assert sorted(evaluated) == ["student", "student_initial"]  # eval.teacher=false: the teacher is not loaded
    a = json.loads((one / "results.json").read_text())["train"]["metrics"]
    b = json.loads((two / "results.json").read_text())["train"]["metrics"]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/total", "loss/pg", "loss/fkl", "gate/fraction", "teacher/entropy",
                    "teacher/entropy_rollout", "teacher/high_entropy_fraction"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_local_head(tmp_path, tiny_models):
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        ray_bin = "ray"
    port, dash = _free_port(), _free_port()
    env = _env()
    # A head of our own (--block, own temp dir), stopped by signalling it: `ray stop` would kill every Ray on
    # the machine, and the default temp dir would let other drivers here find and join this head.
    temp_dir = tempfile.mkdtemp(prefix="eopd_ray_", dir="/tmp")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--num-cpus=8", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        teacher, student = tiny_models
        out = tmp_path / "job"
        cmd = [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
               sys.executable, str(SCRIPT), "--out", str(out), f"model.teacher={teacher}",
               f"model.student={student}", *SMALL, "trainer.max_steps=1", "eval.enabled=false"]
        deadline = time.time() + 180
        while True:  # the job server needs a moment after `ray start`
            assert head.poll() is None, f"ray start exited {head.returncode}: {head.stderr.read()[-3000:]}"
            job = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
            if job.returncode == 0 or time.time() > deadline or "succeeded" in job.stdout:
                break
            if "Connection" not in job.stderr + job.stdout:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        results = json.loads((out / "results.json").read_text())
        assert results["train"]["steps_done"] == 1
    finally:
        head.terminate()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_every_baseline_runs_two_steps_and_compares(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "compare"
    cmd = [sys.executable, str(ROOT / "examples" / "compare_methods.py"), "--out", str(out),
           f"model.teacher={teacher}", f"model.student={student}", *SMALL, "trainer.max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["methods"]) == ["kd", "grpo", "opd", "entropy_bonus", "advantage_shaping", "full_fkl",
                                        "random_fkl", "eopd"]
    runs = {m: json.loads((out / m / "results.json").read_text()) for m in summary["methods"]}
    for method, row in summary["methods"].items():
        run = runs[method]
        assert run["config"]["loss"]["objective"] == method and run["train"]["steps_done"] == 2
        # the table is each run's own evaluation of its trained student, not another run's or a default
        assert row["avg_at_k"] == pytest.approx(run["eval"]["student"]["avg_at_k"], abs=1e-12), method
        assert row["pass_at_k"] == pytest.approx(run["eval"]["student"]["pass_at_k"], abs=1e-12), method
        assert 0 <= row["avg_at_k"] <= row["pass_at_k"] <= 1
    # What sets each method apart shows in its metrics, step by step.
    gates = {m: [r["gate/fraction"] for r in runs[m]["train"]["metrics"]] for m in runs}
    for m in ("kd", "full_fkl"):  # the forward KL at every position
        assert gates[m] == [1.0, 1.0], m
    for m in ("grpo", "opd", "entropy_bonus", "advantage_shaping"):  # no forward KL anywhere
        assert gates[m] == [0.0, 0.0], m
        assert all(r["loss/fkl"] == 0.0 for r in runs[m]["train"]["metrics"]), m
    for r in runs["eopd"]["train"]["metrics"]:  # the gate is exactly the teacher's high-entropy positions
        assert r["gate/fraction"] == pytest.approx(r["gate/high_entropy_fraction"], abs=1e-12)
    for r in runs["random_fkl"]["train"]["metrics"]:  # a random gate: it fires somewhere, not everywhere
        assert 0 < r["gate/fraction"] < 1
    # kd samples from the teacher: its behaviour log-probs are the teacher's, so the reverse-KL estimate is
    # float noise; an on-policy student (far from the teacher) has a clearly positive one
    assert all(abs(r["kl/reverse"]) < 1e-4 for r in runs["kd"]["train"]["metrics"])
    assert all(r["kl/reverse"] > 1e-2 for r in runs["opd"]["train"]["metrics"])
    grpo = runs["grpo"]
    assert grpo["config"]["rollout"]["n_samples_per_prompt"] == 8
    assert all(r["rollout/responses"] == 8 * 8 and r["train/tokens"] > 0 for r in grpo["train"]["metrics"])
    assert "| EOPD |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000


def test_evaluate_script_writes_table_samples_and_curves(tmp_path, tiny_models):
    teacher, _ = tiny_models
    out = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "examples" / "evaluate.py"), "--model", teacher, "--benchmarks", "synthetic",
           "--n", "4", "--limit", "6", "--top-p", "1.0", "--out", str(out), "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())["benchmarks"]["synthetic"]
    samples = [json.loads(line) for line in (out / "samples_synthetic.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 4 and res["num_problems"] == 6
    assert res["avg_at_k"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    assert len(res["pass_curve"]) == 4 and res["pass_curve"][0] == pytest.approx(res["avg_at_k"])
    assert res["pass_curve"][-1] == pytest.approx(res["pass_at_k"])
    assert "synthetic Avg@4 / Pass@4" in (out / "results.md").read_text()
    assert (out / "pass_at_k.png").stat().st_size > 5_000


def test_evaluate_refuses_prompts_longer_than_the_context(tmp_path, tiny_models):
    teacher, _ = tiny_models
    data_root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data_root / "aime24").exists():
        pytest.skip(f"reference benchmark copies not found at {data_root}")
    cmd = [sys.executable, str(ROOT / "examples" / "evaluate.py"), "--model", teacher, "--benchmarks", "aime24",
           "--out", str(tmp_path / "e"), "--data-root", str(data_root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 2 and "aime24: the longest prompt has" in proc.stderr


def test_auto_resume_continues_a_killed_run(tmp_path, tiny_models):
    """The job is killed (SIGKILL to its whole process group: the driver and the local Ray it started, as a
    pod is) after step 1's checkpoint; the same command with auto_resume continues from it, and the run ends
    with the weights of one never interrupted."""
    teacher, student = tiny_models
    args = ["trainer.max_steps=2", "trainer.save_every=1", "eval.enabled=false", "auto_resume=true"]
    clean, out = tmp_path / "clean", tmp_path / "auto"
    run_job(clean, tiny_models, *args)
    hold = tmp_path / "hold"
    hold.write_text("1")
    env = dict(_env(), EOPD_HOLD_FILE=str(hold))
    log_path = tmp_path / "first.log"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), f"model.teacher={teacher}", f"model.student={student}",
           *SMALL, *args]
    with open(log_path, "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "[hold] after step 1" not in log_path.read_text(errors="replace"):
            assert first.poll() is None, f"the job ended ({first.returncode}):\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    assert "auto_resume: no checkpoint" in log_path.read_text()
    assert not (out / "results.json").exists()
    again = run_job(out, tiny_models, *args)  # what a RayJob retry runs: the same command
    assert "auto_resume: found" in again.stdout and "step_000001" in again.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in results["train"]["metrics"]] == [1, 2]
    wa, wb = final_weights(clean), final_weights(out)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)