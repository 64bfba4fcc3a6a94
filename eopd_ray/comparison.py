"""The comparison of methods over seeds (examples/compare_methods.py): per-method means and sample standard
deviations of the evaluation and training figures, and the Markdown table the README shows."""

from __future__ import annotations

# The paper's baselines and EOPD (Section 5.1), in the table's order; each runs with its registered settings.
METHODS = ("kd", "grpo", "opd", "entropy_bonus", "advantage_shaping", "full_fkl", "random_fkl", "eopd")
LABELS = {"kd": "Off-policy KD", "grpo": "GRPO", "opd": "OPD", "entropy_bonus": "OPD + entropy bonus",
          "advantage_shaping": "OPD + advantage shaping", "full_fkl": "OPD + forward KL everywhere",
          "random_fkl": "OPD + forward KL at random 20%", "eopd": "EOPD"}
REF_KEYS = ("avg_at_k", "pass_at_k", "high_entropy_fraction")
# held-out fidelity to the teacher (eval.fidelity; eopd_ray/fidelity.py), and the samples' diversity
FIDELITY_KEYS = ("reverse_kl", "forward_kl", "forward_kl_high_entropy", "teacher_nll")


def eval_figures(ev: dict) -> dict:
    """One evaluated model's figures: accuracy, high-entropy share, fidelity (None without) and distinct-2."""
    fid = ev.get("fidelity") or {}
    return {**{k: ev.get(k) for k in REF_KEYS}, **{f"fidelity/{k}": fid.get(k) for k in FIDELITY_KEYS},
            "distinct_2": ev.get("diversity/distinct_2")}


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return mean, std


def summarize(all_results: dict[str, list[dict]]) -> dict:
    """Per method: the mean over seeds of each figure (and its sample standard deviation as <key>_std when
    there are several seeds). Teacher and initial student likewise (their evaluation seed follows the run's)."""
    rows = {}
    for method, runs in all_results.items():
        per_run = [{
            **eval_figures(r["eval"]["student"]),
            "fkl_high_entropy_final": r["train"]["metrics"][-1].get("fkl/high_entropy_mean"),
            "student_entropy_final": r["train"]["metrics"][-1].get("student/entropy"), "wall_s": r["wall_s"],
        } for r in runs]
        row = {"k": runs[0]["eval"]["student"]["k"], "seeds": len(runs)}
        for key in per_run[0]:
            row[key], std = _mean_std([x[key] for x in per_run])
            if len(runs) > 1:
                row[f"{key}_std"] = std
        rows[method] = row
    # Teacher and initial student are evaluated identically by every method's run of a seed: one per seed.
    refs = [r["eval"] for r in next(iter(all_results.values()))]
    out = {"methods": rows}
    for name in ("teacher", "student_initial"):
        out[name] = {}
        for key in eval_figures(refs[0][name]):
            out[name][key], std = _mean_std([eval_figures(ev[name])[key] for ev in refs])
            if len(next(iter(all_results.values()))) > 1:
                out[name][f"{key}_std"] = std
    return out


def _pct(value) -> str:
    """A fraction as a percentage; n/a where the engine gave no entropy (vLLM: NaN, stored as null)."""
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def _num(row: dict, key: str, pct: bool = False) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None or value != value:
        return "n/a" if pct else ""
    text = f"{100 * value:.1f}%" if pct else f"{value:.3f}"
    if std is not None:
        text += f" ± {100 * std:.1f}" if pct else f" ± {std:.3f}"
    return text


def markdown(summary: dict, command: str) -> str:
    k = next(iter(summary["methods"].values()))["k"]
    seeds = next(iter(summary["methods"].values())).get("seeds", 1)
    spread = f" Mean ± standard deviation over {seeds} seeds." if seeds > 1 else ""
    lines = [f"Made by `{command}`.{spread}", "",
             f"| method | Avg@{k} | Pass@{k} | tokens with H >= 1 (teacher {_pct(summary['teacher']['high_entropy_fraction'])}) "
             "| final FKL where H_te >= tau | final student entropy | wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, ref in (("teacher", summary["teacher"]), ("initial student", summary["student_initial"])):
        lines.append(f"| {name} | {_num(ref, 'avg_at_k')} | {_num(ref, 'pass_at_k')} | "
                     f"{_num(ref, 'high_entropy_fraction', pct=True)} | | | |")
    for method, r in summary["methods"].items():
        lines.append(f"| {LABELS[method]} | {_num(r, 'avg_at_k')} | {_num(r, 'pass_at_k')} | "
                     f"{_num(r, 'high_entropy_fraction', pct=True)} | {_num(r, 'fkl_high_entropy_final')} | "
                     f"{_num(r, 'student_entropy_final')} | {r['wall_s']:.0f} |")
    rows = [("teacher", summary["teacher"]), ("initial student", summary["student_initial"])] + \
        [(LABELS[m], r) for m, r in summary["methods"].items()]
    if any(r.get("fidelity/reverse_kl") is not None for _, r in rows):
        lines += ["", "Held-out fidelity to the teacher (nats per response token, exact over the full vocabulary):",
                  "", "| model | reverse KL (own samples) | forward KL (teacher samples) | forward KL where H_te >= tau "
                  "| teacher NLL of own samples | distinct-2 |", "|---|---|---|---|---|---|"]
        for name, r in rows:
            lines.append(f"| {name} | " + " | ".join(_num(r, f"fidelity/{k}") for k in FIDELITY_KEYS)
                         + f" | {_num(r, 'distinct_2')} |")
    return "\n".join(lines) + "\n"
