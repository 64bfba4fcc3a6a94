"""Toy study of section 3.2 of the EOPD paper (Table 1, Figure 1, Appendix B Figure 6).

A categorical teacher over V = 80 indices and a student with learnable logits whose sampling is restricted
to its own top-10 indices (a capacity limit). The student is trained with the sampled reverse-KL reward
``r(x) = log P_te(x) - log P_S10(x)`` and the update ``s_x <- s_x + lr * r(x)``. With a peaked teacher
(scenario A, T = 0.3) the student settles; with a flat teacher (scenario B, T = 1.0) every reward is
negative, the sampled index is pushed down, another one enters the top-10, and the top-1 index keeps
changing. Scenario ``B_eopd`` adds the entropy-gated forward KL of eq. 9-10 to scenario B.

Everything here is a pure function of its arguments and a seed; the driver is `examples/toy_experiment.py`.
One seed drives three independent random streams (teacher logits, student initial logits, sampling), so the
scenarios of one seed share the teacher logits ``z`` (before temperature), the student's initialisation and
the sampling uniforms: A, B and B_eopd of the same seed are paired comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from eopd_ray.objectives.terms import forward_kl_topk

VOCAB_SIZE = 80
PLANTED_LOGITS = (1.7, 1.9, 2.1, 2.3, 2.5)
CAPACITY = 10
# Defaults chosen by the sweep reported in examples/toy_experiment.py (the paper states neither).
DEFAULT_LR = 0.25
DEFAULT_STEPS = 1000
DEFAULT_TOPK = 16
DEFAULT_TAU = 0.8
DEFAULT_FKL_COEF = 1.0

# Random streams derived from one seed: np.random.default_rng([seed, stream]).
_TEACHER_STREAM, _STUDENT_STREAM, _SAMPLING_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Scenario:
    """One toy scenario: the teacher temperature and whether the entropy-gated forward KL is added."""

    name: str
    temperature: float
    eopd: bool = False


SCENARIOS: dict[str, Scenario] = {
    "A": Scenario("A", 0.3),
    "B": Scenario("B", 1.0),
    "B_eopd": Scenario("B_eopd", 1.0, eopd=True),
    # Not in the default study: shows what the gate does to the peaked teacher (see `run_scenario`).
    "A_eopd": Scenario("A_eopd", 0.3, eopd=True),
}


# --------------------------------------------------------------------------------------------- teacher


def build_teacher_logits(seed: int, vocab_size: int = VOCAB_SIZE,
                         planted: tuple[float, ...] = PLANTED_LOGITS) -> tuple[np.ndarray, np.ndarray]:
    """Teacher logits ``z`` before temperature: i.i.d. N(0, 1), then ``len(planted)`` distinct random
    entries overwritten with the planted values. Returns ``(z, planted_ids)`` with ``z[planted_ids[i]] ==
    planted[i]``."""
    if vocab_size < len(planted):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(planted)} planted modes")
    rng = np.random.default_rng([seed, _TEACHER_STREAM])
    z = rng.standard_normal(vocab_size)
    planted_ids = rng.choice(vocab_size, size=len(planted), replace=False)
    z[planted_ids] = np.asarray(planted, dtype=np.float64)
    return z, planted_ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def teacher_log_probs(z: np.ndarray, temperature: float) -> np.ndarray:
    """``log softmax(z / T)``: the teacher's full-vocabulary log-probabilities."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    return log_softmax(np.asarray(z, dtype=np.float64) / temperature)


def entropy(log_probs: np.ndarray) -> float:
    """Shannon entropy in nats of a distribution given by its log-probabilities (zero-probability entries,
    ``-inf``, contribute nothing)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    return float(-(p * np.where(p > 0, lp, 0.0)).sum())


# --------------------------------------------------------------------------------------------- student


def init_student_logits(seed: int, vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    """The student's initial logits: i.i.d. N(0, 1), from the seed's student stream."""
    return np.random.default_rng([seed, _STUDENT_STREAM]).standard_normal(vocab_size)


def topk_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries, sorted by decreasing value."""
    idx = np.argpartition(-logits, k - 1)[:k]
    return idx[np.argsort(-logits[idx], kind="stable")]


def jaccard_distance(a, b) -> float:
    """``1 - |a & b| / |a | b|`` for two index sets (any iterables); 0 for two empty sets."""
    sa, sb = set(int(i) for i in a), set(int(i) for i in b)
    union = len(sa | sb)
    return 0.0 if union == 0 else 1.0 - len(sa & sb) / union


def capacity_limited_log_probs(s: np.ndarray, capacity: int = CAPACITY) -> np.ndarray:
    """``log P_S10``: log-softmax over the student's top-``capacity`` logits, ``-inf`` elsewhere."""
    out = np.full(s.shape, -np.inf)
    ids = topk_ids(s, capacity)
    out[ids] = log_softmax(s[ids])
    return out


def reward_update(s: np.ndarray, x: int, log_p_teacher: np.ndarray, lr: float,
                  capacity: int = CAPACITY) -> tuple[np.ndarray, float]:
    """One reverse-KL reward step for the sampled index ``x`` (which must be in the student's top-k):
    ``r = log P_te(x) - log P_S10(x)``, ``s_x <- s_x + lr * r``. Returns ``(new logits, r)``; ``s`` is left
    untouched."""
    lp_s10 = capacity_limited_log_probs(s, capacity)
    if not np.isfinite(lp_s10[x]):
        raise ValueError(f"index {x} is outside the student's top-{capacity}; it cannot have been sampled")
    r = float(log_p_teacher[x] - lp_s10[x])
    new = s.copy()
    new[x] += lr * r
    return new, r


def forward_kl_grad(s: np.ndarray, teacher_topk_ids: np.ndarray,
                    teacher_topk_logprobs: np.ndarray) -> tuple[np.ndarray, float]:
    """Gradient w.r.t. the student logits of eq. 10, ``KL(p~_te || P_S)`` over the teacher's top-k with the
    teacher renormalised over its top-k, via `eopd_ray.objectives.terms.forward_kl_topk` and autograd.

    ``P_S`` is the FULL softmax over the student's logits, not the capacity-limited ``P_S10``: in the LLM
    setting pi_theta is the model's full-vocabulary distribution (the capacity limit is a sampling
    restriction), and against ``P_S10`` any teacher top-k index outside the student's top-10 would have
    zero probability, i.e. an infinite KL with no usable gradient. The full softmax lets the forward KL
    raise teacher modes the student does not currently sample, which is the point of the term.
    Returns ``(gradient, KL value)``."""
    s_t = torch.tensor(s, dtype=torch.float64).unsqueeze(0).requires_grad_(True)
    ids_t = torch.as_tensor(np.asarray(teacher_topk_ids), dtype=torch.long).unsqueeze(0)
    lps_t = torch.as_tensor(np.asarray(teacher_topk_logprobs), dtype=torch.float64).unsqueeze(0)
    kl = forward_kl_topk(s_t, ids_t, lps_t, renormalize=True)
    kl.sum().backward()
    return s_t.grad[0].detach().numpy().astype(np.float64), float(kl.detach().sum())


# --------------------------------------------------------------------------------------------- one run


@dataclass
class ToyRun:
    """Per-step record of one scenario for one seed. Step ``t`` (0-based) compares the student after
    update ``t`` with the student before it."""

    scenario: str
    seed: int
    temperature: float
    lr: float
    steps: int
    teacher_logits: np.ndarray           # (V,) z before temperature
    planted_ids: np.ndarray              # (5,) indices of the planted modes
    teacher_probs: np.ndarray            # (V,) softmax(z / T)
    teacher_entropy: float               # nats, full vocabulary
    gate_open: bool                      # teacher_entropy > tau
    fkl_applied: bool                    # scenario asks for the forward KL and the gate is open
    sampled: np.ndarray                  # (steps,) sampled index per step
    rewards: np.ndarray                  # (steps,) reward r(x) per step
    top10_sets: np.ndarray               # (steps + 1, capacity) student top-k, row 0 = initialisation
    top10_change_rate: np.ndarray        # (steps,) Jaccard distance between consecutive top-k sets
    top1_changed: np.ndarray             # (steps,) bool, argmax changed at this step
    top1_changes: int                    # sum of top1_changed
    forward_kl_full: np.ndarray          # (steps,) KL(P_te || P_S) over the full vocabulary, after the step
    final_student_logits: np.ndarray     # (V,)
    final_student_probs: np.ndarray      # (V,) full softmax of the final logits
    final_student_probs_top10: np.ndarray  # (V,) capacity-limited P_S10, zero outside the top-k
    extra: dict = field(default_factory=dict)


def run_scenario(scenario: Scenario | str, seed: int, *, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                 fkl_coef: float = DEFAULT_FKL_COEF, k: int = DEFAULT_TOPK, tau: float = DEFAULT_TAU,
                 capacity: int = CAPACITY, vocab_size: int = VOCAB_SIZE) -> ToyRun:
    """Train one student for ``steps`` steps in ``scenario`` with ``seed``.

    Each step samples ``x ~ P_S10`` (inverse-CDF on a pre-drawn uniform), then applies the combined update
    computed at the current logits: ``s <- s + lr * r(x) e_x - lr * fkl_coef * grad KL(p~_te || P_S)``,
    the second term only for an ``eopd`` scenario whose teacher entropy exceeds ``tau`` (the gate of eq. 9;
    the teacher is fixed, so the gate is decided once). The forward-KL step shares the learning rate and
    is weighted by ``fkl_coef``, as the paper's loss ``L_OPD + 1[H > tau] * L_FKL`` is with one optimiser.
    """
    sc = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    if steps < 1 or capacity < 1 or capacity > vocab_size or not 1 <= k <= vocab_size:
        raise ValueError(f"need steps >= 1, 1 <= capacity <= V and 1 <= k <= V; got steps={steps}, "
                         f"capacity={capacity}, k={k}, V={vocab_size}")
    z, planted_ids = build_teacher_logits(seed, vocab_size)
    log_pte = teacher_log_probs(z, sc.temperature)
    p_te = np.exp(log_pte)
    h_te = entropy(log_pte)
    gate_open = bool(h_te > tau)
    fkl_applied = bool(sc.eopd and gate_open and fkl_coef != 0.0)
    te_ids = topk_ids(log_pte, k)
    te_lps = log_pte[te_ids]

    s = init_student_logits(seed, vocab_size)
    uniforms = np.random.default_rng([seed, _SAMPLING_STREAM]).random(steps)

    sampled = np.empty(steps, dtype=np.int64)
    rewards = np.empty(steps)
    top_sets = np.empty((steps + 1, capacity), dtype=np.int64)
    change_rate = np.empty(steps)
    top1_changed = np.zeros(steps, dtype=bool)
    fkl_full = np.empty(steps)
    fkl_topk = np.empty(steps) if fkl_applied else None

    ids = topk_ids(s, capacity)
    top_sets[0] = ids
    in_prev = np.zeros(vocab_size, dtype=bool)
    in_prev[ids] = True
    in_cur = np.empty_like(in_prev)
    top1 = ids[0]
    for t in range(steps):
        # Sample from P_S10 (ids are the current top-k, sorted descending).
        ls = s[ids]
        w = np.exp(ls - ls[0])
        cdf = np.cumsum(w)
        j = min(int(np.searchsorted(cdf, uniforms[t] * cdf[-1], side="right")), capacity - 1)
        x = ids[j]
        r = log_pte[x] - (ls[j] - ls[0] - np.log(cdf[-1]))
        if fkl_applied:
            grad, kl_k = forward_kl_grad(s, te_ids, te_lps)
            fkl_topk[t] = kl_k
            s -= (lr * fkl_coef) * grad
        s[x] += lr * r
        sampled[t] = x
        rewards[t] = r
        # Metrics after the update.
        ids = topk_ids(s, capacity)
        top_sets[t + 1] = ids
        in_cur[:] = False
        in_cur[ids] = True
        inter = int(np.count_nonzero(in_cur & in_prev))
        change_rate[t] = 1.0 - inter / (2 * capacity - inter)
        in_prev, in_cur = in_cur, in_prev
        top1_changed[t] = ids[0] != top1
        top1 = ids[0]
        fkl_full[t] = float(np.dot(p_te, log_pte - log_softmax(s)))

    extra = {"forward_kl_topk": fkl_topk} if fkl_applied else {}
    lp_s10 = capacity_limited_log_probs(s, capacity)
    return ToyRun(
        scenario=sc.name, seed=seed, temperature=sc.temperature, lr=lr, steps=steps,
        teacher_logits=z, planted_ids=planted_ids, teacher_probs=p_te, teacher_entropy=h_te,
        gate_open=gate_open, fkl_applied=fkl_applied, sampled=sampled, rewards=rewards,
        top10_sets=top_sets, top10_change_rate=change_rate, top1_changed=top1_changed,
        top1_changes=int(top1_changed.sum()), forward_kl_full=fkl_full, final_student_logits=s,
        final_student_probs=np.exp(log_softmax(s)), final_student_probs_top10=np.exp(lp_s10), extra=extra)


# --------------------------------------------------------------------------------------------- summary


def reverse_kl_capacity(run: ToyRun) -> float:
    """``KL(P_S10 || P_te)`` of the final student: the quantity whose sampled estimate is the reward."""
    q = run.final_student_probs_top10
    m = q > 0
    return float(np.sum(q[m] * (np.log(q[m]) - np.log(run.teacher_probs[m]))))


def summarise(runs: list[ToyRun], tail_fraction: float = 0.1) -> dict:
    """Mean and std (population, ddof=0) over seeds of one scenario's runs: top-1 change count, mean top-10
    change rate over the last ``tail_fraction`` of steps, final KL(P_te || P_S) (full softmax), final
    KL(P_S10 || P_te), where the argmax sits in the second half of training; plus the teacher entropies
    and whether the forward KL was applied."""
    if not runs:
        raise ValueError("summarise needs at least one run")
    names = {r.scenario for r in runs}
    if len(names) != 1:
        raise ValueError(f"summarise takes the runs of one scenario, got {sorted(names)}")
    tail = max(1, int(round(runs[0].steps * tail_fraction)))

    def ms(values) -> dict:
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "std": float(a.std())}

    half = runs[0].steps // 2
    in_top5, distinct = [], []
    for r in runs:
        teacher_top5 = topk_ids(np.log(r.teacher_probs), 5)
        top1_late = r.top10_sets[1 + half:, 0]
        in_top5.append(np.isin(top1_late, teacher_top5).mean())
        distinct.append(len(np.unique(top1_late)))

    return {
        "scenario": runs[0].scenario,
        "seeds": [r.seed for r in runs],
        "top1_changes": ms([r.top1_changes for r in runs]),
        "final_top10_change_rate": ms([r.top10_change_rate[-tail:].mean() for r in runs]),
        "final_forward_kl_full": ms([r.forward_kl_full[-1] for r in runs]),
        "final_reverse_kl_top10": ms([reverse_kl_capacity(r) for r in runs]),
        # Second half of training: how often the student's argmax is one of the teacher's top-5 indices,
        # and how many distinct indices were the argmax (flips among near-tied teacher modes vs churn).
        "top1_in_teacher_top5_frac": ms(in_top5),
        "distinct_top1": ms(distinct),
        "teacher_entropy": ms([r.teacher_entropy for r in runs]),
        "fkl_applied": [r.fkl_applied for r in runs],
        "tail_steps": tail,
    }


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average with the same length as ``x`` (the first entries average what exists)."""
    x = np.asarray(x, dtype=np.float64)
    if window <= 1:
        return x.copy()
    c = np.cumsum(np.concatenate([[0.0], x]))
    n = np.arange(1, len(x) + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)
