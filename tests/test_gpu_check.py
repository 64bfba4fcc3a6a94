"""The GPU check (`examples/benchmarks/gpu_check.sh`, `gpu_peak.py`, `gpu_report.py`) where there is no GPU: it
says so, writes its JSON and exits 0; its budget bounds the stages; its FLOP counts equal a hand count; the
report forms each fraction from the same run's peak; its stages run on a CPU with a tiny model. Figures are
never asserted here (no GPU), only what they are."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "examples" / "benchmarks"
SCRIPT = BENCH / "gpu_check.sh"


@pytest.fixture(scope="module")
def mods():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("gpu_peak"), importlib.import_module("gpu_report")


def run_check(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "check" / "gpu_check.json"
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    base.update({"PYTHON": sys.executable, **env})
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, cwd=tmp_path,
                          env=base, timeout=300)
    return proc, out


def test_without_cuda_the_check_says_so_writes_its_json_and_exits_0(tmp_path):
    proc, out = run_check(tmp_path, CUDA_VISIBLE_DEVICES="")  # no GPU visible, also on a GPU machine
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU here: torch.cuda.is_available() is False" in proc.stdout
    data = json.loads(out.read_text())
    assert data["gpu"] is False
    assert "torch.cuda.is_available() is False" in data["reason"] and "CUDA_VISIBLE_DEVICES=" in data["reason"]
    assert data["torch"].split("+")[0].count(".") == 2 and data["date"].endswith("Z")
    assert not (out.parent / "gpu_check.parts").exists()  # nothing else ran


def test_without_torch_the_check_says_so_and_exits_0(tmp_path):
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    proc, out = run_check(tmp_path, PYTHON=str(fake))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["gpu"] is False and data["torch"] == "unknown"
    assert "could not be imported" in data["reason"] and "No module named" in data["reason"]


def test_a_spent_budget_runs_no_stage_and_says_so(tmp_path):
    """GPU_CHECK_SMOKE passes the CUDA gate on a CPU; a 40 s budget (30 s kept for the report) leaves no stage
    the 15 s it needs, so every stage is recorded as not run, and the exit status says the check failed."""
    proc, out = run_check(tmp_path, GPU_CHECK_SMOKE="1", GPU_CHECK_BUDGET_S="40")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("not run (budget spent)") == 5
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-smoke" and data["figures"] == {}
    assert set(data["stages"]) == {"peak", "phases", "sync", "vllm"}
    assert all(s["timed_out"] and "budget" in s["error"] for s in data["stages"].values())
    assert data["tests"]["rc"] == 124 and data["tests"]["timed_out"]
    assert "not measured" in data["skipped"]["phase/student_train_peak_fraction"]


def test_parameter_and_flop_counts_equal_a_hand_count(mods):
    gp, _ = mods
    # tiny: per layer q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288; q/k norms 32 + 32; MLP 3 x 64 x 128 =
    # 24,576; two layer norms 128 -> 37,056; 2 layers + final norm 64 = 74,176. Head 512 x 64 = 32,768.
    assert gp.shape_params("tiny") == (74_176, 32_768)
    # Qwen3-0.6B shape: q 1024x2048 + k, v 1024x1024 + o 2048x1024 = 6,291,456; norms 256; MLP 3 x 1024 x 3072
    # = 9,437,184; layer norms 2,048 -> 15,730,944 x 28 = 440,466,432 + final norm 1,024. Head 151,936 x 1024.
    assert gp.shape_params("qwen3-0.6b") == (440_467_456, 155_582_464)
    params = (1000, 300)
    # teacher: 2 rows x (5 prompt + 3 response): decoder on 16 tokens, head at 6 positions, forward only
    assert gp.teacher_flops(params, 2, 5, 3) == 2 * (1000 * 16 + 300 * 6) == 35_600
    # student: 2 rows x 4 tokens, head at all 8, forward + backward = 3 x the forward
    assert gp.student_flops(params, 2, 4) == 6 * (1000 * 8 + 300 * 8) == 62_400


def _part(path: Path, figures: dict, rc: int = 0, **extra) -> None:
    path.write_text(json.dumps({"figures": figures, "config": {"size": "x"}, "extra": extra}))
    path.with_suffix(".rc").write_text(f"{rc} 3")


def test_report_forms_each_fraction_from_the_same_runs_peak(tmp_path, mods):
    _, rep = mods
    spread = {"low": 400.0, "high": 600.0, "min": 300.0, "max": 700.0, "n": 5, "kind": "iqr"}
    _part(tmp_path / "peak.json", {"peak/matmul_bf16_gflops": {"value": 1000.0}, "peak/memcpy_gbs": {"value": 100.0}})
    _part(tmp_path / "phases.json", {"phase/teacher_scoring_gflops": {"value": 550.0, "spread": spread},
                                     "phase/student_train_gflops": {"value": 300.0}})
    _part(tmp_path / "sync.json", {"weight_sync/state_dict_copy_gbs": {"value": 80.0}}, rc=1,
          skipped={"weight_sync/ipc_gbs": "CUDA IPC needs a GPU"}, error="Traceback: boom")
    (tmp_path / "vllm.rc").write_text("124 90")  # killed by its timeout, no file written
    (tmp_path / "vllm.log").write_text("loading...\n")
    out = rep.assemble(tmp_path, "")
    teacher = out["figures"]["phase/teacher_scoring_peak_fraction"]
    assert teacher["value"] == pytest.approx(0.55) and teacher["target"] == ">= 0.5"
    assert teacher["spread"]["low"] == pytest.approx(0.4) and teacher["spread"]["high"] == pytest.approx(0.6)
    assert teacher["pass"] is None  # the interquartile range 0.4-0.6 straddles 0.5: unclear, not pass
    student = out["figures"]["phase/student_train_peak_fraction"]
    assert student["value"] == pytest.approx(0.3) and student["pass"] is False and "spread" not in student
    assert "CUDA IPC needs a GPU" in out["skipped"]["weight_sync/memcpy_fraction"]
    assert out["stages"]["sync"]["rc"] == 1 and "boom" in out["stages"]["sync"]["error"]
    assert out["stages"]["vllm"]["timed_out"] and "loading" in out["stages"]["vllm"]["error"]
    assert out["stages"]["peak"] == {"rc": 0, "seconds": 3.0, "timed_out": False}


def test_test_tier_counts_from_junit_and_from_a_cut_short_log(tmp_path, mods):
    _, rep = mods
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_gpu" name="test_a"><system-out>\nCUDA IPC: 64 MiB on GPU X\n'
        '</system-out></testcase>'
        '<testcase classname="tests.test_gpu" name="test_b"><skipped message="needs 2 GPUs"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_d"><error message="fixture broke"/></testcase>'
        '</testsuite></testsuites>')
    s = rep.pytest_summary(tmp_path / "pytest.xml", tmp_path / "pytest.log", "GPU X")
    assert (s["passed"], s["skipped"], s["failed"], s["errors"], s["source"]) == (1, 1, 1, 1, "junit")
    assert s["skip_reasons"] == {"tests.test_gpu::test_b": "needs 2 GPUs"}
    assert s["failures"]["tests.test_gpu::test_c"] == "assert 1 == 2"
    assert s["printed"] == ["CUDA IPC: 64 MiB on GPU X"]
    (tmp_path / "pytest.log").write_text("tests/test_gpu.py::test_a PASSED [ 25%]\n"
                                         "tests/test_gpu.py::test_b[x] SKIPPED (needs 2 GPUs) [ 50%]\n"
                                         "tests/test_gpu.py::test_c FAILED [ 75%]\n")
    s = rep.pytest_summary(tmp_path / "absent.xml", tmp_path / "pytest.log")
    assert (s["passed"], s["skipped"], s["failed"], s["errors"]) == (1, 1, 1, 0) and s["source"].startswith("log")


def test_stages_run_on_a_cpu_with_the_tiny_model(mods):
    """The stages' code on a CPU (timings by perf_counter): every figure that needs no GPU is there and positive,
    and every GPU-only one is skipped with its reason."""
    gp, _ = mods
    import _common as C
    import torch

    report = C.Report("gpu_smoke")
    for stage in ("peak", "phases", "sync", "vllm"):
        gp.STAGES[stage](torch.device("cpu"), "tiny", report)
    assert {"peak/matmul_bf16_gflops", "peak/matmul_fp32_gflops", "peak/memcpy_gbs", "phase/teacher_scoring_gflops",
            "phase/teacher_forward_gflops", "phase/student_train_gflops", "weight_sync/state_dict_copy_gbs",
            "weight_sync/pack_gbs"} == set(report.figures)
    for name, fig in report.figures.items():
        assert fig.value > 0 and fig.spread["n"] >= 3, name
    skipped = report.extra["skipped"]
    assert set(skipped) == {"peak/h2d_gbs", "weight_sync/ipc_gbs", "weight_sync/ipc_load_gbs",
                            "weight_sync/nccl_broadcast_gbs", "vllm/wake_s"}
    assert "NCCL refuses two ranks on one GPU" in skipped["weight_sync/nccl_broadcast_gbs"]
    assert report.config["teacher_flops"] == gp.teacher_flops((74_176, 32_768), 2, 16, 16)
