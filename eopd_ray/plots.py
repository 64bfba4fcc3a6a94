"""PNG plots of a run: training curves and the generated-token entropy histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVES = [
    ("loss/total", "loss"), ("loss/fkl", "forward-KL term"), ("rollout/accuracy", "rollout accuracy"),
    ("gate/fraction", "gated-token fraction (Fig. 9)"), ("teacher/entropy", "teacher entropy (nats)"),
    ("student/entropy", "student entropy (nats)"), ("fkl/high_entropy_mean", "forward KL where H_te >= tau (Fig. 5)"),
    ("kl/reverse", "reverse-KL estimate"),
]


def training_curves(rows: list[dict], path: Path, title: str = "") -> Path:
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(axes.flat, CURVES):
        ys = [r.get(key, np.nan) for r in rows]
        ax.plot(steps, ys, marker="o", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def entropy_histograms(eval_results: dict, path: Path, threshold: float = 1.0) -> Path | None:
    """Figure 3 of the paper from the evaluation's entropy histograms; None (no file) when no model's engine
    reported entropies (vLLM returns none)."""
    measured = {n: r for n, r in eval_results.items() if sum(r["entropy_hist"]) > 0}
    if not measured:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in measured.items():
        hist = np.asarray(res["entropy_hist"], dtype=float)
        edges = np.asarray(res["entropy_edges"])
        dens = hist / max(hist.sum(), 1)
        ax.step(edges[:-1], dens, where="post",
                label=f"{name} (H>={threshold:g}: {100 * res['high_entropy_fraction']:.1f}%)")
    ax.axvline(threshold, color="grey", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("entropy of generated token's distribution (nats)")
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
