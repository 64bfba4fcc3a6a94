"""Token-entropy analysis of teacher and students (paper Figures 3, 5/11 and 9).

    python examples/analyze_entropy.py --out runs/analysis --runs runs/opd,runs/eopd
    python examples/analyze_entropy.py --out DIR --teacher PATH --students opd=PATH,eopd=PATH --n 4

On the same held-out prompts, every model samples n responses; we record the entropy of each generated
token's own distribution (histogram, share >= 1.0: Figure 3). The teacher then scores each student's
responses, and the student's forward KL to the teacher (top-k, eq. 10) is averaged over the positions where
the teacher's entropy is >= tau (Figures 5 and 11). With --runs, the models come from training runs
(their config and newest checkpoint) and the gated-token ratio logged during training is plotted too
(Figure 9). Writes analysis.json, entropy_hist.png and, with --runs, gate_ratio.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.rollout.worker import RolloutWorker  # noqa: E402
from actors.rollout.engine import SamplingParams  # noqa: E402
from actors.teacher.scorer import TeacherScorer  # noqa: E402
from eopd_ray import checkpoint  # noqa: E402
from eopd_ray.batch import list_rows, padded_topk, sequence_batch  # noqa: E402
from eopd_ray.data import load_rows, synthetic_rows, tokenize_rows  # noqa: E402
from eopd_ray.losses import forward_kl_topk  # noqa: E402
from eopd_ray.models import load_causal_lm, load_tokenizer  # noqa: E402
from eopd_ray.plots import entropy_histograms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", default="", help="comma-separated training run directories")
    p.add_argument("--teacher", default="", help="teacher path (default: from the first run's config)")
    p.add_argument("--students", default="", help="comma-separated name=path pairs")
    p.add_argument("--data", default="", help="JSONL/Parquet of prompts (default: the synthetic held-out split)")
    p.add_argument("--limit", type=int, default=32, help="prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--tau", type=float, default=0.8, help="teacher-entropy threshold for the forward-KL figure")
    p.add_argument("--threshold", type=float, default=1.0, help="high-entropy threshold of Figure 3")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def models_from_runs(runs: list[Path]) -> tuple[str, dict[str, str], list[tuple[str, list[dict]]]]:
    teacher, students, curves = "", {}, []
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        teacher = teacher or _resolve(cfg["model"]["teacher"], "teacher")
        students.setdefault("student_initial", _resolve(cfg["model"]["student"], "student"))
        ckpt = checkpoint.latest(run / "checkpoints")
        if ckpt is None:
            raise SystemExit(f"error: {run} has no complete checkpoint")
        students[run.name] = str(ckpt / "hf")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves.append((run.name, rows))
    return teacher, students, curves


def _resolve(path: str, role: str) -> str:
    if path != "tiny":
        return path
    from eopd_ray.tiny_models import ensure_tiny_models

    teacher, student = ensure_tiny_models()
    return str(teacher if role == "teacher" else student)


@torch.no_grad()
def high_entropy_fkl(student_dir: str, table, scored, top_k: int, tau: float, vocab: int, pad_id: int) -> dict:
    """Mean forward KL(teacher top-k || student) over positions with teacher entropy >= tau."""
    model = load_causal_lm(student_dir).eval()
    responses = list_rows(table.column("response_ids"))
    batch = sequence_batch(list_rows(table.column("prompt_ids")), responses, pad_id)
    t_max = batch.response_BT.shape[1]
    logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    logits_BTV = logits.gather(1, batch.logit_index_BT[..., None].expand(-1, -1, logits.shape[-1]))[..., :vocab]
    ids = padded_topk(list_rows(scored.column("topk_ids")), t_max, top_k, 0)
    lps = padded_topk(list_rows(scored.column("topk_logprobs")), t_max, top_k, 0.0)
    ent = torch.from_numpy(np.stack([np.pad(e, (0, t_max - len(e))) for e in list_rows(scored.column("teacher_entropy"))]))
    fkl = forward_kl_topk(logits_BTV, ids, lps)
    high = batch.response_mask_BT & (ent >= tau)
    return {"fkl_high_entropy": float(fkl[high].mean()) if high.any() else float("nan"),
            "high_entropy_positions": int(high.sum()), "positions": int(batch.response_mask_BT.sum())}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in args.runs.split(",") if r]
    teacher, students, curves = models_from_runs(runs) if runs else ("", {}, [])
    teacher = args.teacher or teacher
    for pair in filter(None, args.students.split(",")):
        name, _, path = pair.partition("=")
        students[name] = path
    if not teacher or not students:
        raise SystemExit("error: give --runs, or --teacher and --students name=path,...")
    tok = load_tokenizer(teacher)
    rows = load_rows(args.data) if args.data else synthetic_rows(args.limit, 1234, "test")
    recs = tokenize_rows(rows[:args.limit], tok, 4096, args.data or "synthetic test split")
    prompts = [r.prompt_ids for r in recs for _ in range(args.n)]
    ids = [r.id for r in recs for _ in range(args.n)]
    answers = [r.answer for r in recs for _ in range(args.n)]
    params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    scorer = TeacherScorer(teacher, args.top_k, len(tok), tok.pad_token_id)
    results, hists = {}, {}
    for name, path in [("teacher", teacher), *students.items()]:
        table, stats = RolloutWorker(path, vocab_size=len(tok)).rollout(ids, prompts, answers, params)
        ent = np.concatenate(list_rows(table.column("entropy")))
        hist, edges = np.histogram(ent, bins=40, range=(0.0, 4.0))
        res = {"high_entropy_fraction": float((ent >= args.threshold).mean()), "accuracy": stats["rollout/accuracy"],
               "mean_entropy": float(ent.mean()), "tokens": int(ent.size)}
        if name != "teacher":
            scored, _ = scorer.score(table)
            res.update(high_entropy_fkl(path, table, scored, args.top_k, args.tau, len(tok), tok.pad_token_id))
        results[name] = res
        hists[name] = {"entropy_hist": hist.tolist(), "entropy_edges": edges.tolist(),
                       "high_entropy_fraction": res["high_entropy_fraction"]}
        extra = f"  FKL where H_te >= {args.tau:g}: {res['fkl_high_entropy']:.3f}" if name != "teacher" else ""
        print(f"{name:18s} tokens with H >= {args.threshold:g}: {100 * res['high_entropy_fraction']:5.1f}%  "
              f"accuracy {res['accuracy']:.3f}{extra}")
    entropy_histograms(hists, out / "entropy_hist.png", args.threshold)
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, rows_ in curves:
            ax.plot([r["step"] for r in rows_], [r.get("gate/high_entropy_fraction") for r in rows_], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens with teacher entropy >= tau (Fig. 9)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gate_ratio.png", dpi=110)
        plt.close(fig)
    (out / "analysis.json").write_text(json.dumps({"settings": vars(args), "teacher": teacher, "students": students,
                                                    "results": results}, indent=2))
    print(f"wrote {out / 'analysis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
