"""The real-model preset (examples/configs/smollm2_prune.yaml) step by step, on both rollout engines.

    python examples/benchmarks/real_preset.py                  # 4 steps per engine, eval off (~8 min on 2 cores)
    python examples/benchmarks/real_preset.py --quick          # 2 steps per engine, smaller batch

Each engine runs the preset as the user does (`examples/train_eopd.py --config ...`, its own Ray session), with
the evaluation off; the figures are medians over the steps after the first (which warms the engines up), read
from the run's metrics.jsonl: the step and its phases (rollout, teacher scoring, training, weight sync), and
the vLLM engine's step and generation time over the transformers engine's. The models are converted and pruned
before the first timed run (cached), so no run pays for that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

PRESET = C.ROOT / "examples" / "configs" / "smollm2_prune.yaml"
PHASES = ("time/step", "time/rollout", "time/generate", "time/score", "time/train", "time/sync")


def run_preset(out: Path, steps: int, extra: list[str], evaluate: bool = False,
               bench: str = "real_preset") -> list[dict]:
    """The preset's metrics.jsonl rows, one per step, after running it as the user does (results.json holds the
    evaluation where `evaluate`)."""
    cmd = [sys.executable, str(C.ROOT / "examples" / "train_eopd.py"), "--config", str(PRESET), "--out", str(out),
           f"trainer.max_steps={steps}", f"eval.enabled={str(evaluate).lower()}", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    C.progress(bench, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the preset failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=0, help="steps per engine (default 4; quick 2)")
    p.add_argument("--out", default="", help="run directories (default: a temporary directory)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    steps = args.steps or (2 if args.quick else 4)
    extra = ["trainer.batch_size=8", "trainer.mini_batch_size=4"] if args.quick else []
    import tempfile

    base = Path(args.out or tempfile.mkdtemp(prefix="real_preset-"))
    from eopd_ray.config import load_config
    from eopd_ray.run_setup import prepare_run

    prepare_run(load_config(str(PRESET), ["out_dir=" + str(base / "prepare")]))  # convert + prune, cached
    report = C.Report("real_preset")
    report.config = {"preset": str(PRESET.relative_to(C.ROOT)), "steps": steps, "overrides": extra}
    medians = {}
    for engine in ("transformers", "vllm"):
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            report.notes.append("vllm engine skipped: vLLM is not installed")
            continue
        rows = run_preset(base / engine, steps, extra + [f"rollout.engine={engine}"])
        timed = rows[1:] or rows  # the first step warms the engine and the actors up
        medians[engine] = {k: C.median([r[k] for r in timed if k in r]) for k in PHASES if any(k in r for r in timed)}
        tokens = C.median([r["rollout/tokens"] for r in timed])
        report.rows.append({"engine": engine, **{k.split("/")[1]: round(v, 2) for k, v in medians[engine].items()},
                            "tokens/step": tokens})
        for k, v in medians[engine].items():
            report.add(f"{engine}/{k.split('/')[1]}_s", v, "s", note=f"median of steps 2..{steps}")
        report.add(f"{engine}/generate_tokens_per_s", tokens / medians[engine]["time/generate"], "tok/s")
    if len(medians) == 2:
        for k in ("time/step", "time/generate"):
            report.add(f"vllm_over_transformers/{k.split('/')[1]}_time_ratio",
                       medians["vllm"][k] / medians["transformers"][k], "x",
                       note="vLLM engine time over the transformers engine's, same preset and seeds")
    report.print()
    report.write(args.json, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
