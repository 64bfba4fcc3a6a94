"""Evaluation metrics: the unbiased Pass@k estimator, Avg@k, and generated-token entropy statistics."""

from __future__ import annotations

import numpy as np

from eopd_ray.grading import extract_boxed, grade  # noqa: F401  (grade is public API here too)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct
    (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # Product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize_correct(correct_PN: np.ndarray, k: int) -> dict[str, float]:
    """correct_PN: (problems, n samples) booleans -> Avg@n (mean accuracy) and Pass@k (mean over problems)."""
    correct_PN = np.asarray(correct_PN, dtype=bool)
    n = correct_PN.shape[1]
    counts = correct_PN.sum(axis=1)
    return {
        "avg_at_k": float(correct_PN.mean()),
        "pass_at_k": float(np.mean([pass_at_k(n, int(c), k) for c in counts])),
        "k": int(k),
        "num_problems": int(correct_PN.shape[0]),
    }


def finite_entropies(entropies: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """(the finite per-token entropies, flattened as float64; the number of tokens in all). An engine
    without full-vocabulary entropy (vLLM) reports NaN per token; such tokens are left out, not counted 0."""
    flat = np.concatenate([np.asarray(e, dtype=np.float64).reshape(-1) for e in entropies]) if entropies else np.zeros(0)
    return flat[np.isfinite(flat)], int(flat.size)


def high_entropy_fraction(entropies: list[np.ndarray], threshold: float = 1.0) -> float:
    """Fraction of generated tokens whose own predictive entropy is >= threshold (paper Fig. 3), over the
    tokens with a finite entropy. NaN when there are tokens but none has one (an engine that gives no
    entropy); 0.0 when there are no tokens at all."""
    finite, total = finite_entropies(entropies)
    if finite.size:
        return float((finite >= threshold).mean())
    return float("nan") if total else 0.0


def grade_response(response: str, answer) -> bool:
    """Grade a response: a `\\boxed{}` answer (real benchmarks) goes to the math-verify based `grade`;
    otherwise the synthetic task's final-answer marker is used."""
    if extract_boxed(response) is not None:
        return grade(response, answer)
    from eopd_ray import task

    return task.grade(response, str(answer))


def eval_report(results: dict, threshold: float, show_samples: int = 0) -> list[str]:
    """One line per model, then how each student's share of high-entropy tokens compares with the teacher's
    (n/a where the engine gives no entropies: vLLM)."""
    share = {n: r["high_entropy_fraction"] for n, r in results.items()
             if r["high_entropy_fraction"] is not None and np.isfinite(r["high_entropy_fraction"])}
    lines = [f"eval {name:16s} Avg@{r['k']}={r['avg_at_k']:.3f} Pass@{r['k']}={r['pass_at_k']:.3f} "
             f"tokens with entropy >= {threshold:g}: "
             + (f"{100 * share[name]:.1f}%" if name in share else "n/a (the engine gives no entropies)")
             for name, r in results.items()]
    teacher = share.get("teacher")  # absent with eval.teacher=false or a vLLM engine
    for name in ("student_initial", "student") if teacher is not None else ():
        frac = share[name]
        lines.append(f"{name} keeps {frac / teacher:.2f}x the teacher's share of high-entropy tokens "
                     f"({100 * frac:.1f}% vs {100 * teacher:.1f}%)" if teacher > 0 else
                     f"{name}: {100 * frac:.1f}% high-entropy tokens; the teacher has none")
    gain = results["student"]["avg_at_k"] - results["student_initial"]["avg_at_k"]
    lines.append(f"training changed Avg@k by {gain:+.3f} ({results['student_initial']['avg_at_k']:.3f} -> "
                 f"{results['student']['avg_at_k']:.3f})")
    lines += fidelity_lines(results)
    for name, r in results.items():
        for text in (r.get("texts") or [[]])[0][:show_samples]:
            lines.append(f"sample {name:16s} {text[:160]!r}")
    return lines


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def fidelity_lines(results: dict) -> list[str]:
    """One line per model with its fidelity to the teacher (eopd_ray/fidelity.py), and how training moved the
    student's reverse KL; with several teachers, the same for each one (`fidelity_by_teacher`)."""
    lines = _fidelity_block({name: r.get("fidelity") for name, r in results.items()}, results, "")
    for teacher in (results.get("student", {}).get("fidelity_by_teacher") or {}):
        lines += _fidelity_block({name: (r.get("fidelity_by_teacher") or {}).get(teacher)
                                  for name, r in results.items()}, results, teacher)
    return lines


def _fidelity_block(fids: dict, results: dict, teacher: str) -> list[str]:
    lines = []
    to = f" to {teacher} ({next(f for f in fids.values() if f)['problems']} problems)" if teacher else ""
    for name, f in fids.items():
        if f and f.get("estimator") == "sequence":  # teacher.tokenizer=cross (eopd_ray.fidelity.cross_fidelity)
            lines.append(f"fidelity{to} {name:16s} reverse KL {_fmt(f['reverse_kl'])} +- {_fmt(f.get('reverse_kl_stderr'))} "
                         f"(whole responses, per teacher token) teacher NLL {_fmt(f['teacher_nll'])} nats/teacher token; "
                         f"distinct-2 {_fmt(results[name].get('diversity/distinct_2'))}")
        elif f:
            lines.append(f"fidelity{to} {name:16s} reverse KL {_fmt(f['reverse_kl'])} forward KL "
                         f"{_fmt(f.get('forward_kl'))} (at teacher entropy >= tau: {_fmt(f.get('forward_kl_high_entropy'))}) "
                         f"teacher NLL {_fmt(f['teacher_nll'])} nats/token; "
                         f"distinct-2 {_fmt(results[name].get('diversity/distinct_2'))}")
    start, end = ((fids.get(n) or {}).get("reverse_kl") for n in ("student_initial", "student"))
    if start and end is not None:
        lines.append(f"training changed the reverse KL to {teacher or 'the teacher'} by {100 * (end - start) / start:+.1f}% "
                     f"({start:.3f} -> {end:.3f} nats/{'teacher ' if fids['student'].get('estimator') == 'sequence' else ''}"
                     "token)")
    return lines
