"""EOPD objective and its baselines as pure tensor functions (paper eq. 6-11).

Teacher side: `token_stats*` turn teacher logits (or hidden states) into the per-position payload the loss
needs (sampled-token log-prob, full-vocabulary entropy, top-k log-probs and ids) without keeping a
float32 [N, V] tensor for more than `chunk_size` positions. Student side: `eopd_loss` computes one
float32 log_softmax of the student logits and shares it between the ratio, the entropy and the forward KL.

Precision: statistics are computed in float32, except that float64 inputs stay float64 (tests use that
to compare against float64 references at tight tolerances).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from eopd_ray.config import ConfigError, LossConfig

FKL_OBJECTIVES = ("eopd", "full_fkl", "random_fkl")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dim from log-probs; -inf entries (masked ids) contribute 0, not NaN."""
    if torch.is_grad_enabled() and logprobs.requires_grad:
        return -(logprobs.exp() * logprobs.clamp_min(torch.finfo(logprobs.dtype).min)).sum(-1)
    plogp = logprobs.exp().mul_(logprobs)  # in place: one [N, V] temporary instead of three
    return -plogp.masked_fill_(logprobs == float("-inf"), 0.0).sum(-1)


@dataclass
class TokenStats:
    """Teacher payload per position: logprobs (...), entropy (...), topk_logprobs (..., k), topk_ids (..., k) int64."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TokenStats":
        return TokenStats(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def index(self, idx) -> "TokenStats":
        """Select along the leading dims (e.g. `stats.index(slice(0, 2))` for a sub-batch of rows)."""
        return TokenStats(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _stats_rows(logits_NV: torch.Tensor, tokens_N: torch.Tensor, top_k: int):
    logprobs_NV = torch.log_softmax(logits_NV.to(_compute_dtype(logits_NV.dtype)), dim=-1)
    tok_N = logprobs_NV.gather(-1, tokens_N.unsqueeze(-1)).squeeze(-1)
    topv_NK, topi_NK = logprobs_NV.topk(top_k, dim=-1, largest=True, sorted=True)
    return tok_N, _entropy(logprobs_NV), topv_NK, topi_NK


def _check_inputs(lead_shape: torch.Size, tokens: torch.Tensor, vocab: int, top_k: int) -> None:
    if tuple(tokens.shape) != tuple(lead_shape):
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal the logits' leading shape {tuple(lead_shape)}")
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must lie in [1, vocab size {vocab}]")
    # A tokenizer/vocabulary mismatch would otherwise score wrong ids silently (or crash a CUDA gather).
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}); got range [{int(tokens.min())}, {int(tokens.max())}]")


def _stats_from_fn(logits_fn: Callable[[int, int], torch.Tensor], tokens: torch.Tensor, vocab: int,
                   top_k: int, chunk_size: int) -> TokenStats:
    """Run `_stats_rows` over flattened positions [s, e) with logits_fn(s, e) -> (e - s, vocab) logits."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    lead = tokens.shape
    tokens_N = tokens.reshape(-1).long()
    parts = [_stats_rows(logits_fn(s, min(s + chunk_size, tokens_N.numel())), tokens_N[s:s + chunk_size], top_k)
             for s in range(0, tokens_N.numel(), chunk_size)]
    if not parts:  # no positions: keep shapes and dtypes well defined
        parts = [_stats_rows(logits_fn(0, 0), tokens_N, top_k)]
    tok, ent, topv, topi = (torch.cat(p) for p in zip(*parts))
    return TokenStats(tok.reshape(lead), ent.reshape(lead), topv.reshape(*lead, top_k), topi.reshape(*lead, top_k))


@torch.no_grad()
def token_stats(logits: torch.Tensor, tokens: torch.Tensor, top_k: int, vocab_size: int | None = None) -> TokenStats:
    """Teacher statistics at every position in one pass (no grad; the teacher is frozen).

    logits (..., V) any float dtype; tokens (...) ids of the sampled tokens. `vocab_size` keeps only the first
    vocab_size columns so padded embedding rows never reach the softmax, the entropy or the top-k.
    Returns float32 stats (float64 for float64 logits), top-k sorted descending, ids int64.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    _check_inputs(logits.shape[:-1], tokens, logits.shape[-1], top_k)
    logits_NV = logits.reshape(-1, logits.shape[-1])
    return _stats_from_fn(lambda s, e: logits_NV[s:e], tokens, logits.shape[-1], top_k, max(1, logits_NV.shape[0]))


@torch.no_grad()
def token_stats_chunked(logits: torch.Tensor, tokens: torch.Tensor, top_k: int, chunk_size: int = 1024,
                        vocab_size: int | None = None) -> TokenStats:
    """As `token_stats`, but upcasts and log-softmaxes at most `chunk_size` flattened positions at a time."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    _check_inputs(logits.shape[:-1], tokens, logits.shape[-1], top_k)
    logits_NV = logits.reshape(-1, logits.shape[-1])
    return _stats_from_fn(lambda s, e: logits_NV[s:e], tokens, logits.shape[-1], top_k, chunk_size)


@torch.no_grad()
def token_stats_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                            tokens: torch.Tensor, top_k: int, chunk_size: int = 1024,
                            vocab_size: int | None = None) -> TokenStats:
    """As `token_stats` on `hidden @ lm_head_weight.T`, without ever building the full [N, V] logits.

    hidden (..., H); lm_head_weight (V_padded, H), or a callable mapping (n, H) hidden to (n, V_padded) logits
    (e.g. the model's lm_head module, when it has a bias or soft-capping). The projection runs in the
    input dtype, as the model's own head would; statistics are then computed as in `token_stats`.
    """
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    if callable(lm_head_weight) and not isinstance(lm_head_weight, torch.Tensor):
        head = lm_head_weight
        vocab = head(hidden_NH[:1]).shape[-1]  # one row, just to learn the head's width
        vocab = min(vocab, vocab_size) if vocab_size is not None else vocab

        def logits_fn(s: int, e: int) -> torch.Tensor:
            return head(hidden_NH[s:e])[..., :vocab]
    else:
        weight_VH = lm_head_weight[:vocab_size] if vocab_size is not None else lm_head_weight
        vocab = weight_VH.shape[0]

        def logits_fn(s: int, e: int) -> torch.Tensor:
            return hidden_NH[s:e] @ weight_VH.T
    _check_inputs(hidden.shape[:-1], tokens, vocab, top_k)
    return _stats_from_fn(logits_fn, tokens, vocab, top_k, chunk_size)


def _fkl_from_logprobs(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       renormalize: bool) -> torch.Tensor:
    """Forward KL over the teacher's top-k given the student's full-vocabulary log-probs (..., V) -> (...)."""
    return _fkl_at_topk(student_logprobs.gather(-1, topk_ids.long()), topk_logprobs, renormalize)


def _fkl_at_topk(logq_K: torch.Tensor, topk_logprobs: torch.Tensor, renormalize: bool) -> torch.Tensor:
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
    logq = torch.log_softmax(student_logits.to(_compute_dtype(student_logits.dtype)), dim=-1)
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


def _as_count(n, like: torch.Tensor) -> torch.Tensor:
    n = torch.as_tensor(n, dtype=like.dtype, device=like.device)
    return n.clamp_min(1.0)  # an empty batch gives a zero loss, not NaN


def eopd_loss(student_logits: torch.Tensor, tokens: torch.Tensor, old_logprobs: torch.Tensor, teacher: TokenStats,
              mask: torch.Tensor, cfg: LossConfig, num_tokens: int | float | torch.Tensor | None = None,
              generator: torch.Generator | None = None, num_gated: int | float | torch.Tensor | None = None,
              sequence_advantages: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level EOPD loss (eq. 9) or one of its baselines, summed over the mask and divided by num_tokens.

    student_logits (B, T, V), already aligned: student_logits[:, t] is the distribution of tokens[:, t].
    tokens (B, T) int; old_logprobs (B, T) behaviour log-probs; teacher: TokenStats of (B, T) / (B, T, k);
    mask (B, T) bool or 0/1 over response tokens.
    num_tokens: response-token count of the whole mini-batch (default: mask.sum() of this call). Passing the
    global count makes a mini-batch split over ranks sum to the unsplit loss and gradients.
    cfg.fkl_normalizer == "gated_tokens" divides the FKL sum by num_gated (default: gated tokens in this
    call, which is split-invariant only if the caller passes the global gated count).
    generator: drives the `random_fkl` gate; if None a generator seeded with cfg.random_seed is used, which
    draws the same gate for the same shape on every call, so training loops should pass a persistent one.
    Values outside the mask (teacher, old log-probs, token ids) are never read into the loss; student logits
    there must be finite. Returns (loss, metrics) with metrics a flat dict of floats.
    Baselines: `grpo` uses `sequence_advantages` (B,) (see `group_normalized_advantages`) in place of the
    teacher advantage; `kd` (tokens sampled by the teacher) is kd_ce_coef * cross-entropy + kd_fkl_coef *
    top-k forward KL at every position, both divided by num_tokens.
    """
    if cfg.objective not in ("opd", "entropy_bonus", "advantage_shaping", "grpo", "kd") + FKL_OBJECTIVES:
        raise ConfigError(f"config value loss.objective={cfg.objective!r} is invalid")
    if cfg.objective == "grpo" and sequence_advantages is None:
        raise ValueError("loss.objective=grpo needs sequence_advantages (B,): see group_normalized_advantages")
    if student_logits.shape[:-1] != tokens.shape or mask.shape != tokens.shape or old_logprobs.shape != tokens.shape:
        raise ValueError(f"shape mismatch: student_logits {tuple(student_logits.shape)}, tokens {tuple(tokens.shape)}, "
                         f"old_logprobs {tuple(old_logprobs.shape)}, mask {tuple(mask.shape)}")
    mask_BT = mask.bool()
    mask_BTK = mask_BT.unsqueeze(-1)
    logq_BTV = torch.log_softmax(student_logits.to(_compute_dtype(student_logits.dtype)), dim=-1)
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
    if cfg.objective == "entropy_bonus":
        student_ent_BT = _entropy(logq_BTV)
    else:
        with torch.no_grad():
            student_ent_BT = _entropy(logq_BTV)

    advantages_BT = t_lp_BT - old_BT  # eq. 6 with pi_old; built from detached tensors only
    if cfg.objective == "grpo":
        advantages_BT = sequence_advantages.detach().to(dt)[:, None].expand_as(old_BT)
    if cfg.objective == "advantage_shaping":
        advantages_BT = advantages_BT + torch.minimum(cfg.shaping_alpha * student_ent_BT.detach(),
                                                      advantages_BT.abs() / cfg.shaping_kappa)
    pg_BT = clipped_surrogate(logprobs_BT, old_BT, advantages_BT, cfg.clip_eps)

    with torch.no_grad():
        if cfg.objective == "eopd":
            gate_BT = mask_BT & (t_ent_BT > cfg.tau)
        elif cfg.objective in ("full_fkl", "kd"):
            gate_BT = mask_BT
        elif cfg.objective == "random_fkl":
            if generator is None:
                generator = torch.Generator().manual_seed(cfg.random_seed)
            draw = torch.rand(mask_BT.shape, generator=generator, device=generator.device)
            gate_BT = mask_BT & (draw.to(mask_BT.device) < cfg.random_fraction)
        else:
            gate_BT = torch.zeros_like(mask_BT)

    has_fkl = cfg.objective in FKL_OBJECTIVES + ("kd",)
    # Computed for every objective: the high-entropy FKL metric compares OPD runs with EOPD (Fig. 5).
    fkl_BT = _fkl_at_topk(logq_topk_BTK if has_fkl else logq_topk_BTK.detach(), t_topk_BTK, cfg.renormalize)

    n_tok = _as_count(mask_BT.sum() if num_tokens is None else num_tokens, logprobs_BT)
    if cfg.objective == "kd":  # supervised on teacher samples: cross-entropy replaces the policy gradient
        pg_term = -cfg.kd_ce_coef * torch.where(mask_BT, logprobs_BT, zero).sum() / n_tok
    else:
        pg_term = torch.where(mask_BT, pg_BT, zero).sum() / n_tok
    fkl_sum = torch.where(gate_BT, fkl_BT, zero).sum()
    fkl_coef = cfg.kd_fkl_coef if cfg.objective == "kd" else cfg.fkl_coef
    if cfg.fkl_normalizer == "gated_tokens":
        fkl_term = fkl_coef * fkl_sum / _as_count(gate_BT.sum() if num_gated is None else num_gated, fkl_sum)
    else:
        fkl_term = fkl_coef * fkl_sum / n_tok
    ent_term = zero
    if cfg.objective == "entropy_bonus":
        ent_term = -cfg.entropy_coef * torch.where(mask_BT, student_ent_BT, zero).sum() / n_tok
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


def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (r - mean of its group) / (std of its group + eps), per response.

    rewards (N,) float; group_ids (N,) int, equal for responses to the same prompt. The std is the
    population std (ddof 0); a group whose rewards are all equal gets zero advantages.
    """
    rewards = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards) / count
    var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean[inverse]) ** 2) / count
    return ((rewards - mean[inverse]) / (var.sqrt()[inverse] + eps)).to(torch.float32)
