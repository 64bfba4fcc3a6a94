"""Smoke run of the performance benchmarks (`examples/benchmarks/run_all.py --quick`) on the very small test
models: every figure is produced and finite, repeated ones with their spread, every verdict matches its
figure, and the figures are what their names say (the step's variants ran their own objectives, the payload
is a serialised size, the pipeline's passes differ). Speed is measured there, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_benchmarks_figures import check_spread, check_verdicts

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "examples" / "benchmarks" / "run_all.py"
pytestmark = pytest.mark.e2e  # starts Ray (pipeline_overhead, weight_sync)

EXPECTED = {
    "peak": ["matmul_fp32_gflops", "matmul_bf16_gflops", "memcpy_gbs", "bf16_over_fp32"],
    "loss_overhead": ["step_time_ratio", "step_cpu_time_ratio", "step_product_time_ratio",
                      "step_diagnostics_time_ratio", "step_peak_mem_diff_gib", "large_vocab_step_time_ratio",
                      "large_vocab_step_peak_mem_diff_gib", "loss_only_time_ratio", "loss_only_cpu_time_ratio",
                      "loss_only_product_time_ratio", "loss_only_diagnostics_time_ratio",
                      "loss_only_peak_mem_diff_gib", "loss_only_positions", "loss_only_rounds",
                      "loss_only_extra_bytes_per_position"],
    "student_memory": ["logits_peak_ratio", "step_time_ratio", "full_peak_gib", "chunked_peak_gib", "loss_abs_diff"],
    "pipeline_overhead": ["step_time_ratio", "ray_step_s", "alone_step_s", "rollout_ratio", "score_ratio",
                          "train_ratio", "sync_ratio", "ray_transport_s", "loss_max_abs_diff",
                          "teacher_scoring_alone_peak_fraction", "student_train_alone_peak_fraction"],
    "overlap": ["step_time_ratio", "ideal_ratio", "schedule_bound_ratio", "sync_step_s", "overlap_step_s",
                "overlap_ratio_mean"],
    "rollout_throughput": ["ratio", "cpu_time_ratio", "engine_ratio", "worker_tokens_per_s", "bare_tokens_per_s",
                           "large_vocab_ratio", "large_vocab_engine_ratio"],
    "teacher_scoring": ["tokens_per_s", "full_logits_tokens_per_s", "payload_bytes_per_position",
                        "rollout_payload_bytes_per_position", "ipc_marginal_bytes_per_position",
                        "numeric_bytes_per_position", "peak_mem_mib", "full_logits_peak_mem_mib",
                        "large_vocab_tokens_per_s", "large_vocab_payload_bytes_per_position",
                        "large_vocab_peak_mem_mib", "large_vocab_full_logits_peak_mem_mib"],
    "weight_sync": ["gb_per_s", "seconds", "model_mib", "export_put_s", "get_load_s", "memcpy_gb_per_s",
                    "memcpy_fraction", "large_vocab_payload_ratio"],
}
# figures a script names in a group of its own (pipeline_overhead's phases against the peak)
GROUPED = ["phase/teacher_scoring_gflops", "phase/teacher_scoring_peak_fraction", "phase/student_train_gflops",
           "phase/student_train_peak_fraction"]
if importlib.util.find_spec("vllm") is not None:  # CI installs it (EOPD_REQUIRE_VLLM)
    EXPECTED["vllm_rollout"] = ["worker_ratio", "engine_ratio", "vllm_worker_tokens_per_s",
                                "transformers_worker_tokens_per_s", "vllm_over_transformers", "larger_worker_ratio",
                                "larger_vllm_over_transformers"]
TARGETS = {"loss_overhead/step_time_ratio": "<= 1.05", "student_memory/logits_peak_ratio": "<= 0.125",
           "student_memory/step_time_ratio": "<= 1.10", "loss_overhead/loss_only_peak_mem_diff_gib": "<= 1",
           "loss_overhead/loss_only_time_ratio": "<= 1.05",
           "pipeline_overhead/step_time_ratio": "<= 1.15", "rollout_throughput/ratio": ">= 0.9",
           "teacher_scoring/payload_bytes_per_position": "<= 142.8", "weight_sync/memcpy_fraction": ">= 0.5",
           "phase/teacher_scoring_peak_fraction": ">= 0.5", "phase/student_train_peak_fraction": ">= 0.4"}
# repeated figures: the median of their repetitions with its spread
REPEATED = ["loss_overhead/step_time_ratio", "loss_overhead/loss_only_time_ratio", "peak/matmul_fp32_gflops",
            "peak/matmul_bf16_gflops", "peak/memcpy_gbs", "weight_sync/memcpy_gb_per_s",
            "phase/teacher_scoring_peak_fraction", "phase/student_train_peak_fraction"]


def test_run_all_quick_writes_every_figure(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "bench"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", EOPD_RAY_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--out", str(out), "--quick", "--teacher", teacher,
                           "--student", student], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert proc.returncode == 0, f"run_all.py failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((out / "benchmarks.json").read_text())
    assert data["quick"] is True and data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    figures = data["figures"]
    missing = [f"{b}/{k}" for b, keys in EXPECTED.items() for k in keys if f"{b}/{k}" not in figures]
    missing += [k for k in GROUPED if k not in figures]
    assert not missing, f"figures missing from benchmarks.json: {missing}"
    for key, fig in figures.items():
        assert isinstance(fig["value"], (int, float)) and math.isfinite(fig["value"]), (key, fig)
    for key, target in TARGETS.items():
        assert figures[key]["target"] == target, key
    for key in REPEATED:
        check_spread(key, figures[key])
    check_verdicts(figures, proc.stdout)
    for name in EXPECTED:
        assert (out / f"{name}.json").exists() and (out / "logs" / f"{name}.log").exists()
    details = {name: json.loads((out / f"{name}.json").read_text()) for name in EXPECTED}
    check_loss_variants(details["loss_overhead"])
    check_payload(figures)
    check_pipeline_passes(details["pipeline_overhead"], figures, data["machine"]["cpu_count"])
    sync = figures["weight_sync/memcpy_fraction"]["value"]
    assert math.isclose(sync, figures["weight_sync/gb_per_s"]["value"] / figures["weight_sync/memcpy_gb_per_s"]["value"])


def check_loss_variants(detail: dict) -> None:
    """The step's variants ran their own objectives: EOPD gates positions (the synthetic teacher: ~20%), OPD
    and plain OPD none (the trainer once kept its constructed objective, so every variant ran EOPD)."""
    for row in [r for r in detail["rows"] if "eopd_gate_fraction" in r]:
        assert 0.05 < row["eopd_gate_fraction"] < 0.5, row
        assert row["opd_gate_fraction"] == 0 and row["opd_plain_gate_fraction"] == 0, row


def check_payload(figures: dict) -> None:
    """The payload figure is the serialised size, so it exceeds the 8k + 8 numbers it carries (framing, offsets
    and ids are never free), and stays far below full float32 log-probabilities."""
    for prefix in ("", "large_vocab_"):
        ipc = figures[f"teacher_scoring/{prefix}payload_bytes_per_position"]["value"]
        numeric = figures[f"teacher_scoring/{prefix}numeric_bytes_per_position"]["value"]
        assert numeric == 8 * 16 + 8
        assert numeric < ipc < 2 * numeric, (prefix, ipc)
        assert figures[f"teacher_scoring/{prefix}rollout_payload_bytes_per_position"]["value"] > 0


def check_pipeline_passes(detail: dict, figures: dict, cpu_count: int) -> None:
    """The headline pass runs the product's threads; a second pass exists where the machine has more cores,
    runs every actor at the thread count its name says, and never the product's own setting again."""
    passes = detail["config"]["passes"]
    product = passes["product"]
    assert product == detail["config"]["product_actor_threads"]
    others = {k: v for k, v in passes.items() if k != "product"}
    assert len(others) == (1 if set(product.values()) != {cpu_count} else 0), passes
    for prefix, threads in others.items():
        n = int(prefix.removeprefix("threads").rstrip("_"))
        assert set(threads.values()) == {n} and threads != product, passes
        assert f"pipeline_overhead/{prefix}step_time_ratio" in figures
    assert not [k for k in figures if k.startswith("pipeline_overhead/threads")
                and k.split("/")[1].split("_")[0] + "_" not in others], others
