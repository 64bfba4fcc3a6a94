"""The per-token terms objectives are built from: the forward KL over the teacher's top-k (eq. 10) and the
PPO-clipped surrogate (eq. 8)."""

from __future__ import annotations

import torch

from eopd_ray.stats import compute_dtype


def _fkl_from_logprobs(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       renormalize: bool) -> torch.Tensor:
    """Forward KL over the teacher's top-k given the student's full-vocabulary log-probs (..., V) -> (...)."""
    return fkl_at_topk(student_logprobs.gather(-1, topk_ids.long()), topk_logprobs, renormalize)


def fkl_at_topk(logq_K: torch.Tensor, topk_logprobs: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Forward KL over the teacher's top-k given the student's log-probs at those ids (..., k) -> (...)."""
    tlp_K = topk_logprobs.detach().to(logq_K.dtype)
    logp_K = torch.log_softmax(tlp_K, dim=-1) if renormalize else tlp_K
    p_K = logp_K.exp()
    # Ids the teacher gives zero mass would make 0 * (-inf) = NaN; they contribute nothing instead.
    return torch.where(p_K > 0, p_K * (logp_K - logq_K), torch.zeros_like(logq_K)).sum(-1)


def forward_kl_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    renormalize: bool = True) -> torch.Tensor:
    """Per-position KL(teacher top-k || student), eq. 10. Shapes (..., V), (..., k), (..., k) -> (...).

    renormalize=True: the teacher is renormalised over its top-k (the paper); False: raw teacher log-probs
    over the top-k (the authors' code). The student log-softmax runs over its full vocabulary in float32
    (float64 stays float64). Differentiable w.r.t. student_logits; the teacher tensors are constants.
    """
    logq = torch.log_softmax(student_logits.to(compute_dtype(student_logits.dtype)), dim=-1)
    return _fkl_from_logprobs(logq, topk_ids, topk_logprobs, renormalize)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> torch.Tensor:
    """Per-token PPO loss of eq. 8, max(-r A, -clip(r, 1-eps, 1+eps) A), r = exp(logprobs - old_logprobs)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return torch.maximum(-ratio * advantages, -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages)


def clipped_mask(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 clip_eps: float) -> torch.Tensor:
    """Bool (same shape): True where the clipped branch wins strictly, i.e. the token gets no gradient."""
    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs)
        return -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages > -ratio * advantages
