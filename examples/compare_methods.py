"""Every method of the paper's comparison, same task, data, seed and budget, in one command.

    python examples/compare_methods.py --out runs/compare                     # all methods, default task
    python examples/compare_methods.py --out runs/cmp --methods opd,eopd trainer.max_steps=4

Each method is one run of examples/train_eopd.py (its own Ray session) into OUT/<method>/. Then the
comparison is written: OUT/comparison.md and .json (Avg@k, Pass@k, high-entropy token share of each student
against the teacher's, forward KL at high-entropy positions, student entropy, wall time; in the spirit of the
paper's Tables 2, 4 and 6) and OUT/comparison.png (accuracy bars, and the student-entropy and
high-entropy forward-KL curves of Figures 4 and 5).

GRPO samples 8 responses per prompt (Table 8). To keep the number of sampled responses per step equal
across methods on this small budget, it takes B / 8 prompts per step (mini-batches of B_mini / 8 prompts);
pass your own overrides after `--` style positional arguments to change any of this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eopd_ray.comparison import LABELS, METHODS, markdown, summarize  # noqa: E402
from eopd_ray.config import load_config  # noqa: E402
from eopd_ray.objectives import get_objective  # noqa: E402
from eopd_ray.run_io import dumps_strict  # noqa: E402



def method_overrides(method: str, user: list[str], config: str | None = None) -> list[str]:
    """The objective, and for objectives run with n samples per prompt (GRPO: 8) n of them over B / n prompts,
    so that every method sees the same number of responses per step."""
    out = [f"loss.objective={method}"]
    n = get_objective(method).samples_per_prompt
    if n > 1:
        cfg = load_config(config, user)
        out += [f"rollout.n_samples_per_prompt={n}", f"trainer.batch_size={max(1, cfg.trainer.batch_size // n)}",
                f"trainer.mini_batch_size={max(1, cfg.trainer.mini_batch_size // n)}"]
    return out + list(user)


def run_method(method: str, out: Path, user: list[str], seed: int | None = None, per_seed_dir: bool = False,
               config: str | None = None) -> dict:
    """One run of train_eopd.py into OUT/<method> (OUT/<method>/seed<N> when several seeds are compared)."""
    run_dir = out / method / f"seed{seed}" if per_seed_dir else out / method
    seed_args = [] if seed is None else [f"trainer.seed={seed}"]
    cmd = [sys.executable, str(Path(__file__).with_name("train_eopd.py")), "--out", str(run_dir),
           *(["--config", config] if config else []), *method_overrides(method, user, config), *seed_args]
    print(f"\n=== {method}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed with exit code {proc.returncode}; its log is above")
    results = json.loads((run_dir / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - t0
    return results




def plot(all_results: dict[str, list[dict]], summary: dict, path: Path) -> None:
    """Accuracy bars (with the spread over seeds when there are several) and the first seed's curves."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    names = list(summary["methods"])
    xs = range(len(names))
    for shift, key, label in ((-0.2, "avg_at_k", "Avg@k"), (0.2, "pass_at_k", "Pass@k")):
        errs = [summary["methods"][n].get(f"{key}_std") or 0.0 for n in names]
        axes[0].bar([x + shift for x in xs], [summary["methods"][n][key] for n in names], 0.4, yerr=errs,
                    capsize=2, label=label)
    axes[0].axhline(summary["teacher"]["avg_at_k"], color="k", ls="--", lw=1, label="teacher Avg@k")
    axes[0].axhline(summary["student_initial"]["avg_at_k"], color="grey", ls=":", lw=1, label="initial student Avg@k")
    axes[0].set_xticks(list(xs), [LABELS[n] for n in names], rotation=35, ha="right", fontsize=8)
    axes[0].set_title("held-out accuracy")
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], "student/entropy", "student entropy during training (Fig. 4)"),
                           (axes[2], "fkl/high_entropy_mean", "forward KL where teacher H >= tau (Fig. 5)")):
        for n in names:
            rows = all_results[n][0]["train"]["metrics"]
            ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], label=LABELS[n])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="overrides applied to every method, e.g. trainer.max_steps=4")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML preset every method starts from (see examples/configs/)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seeds", default="", help="comma-separated trainer.seed values, e.g. 0,1,2: every method is "
                   "run once per seed and the table shows mean ± standard deviation (default: one run, the config's seed)")
    args = p.parse_intermixed_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [None]
    except ValueError:
        print(f"error: --seeds {args.seeds!r} must be comma-separated integers, e.g. --seeds 0,1,2", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; allowed: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    for m in methods:  # every configuration is validated before the first run starts
        load_config(args.config, method_overrides(m, args.overrides, args.config))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_results = {m: [run_method(m, out, args.overrides, seed, per_seed_dir=len(seeds) > 1, config=args.config)
                       for seed in seeds] for m in methods}
    summary = summarize(all_results)
    command = "python examples/compare_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "comparison.json").write_text(dumps_strict(summary, indent=2))
    (out / "comparison.md").write_text(markdown(summary, command))
    plot(all_results, summary, out / "comparison.png")
    print("\n" + markdown(summary, command))
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
