"""The benchmark scripts' own figures, run as a user runs them (subprocesses, small settings, no Ray): the
machine's peaks (`peak`), and the loss-alone EOPD / plain-OPD ratio with its interleaving, spread and verdict
(`loss_overhead --parts loss`). Speed is measured there, never asserted here: the checks are on what the
figures are (names, units, spread, verdict, the order of the calls), and on bounds no real machine crosses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "examples" / "benchmarks"


def run_all(tmp_path: Path, tiny_models, only: str, *extra: str) -> tuple[dict, str, Path]:
    teacher, student = tiny_models
    out = tmp_path / "bench"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", EOPD_RAY_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--out", str(out), "--only", only, "--teacher", teacher,
           "--student", student, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, f"run_all.py failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "benchmarks.json").read_text()), proc.stdout, out


def meets(value: float, target: str) -> bool:
    """A target such as "<= 1.05" or ">= 0.9", evaluated here rather than by the benchmarks' own helper."""
    op, bound = target.split()
    assert op in ("<=", ">="), target
    return value <= float(bound) if op == "<=" else value >= float(bound)


def expected_pass(fig: dict):
    """A figure's verdict: its value against the target, or for a repeated figure its interquartile range's:
    True when all of it meets the target, False when none of it does, None (unclear) otherwise."""
    if "spread" not in fig:
        return meets(fig["value"], fig["target"])
    low, high = (meets(fig["spread"][k], fig["target"]) for k in ("low", "high"))
    return True if low and high else False if not (low or high) else None


def check_spread(key: str, fig: dict, n_min: int = 2) -> None:
    s = fig["spread"]
    assert s["kind"] == "iqr" and s["n"] >= n_min, (key, s)
    assert s["min"] <= s["low"] <= fig["value"] <= s["high"] <= s["max"], (key, fig)


def check_verdicts(figures: dict, stdout: str) -> None:
    """Each targeted figure's pass is `expected_pass`; the summary table says pass / MISS / unclear to match, and
    its count line counts the targets met and names the missed and the unclear ones."""
    targeted = {k: f for k, f in figures.items() if f["target"]}
    for key, fig in targeted.items():
        assert fig["pass"] is expected_pass(fig), (key, fig)
    summary = stdout[stdout.rindex("== summary =="):].splitlines()
    for key, fig in targeted.items():
        (line,) = [line for line in summary if line.split()[:1] == [key]]
        assert line.split()[-1] == {True: "pass", False: "MISS", None: "unclear"}[fig["pass"]], line
    missed = [k for k, f in targeted.items() if f["pass"] is False]
    unclear = [k for k, f in targeted.items() if f["pass"] is None]
    met = f"{len(targeted) - len(missed) - len(unclear)}/{len(targeted)} targets met"
    met += f"; missed: {', '.join(missed)}" if missed else ""
    met += f"; unclear (spread across the target): {', '.join(unclear)}" if unclear else ""
    assert any(line == met for line in summary), (met, summary[-5:])


def test_peak_figures_in_benchmarks_json(tmp_path, tiny_models):
    data, stdout, _ = run_all(tmp_path, tiny_models, "peak", "--quick")
    figures = data["figures"]
    threads = 1  # the benchmarks' default
    # No CPU core does more than ~0.4 TFLOP/s in fp32 or 4 in bf16 (AMX), nor copies at 500 GB/s: a unit or
    # FLOP-count slip (x 1000, or N^2 for N^3) lands outside these.
    bounds = {"peak/matmul_fp32_gflops": (0.05, 400 * threads), "peak/matmul_bf16_gflops": (0.01, 4000 * threads),
              "peak/memcpy_gbs": (0.05, 500)}
    for key, (lo, hi) in bounds.items():
        fig = figures[key]
        assert lo < fig["value"] < hi, (key, fig)
        assert fig["unit"] == ("GB/s" if "memcpy" in key else "GFLOP/s")
        check_spread(key, fig, n_min=3)
    cores = data["machine"]["cpu_count"]
    if cores > threads:  # the same measured at every core, as its own figures
        assert {f"peak/matmul_fp32_gflops_{cores}_threads", f"peak/memcpy_gbs_{cores}_threads"} <= set(figures)
    ratio = figures["peak/bf16_over_fp32"]["value"]
    assert ratio == figures["peak/matmul_bf16_gflops"]["value"] / figures["peak/matmul_fp32_gflops"]["value"]
    assert "peak/matmul_fp32_gflops" in stdout[stdout.rindex("== summary =="):]


def test_loss_only_ratio_is_interleaved_with_its_spread(tmp_path, tiny_models):
    pairs = 5
    data, stdout, out = run_all(tmp_path, tiny_models, "loss_overhead", "--", "--parts", "loss", "--vocab", "2000",
                                "--lengths", "32,64", "--ratio-length", "32", "--pairs", str(pairs))
    figures = data["figures"]
    fig = figures["loss_overhead/loss_only_time_ratio"]
    assert fig["target"] == "<= 1.05" and fig["unit"] == "x"
    check_spread("loss_only_time_ratio", fig, n_min=pairs)
    assert fig["spread"]["n"] == pairs
    for key in ("loss_only_cpu_time_ratio", "loss_only_product_time_ratio", "loss_only_diagnostics_time_ratio"):
        check_spread(key, figures[f"loss_overhead/{key}"], n_min=pairs)
    check_verdicts(figures, stdout)

    detail = json.loads((out / "loss_overhead.json").read_text())
    seconds = detail["extra"]["loss_seconds_T32_full"]  # V = 2,000: the full-logits path is the default
    variants = detail["config"]["variants"]
    assert set(variants) == {"eopd", "opd", "opd_plain"}
    order = seconds["order"]
    assert len(order) == pairs * len(variants)
    rounds = [order[i:i + len(variants)] for i in range(0, len(order), len(variants))]
    for i, r in enumerate(rounds):  # every variant once a round, the order reversed every round
        assert sorted(r) == sorted(variants), rounds
        if i:
            assert r == rounds[i - 1][::-1], rounds
    # the figure is the median of the per-round ratios of these very calls
    ratios = sorted(a / b for a, b in zip(seconds["wall"]["eopd"], seconds["wall"]["opd_plain"]))
    assert math.isclose(fig["value"], ratios[pairs // 2], rel_tol=1e-12)
    assert math.isclose(fig["spread"]["min"], ratios[0]) and math.isclose(fig["spread"]["max"], ratios[-1])
    assert "loss_seconds_T64_full" in detail["extra"] and len(detail["extra"]["loss_seconds_T64_full"]["order"]) == 3
