"""Evaluate a model on the paper's math benchmarks (or the embedded synthetic task) with Avg@n and Pass@k.

    python examples/evaluate.py --model Qwen/Qwen3-1.7B-Base --benchmarks math500,aime24,aime25,amc23,minerva_math,olympiadbench --n 8 --out runs/eval
    python examples/evaluate.py --model tiny-student --benchmarks synthetic --n 8 --out runs/eval-tiny   # CPU

Sampling follows Appendix C (temperature 1.0, top-p 0.8, at most 8,192 new tokens, the "Please reason step
by step..." suffix; all flags). Generation is spread over rollout workers on Ray (transformers on CPU, vLLM
with `--engine vllm` on GPU). Writes to --out: samples_<benchmark>.jsonl (every sample, graded),
results.json, results.md (Avg@n and Pass@n per benchmark and their average, like the paper's Table 2) and
pass_at_k.png (Pass@k for k = 1..n per benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before `import ray`: stay on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

from actors.driver.build import init_ray  # noqa: E402
from actors.driver.evaluation import evaluate_on_workers  # noqa: E402
from actors.runtime.group import ActorGroup  # noqa: E402
from actors.rollout.actor import RolloutActor  # noqa: E402
from actors.rollout.engine import SamplingParams  # noqa: E402
from eopd_ray.benchmarks import BENCHMARKS, load_benchmark  # noqa: E402
from eopd_ray.data import DataError, synthetic_rows, tokenize_rows  # noqa: E402
from eopd_ray.evaluation import pass_at_k  # noqa: E402
from eopd_ray.models import load_tokenizer  # noqa: E402
from eopd_ray.run_io import OutputDirError, check_out_dir, dumps_strict  # noqa: E402

SYNTHETIC = "synthetic"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local directory, hub name, or tiny-teacher / tiny-student")
    p.add_argument("--benchmarks", default="math500", help=f"comma-separated: {', '.join([*BENCHMARKS, SYNTHETIC])}")
    p.add_argument("--n", type=int, default=8, help="samples per problem (Avg@n, Pass@k for k <= n)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-root", default=None, help="folder with <benchmark>/test.jsonl (default: ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--workers", type=int, default=1, help="rollout workers")
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    return p.parse_args(argv)


def resolve_model(name: str) -> str:
    if name in ("tiny-teacher", "tiny-student"):
        from eopd_ray.tiny_models import ensure_tiny_models

        teacher, student = ensure_tiny_models()
        return str(teacher if name == "tiny-teacher" else student)
    return name


def load_problems(names: list[str], tokenizer, args) -> dict[str, list]:
    out = {}
    for name in names:
        rows = synthetic_rows(args.limit or 64, 1234, "test") if name == SYNTHETIC else \
            load_benchmark(name, data_root=args.data_root, limit=args.limit)
        out[name] = (rows, tokenize_rows(rows, tokenizer, args.max_prompt_tokens, name))
    return out


def new_token_budgets(model: str, problems: dict, args) -> dict[str, int]:
    """--max-new-tokens, cut to what the model's context leaves after each benchmark's longest prompt."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code),
                      "max_position_embeddings", None)
    budgets = {}
    for name, (_, recs) in problems.items():
        longest = max(len(r.prompt_ids) for r in recs)
        budgets[name] = min(args.max_new_tokens, context - longest) if context else args.max_new_tokens
        if budgets[name] < 1:
            raise DataError(f"{name}: the longest prompt has {longest} tokens but {model} has a context of "
                            f"{context}; evaluate this benchmark with a model of a longer context")
    return budgets


def pass_curve(correct: np.ndarray) -> list[float]:
    n = correct.shape[1]
    return [float(np.mean([pass_at_k(n, int(c), k) for c in correct.sum(1)])) for k in range(1, n + 1)]


def write_table(results: dict, model: str, n: int, path: Path) -> str:
    names = list(results)
    head = "| model | " + " | ".join(f"{b} Avg@{n} / Pass@{n}" for b in names) + f" | average Avg@{n} / Pass@{n} |"
    avg = [np.mean([results[b]["avg_at_k"] for b in names]), np.mean([results[b]["pass_at_k"] for b in names])]
    row = f"| {model} | " + " | ".join(f"{100 * results[b]['avg_at_k']:.1f} / {100 * results[b]['pass_at_k']:.1f}"
                                       for b in names) + f" | {100 * avg[0]:.1f} / {100 * avg[1]:.1f} |"
    text = "\n".join([head, "|" + "---|" * (len(names) + 2), row]) + "\n"
    path.write_text(text)
    return text


def plot_curves(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, res in results.items():
        ks = range(1, len(res["pass_curve"]) + 1)
        ax.plot(ks, res["pass_curve"], marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    try:
        unknown = [b for b in names if b not in BENCHMARKS and b != SYNTHETIC]
        if unknown:
            raise DataError(f"unknown benchmark(s) {unknown}; allowed: {', '.join([*BENCHMARKS, SYNTHETIC])}")
        if args.n < 1:
            raise DataError(f"--n {args.n} is invalid: allowed an integer >= 1")
        out = check_out_dir(args.out)
        model = resolve_model(args.model)
        tokenizer = load_tokenizer(model, args.trust_remote_code)
        problems = load_problems(names, tokenizer, args)
        budgets = new_token_budgets(model, problems, args)
    except (DataError, OutputDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray()
    group = ActorGroup("eval", RolloutActor, args.workers, lambda rank: dict(
        model_path=model, engine=args.engine, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        vocab_size=len(tokenizer)), num_cpus=0.5)
    results = {}
    for name, (rows, recs) in problems.items():
        params = SamplingParams(args.temperature, args.top_p, budgets[name], args.seed)
        t0 = time.perf_counter()
        res = evaluate_on_workers(group, [r.prompt_ids for r in recs], [r.answer for r in recs], args.n, params,
                                  1.0, None)
        correct = np.asarray(res["correct"], dtype=bool)
        with open(out / f"samples_{name}.jsonl", "w", encoding="utf-8") as fh:
            for rec, texts, lengths, ok in zip(recs, res["texts"], res["lengths"], correct):
                for i, (text, length, c) in enumerate(zip(texts, lengths, ok)):
                    fh.write(json.dumps({"benchmark": name, "id": rec.id, "sample": i, "answer": rec.answer,
                                         "correct": bool(c), "tokens": int(length), "response": text}) + "\n")
        results[name] = {"avg_at_k": res["avg_at_k"], "pass_at_k": res["pass_at_k"], "k": args.n,
                         "num_problems": len(recs), "pass_curve": pass_curve(correct),
                         "high_entropy_fraction": res["high_entropy_fraction"], "seconds": time.perf_counter() - t0}
        print(f"{name:14s} Avg@{args.n}={100 * res['avg_at_k']:.1f}  Pass@{args.n}={100 * res['pass_at_k']:.1f}  "
              f"({len(recs)} problems, {results[name]['seconds']:.0f} s)")
    summary = {"model": args.model, "settings": vars(args), "benchmarks": results,
               "average": {"avg_at_k": float(np.mean([r["avg_at_k"] for r in results.values()])),
                           "pass_at_k": float(np.mean([r["pass_at_k"] for r in results.values()]))}}
    (out / "results.json").write_text(dumps_strict(summary, indent=2))
    print(write_table(results, args.model, args.n, out / "results.md"))
    plot_curves(results, out / "pass_at_k.png")
    group.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
