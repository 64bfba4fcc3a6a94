"""The shared core of every objective: one float32 log-softmax of the student logits, shared between the
ratio, the entropy and the forward KL; sanitising; one gather; the loss assembled from the objective's terms;
the metrics (flat dict, slash names). See `registry.py` for what an objective supplies."""

from __future__ import annotations

from typing import Any

import torch

from eopd_ray.objectives.registry import LossInputs, Objective, get_objective
from eopd_ray.objectives.terms import clipped_mask, clipped_surrogate, fkl_at_topk
from eopd_ray.stats import TokenStats, compute_dtype, entropy_from_logprobs


def _as_count(n, like: torch.Tensor) -> torch.Tensor:
    n = torch.as_tensor(n, dtype=like.dtype, device=like.device)
    return n.clamp_min(1.0)  # an empty batch gives a zero loss, not NaN


def eopd_loss(student_logits: torch.Tensor, tokens: torch.Tensor, old_logprobs: torch.Tensor, teacher: TokenStats,
              mask: torch.Tensor, cfg: Any, num_tokens: int | float | torch.Tensor | None = None,
              generator: torch.Generator | None = None, num_gated: int | float | torch.Tensor | None = None,
              sequence_advantages: torch.Tensor | None = None,
              objective: Objective | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level EOPD loss (eq. 9) or another registered objective (`cfg.objective`, or `objective`),
    summed over the mask and divided by num_tokens.

    student_logits (B, T, V), already aligned: student_logits[:, t] is the distribution of tokens[:, t].
    tokens (B, T) int; old_logprobs (B, T) behaviour log-probs; teacher: TokenStats of (B, T) / (B, T, k);
    mask (B, T) bool or 0/1 over response tokens; cfg: the LossConfig.
    num_tokens: response-token count of the whole mini-batch (default: mask.sum() of this call). Passing the
    global count makes a mini-batch split over ranks sum to the unsplit loss and gradients.
    cfg.fkl_normalizer == "gated_tokens" divides the FKL sum by num_gated (default: gated tokens in this
    call, which is split-invariant only if the caller passes the global gated count).
    generator: drives random gates (`random_fkl`); if None a generator seeded with cfg.random_seed is used,
    which draws the same gate for the same shape on every call, so training loops should pass a persistent one.
    sequence_advantages (B,): for objectives that need rewards (`grpo`: see `group_normalized_advantages`).
    Values outside the mask (teacher, old log-probs, token ids) are never read into the loss; student logits
    there must be finite. Returns (loss, metrics) with metrics a flat dict of floats.
    """
    obj = objective or get_objective(cfg.objective)
    if obj.needs_rewards and sequence_advantages is None:
        raise ValueError(f"loss.objective={obj.name} needs sequence_advantages (B,): see group_normalized_advantages")
    if student_logits.shape[:-1] != tokens.shape or mask.shape != tokens.shape or old_logprobs.shape != tokens.shape:
        raise ValueError(f"shape mismatch: student_logits {tuple(student_logits.shape)}, tokens {tuple(tokens.shape)}, "
                         f"old_logprobs {tuple(old_logprobs.shape)}, mask {tuple(mask.shape)}")
    mask_BT = mask.bool()
    mask_BTK = mask_BT.unsqueeze(-1)
    logq_BTV = torch.log_softmax(student_logits.to(compute_dtype(student_logits.dtype)), dim=-1)
    dt = logq_BTV.dtype
    zero = torch.zeros((), dtype=dt, device=logq_BTV.device)

    # Sanitise everything outside the mask first: a NaN there would otherwise reach the backward pass.
    tokens_BT = torch.where(mask_BT, tokens.long(), 0)
    old_BT = torch.where(mask_BT, old_logprobs.detach().to(dt), zero)
    t_lp_BT = torch.where(mask_BT, teacher.logprobs.detach().to(dt), zero)
    t_ent_BT = torch.where(mask_BT, teacher.entropy.detach().to(dt), zero)
    t_ids_BTK = torch.where(mask_BTK, teacher.topk_ids.long(), 0)
    t_topk_BTK = torch.where(mask_BTK, teacher.topk_logprobs.detach().to(dt), zero)

    # One gather for the sampled token and the teacher's top-k: each gather's backward allocates a dense
    # (B, T, V) gradient, so two would cost EOPD one more V-wide buffer than OPD.
    picked_BTK1 = logq_BTV.gather(-1, torch.cat([tokens_BT.unsqueeze(-1), t_ids_BTK], dim=-1))
    logprobs_BT, logq_topk_BTK = picked_BTK1[..., 0], picked_BTK1[..., 1:]
    if obj.trains_entropy:
        student_ent_BT = entropy_from_logprobs(logq_BTV)
    else:
        with torch.no_grad():
            student_ent_BT = entropy_from_logprobs(logq_BTV)
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.random_seed)
    n_tok = _as_count(mask_BT.sum() if num_tokens is None else num_tokens, logprobs_BT)
    inputs = LossInputs(mask_BT, logprobs_BT, old_BT, t_lp_BT, t_ent_BT, student_ent_BT,
                        t_lp_BT - old_BT,  # eq. 6 with pi_old; built from detached tensors only
                        None if sequence_advantages is None else sequence_advantages.detach().to(dt),
                        generator, n_tok, zero)

    advantages_BT = obj.advantages(inputs, cfg)
    pg_BT = clipped_surrogate(logprobs_BT, old_BT, advantages_BT, cfg.clip_eps)
    with torch.no_grad():
        gate_BT = mask_BT & obj.gate(inputs, cfg)
    # Computed for every objective: the high-entropy FKL metric compares OPD runs with EOPD (Fig. 5).
    fkl_BT = fkl_at_topk(logq_topk_BTK if obj.trains_fkl else logq_topk_BTK.detach(), t_topk_BTK, cfg.renormalize)

    pg_term = obj.policy_term(inputs, cfg, pg_BT)
    fkl_sum = torch.where(gate_BT, fkl_BT, zero).sum()
    if cfg.fkl_normalizer == "gated_tokens":
        fkl_term = obj.fkl_coef(cfg) * fkl_sum / _as_count(gate_BT.sum() if num_gated is None else num_gated, fkl_sum)
    else:
        fkl_term = obj.fkl_coef(cfg) * fkl_sum / n_tok
    ent_term = obj.extra_term(inputs, cfg)
    loss = pg_term + fkl_term + ent_term

    with torch.no_grad():
        n_mask = mask_BT.sum()
        high_BT = mask_BT & (t_ent_BT >= cfg.tau)

        def mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return torch.where(m, x.detach(), zero).sum() / m.sum().clamp_min(1).to(dt)

        ratio_BT = torch.exp(logprobs_BT.detach() - old_BT)
        clipped_BT = clipped_mask(logprobs_BT.detach(), old_BT, advantages_BT, cfg.clip_eps)
        metrics_t = {
            "loss/total": loss.detach(), "loss/pg": pg_term.detach(), "loss/fkl": fkl_term.detach(),
            "loss/entropy": ent_term.detach(),
            "gate/fraction": (gate_BT & mask_BT).sum().to(dt) / n_mask.clamp_min(1),
            "gate/high_entropy_fraction": high_BT.sum().to(dt) / n_mask.clamp_min(1),  # H_te >= tau (Fig. 9)
            "teacher/entropy": mean(t_ent_BT, mask_BT), "student/entropy": mean(student_ent_BT, mask_BT),
            "fkl/gated_mean": mean(fkl_BT, gate_BT), "fkl/high_entropy_mean": mean(fkl_BT, high_BT),
            "fkl/mean": mean(fkl_BT, mask_BT),
            "pg/clip_fraction": mean(clipped_BT.to(dt), mask_BT), "pg/ratio_mean": mean(ratio_BT, mask_BT),
            "pg/advantage_mean": mean(advantages_BT, mask_BT), "kl/reverse": mean(old_BT - t_lp_BT, mask_BT),
            "tokens/masked": n_mask, "tokens/gated": gate_BT.sum(), "tokens/high_entropy": high_BT.sum(),
        }
        values = torch.stack([v.to(torch.float64) for v in metrics_t.values()]).tolist()  # one device sync
    return loss, dict(zip(metrics_t, values))
