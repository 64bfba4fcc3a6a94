"""The shared core of every objective: the student logits in float32; one fused pass (`picked.py`) for the
log-probs the ratio and the forward KL read and for the entropy; sanitising; the loss assembled from the
objective's terms; the metrics (flat dict, slash names). See `registry.py` for what an objective supplies.

Two front ends share everything after the student's per-position log-probs (`_assemble`): `eopd_loss` takes
(B, T, V) logits; `eopd_loss_from_hidden` takes final hidden states and the model's output head, and builds
the logits of at most `chunk_size` response positions at a time (recomputed in backward), which bounds the
student's logits memory by chunk_size x V instead of B x T x V (at the paper's V = 151,936 and 4k-token
responses, several GB per micro-batch in float32)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from eopd_ray.objectives.picked import picked_logprobs
from eopd_ray.objectives.registry import LossInputs, Objective, get_objective
from eopd_ray.objectives.terms import clipped_mask, clipped_surrogate, fkl_at_topk
from eopd_ray.stats import TokenStats, compute_dtype

# trainer.logits_chunk = -1 (auto): chunk the output head where the vocabulary is large enough for it to pay.
# Measured on 2 CPU cores (examples/benchmarks/student_memory.py and docs/results.md): a student step at
# chunk 256 over full logits is 1.04x at V = 55, 1.01x at 4,096, 0.88x at 16,384, 0.95x at 32,768 and 0.57x at
# 151,936 (with 0.08x the logits' peak memory at T = 4,096).
LOGITS_CHUNK = 256  # response positions per chunk of the output head
CHUNK_MIN_VOCAB = 16_384


def resolve_logits_chunk(setting: int, vocab_size: int) -> int:
    """trainer.logits_chunk as the loss runs it: -1 (auto) -> LOGITS_CHUNK when vocab_size >= CHUNK_MIN_VOCAB,
    else 0 (full logits); 0 or a positive chunk as given."""
    if setting >= 0:
        return setting
    return LOGITS_CHUNK if vocab_size >= CHUNK_MIN_VOCAB else 0


def _as_count(n, like: torch.Tensor) -> torch.Tensor:
    n = torch.as_tensor(n, dtype=like.dtype, device=like.device)
    return n.clamp_min(1.0)  # an empty batch gives a zero loss, not NaN


def eopd_loss(student_logits: torch.Tensor, tokens: torch.Tensor, old_logprobs: torch.Tensor, teacher: TokenStats,
              mask: torch.Tensor, cfg: Any, num_tokens: int | float | torch.Tensor | None = None,
              generator: torch.Generator | None = None, num_gated: int | float | torch.Tensor | None = None,
              sequence_advantages: torch.Tensor | None = None, objective: Objective | None = None,
              gate: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level EOPD loss (eq. 9) or another registered objective (`cfg.objective`, or `objective`),
    summed over the mask and divided by num_tokens.

    student_logits (B, T, V), already aligned: student_logits[:, t] is the distribution of tokens[:, t].
    tokens (B, T) int; old_logprobs (B, T) behaviour log-probs; teacher: TokenStats of (B, T) / (B, T, k);
    mask (B, T) bool or 0/1 over response tokens; cfg: the LossConfig.
    num_tokens: response-token count of the whole mini-batch (default: mask.sum() of this call). Passing the
    global count makes a mini-batch split over ranks sum to the unsplit loss and gradients.
    cfg.fkl_normalizer == "gated_tokens" divides the FKL sum by num_gated (default: gated tokens in this
    call, which is split-invariant only if the caller passes the global gated count).
    gate (B, T) bool: where the forward KL applies, as `objective_gate` gives it (default: computed here the
    same way). A caller that splits a mini-batch computes every piece's gate first, sums their counts over
    pieces and ranks into num_gated, and passes each piece its gate.
    generator: drives random gates (`random_fkl`); if None a generator seeded with cfg.random_seed is used,
    which draws the same gate for the same shape on every call, so training loops should pass a persistent one.
    sequence_advantages (B,): for objectives that need rewards (`grpo`: see `group_normalized_advantages`).
    Values outside the mask (teacher, old log-probs, token ids) are never read into the loss; student logits
    there must be finite. Returns (loss, metrics) with metrics a flat dict of floats.
    """
    obj = _objective(cfg, objective, sequence_advantages)
    _check_shapes(tuple(student_logits.shape[:-1]), tokens, old_logprobs, mask)
    mask_BT = mask.bool()
    logits_BTV = student_logits.to(compute_dtype(student_logits.dtype))
    tokens_BT = torch.where(mask_BT, tokens.long(), 0)
    t_ids_BTK = torch.where(mask_BT.unsqueeze(-1), teacher.topk_ids.long(), 0)
    logprobs_BT, logq_topk_BTK, student_ent_BT = _picked(logits_BTV, tokens_BT, t_ids_BTK, obj)
    return _assemble(obj, cfg, logprobs_BT, logq_topk_BTK, student_ent_BT, old_logprobs, teacher, mask_BT,
                     num_tokens, generator, num_gated, sequence_advantages, gate)


def eopd_loss_from_hidden(hidden_BTH: torch.Tensor, head, tokens: torch.Tensor, old_logprobs: torch.Tensor,
                          teacher: TokenStats, mask: torch.Tensor, cfg: Any, chunk_size: int = LOGITS_CHUNK,
                          vocab_size: int | None = None, num_tokens: int | float | torch.Tensor | None = None,
                          generator: torch.Generator | None = None,
                          num_gated: int | float | torch.Tensor | None = None,
                          sequence_advantages: torch.Tensor | None = None, objective: Objective | None = None,
                          gate: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`eopd_loss` of `head(hidden)[..., :vocab_size]` without the (B, T, V) logits: only the response positions
    go through the output head, `chunk_size` of them at a time, and each chunk's logits are recomputed in the
    backward pass (activation checkpointing), so at most one chunk's (chunk_size, V) logits exist at once.

    hidden_BTH (B, T, H) final hidden states aligned with tokens (B, T); head: a function (n, H) -> (n, V_rows)
    logits, the model's own output head (soft-capping and logit scales included: `eopd_ray.models.output_head`).
    The rest as `eopd_loss`; the loss, its gradients and the metrics equal it up to summation order."""
    from torch.utils.checkpoint import checkpoint

    obj = _objective(cfg, objective, sequence_advantages)
    _check_shapes(tuple(hidden_BTH.shape[:-1]), tokens, old_logprobs, mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    mask_BT = mask.bool()
    hidden_NH = hidden_BTH[mask_BT]  # the response positions only, in row-major order
    tokens_N = tokens[mask_BT].long()
    t_ids_NK = teacher.topk_ids[mask_BT].long()

    def chunk(h_cH: torch.Tensor, tok_c: torch.Tensor, ids_cK: torch.Tensor):
        logits_cV = head(h_cH)
        logits_cV = logits_cV[..., :vocab_size] if vocab_size is not None else logits_cV
        return _picked(logits_cV.to(compute_dtype(logits_cV.dtype)), tok_c, ids_cK, obj)

    parts = [checkpoint(chunk, hidden_NH[s:s + chunk_size], tokens_N[s:s + chunk_size], t_ids_NK[s:s + chunk_size],
                        use_reentrant=False) for s in range(0, hidden_NH.shape[0], chunk_size)]
    if parts:  # a part the objective does not need (diagnostics off) is None in every chunk
        lp_N, topk_NK, ent_N = (None if x[0] is None else torch.cat(x) for x in zip(*parts))
    else:  # no response position: empty tensors of the right dtypes keep the loss a (zero) graph on hidden
        lp_N, topk_NK, ent_N = chunk(hidden_NH, tokens_N, t_ids_NK)
    zeros = torch.zeros(mask_BT.shape, dtype=lp_N.dtype, device=lp_N.device)
    logprobs_BT = zeros.masked_scatter(mask_BT, lp_N)
    logq_topk_BTK = None if topk_NK is None else zeros.unsqueeze(-1).expand(
        *mask_BT.shape, t_ids_NK.shape[-1]).masked_scatter(mask_BT.unsqueeze(-1), topk_NK)
    student_ent_BT = None if ent_N is None else zeros.masked_scatter(mask_BT, ent_N)
    return _assemble(obj, cfg, logprobs_BT, logq_topk_BTK, student_ent_BT, old_logprobs, teacher, mask_BT,
                     num_tokens, generator, num_gated, sequence_advantages, gate)


def _objective(cfg: Any, objective: Objective | None, sequence_advantages) -> Objective:
    obj = objective or get_objective(cfg.objective)
    if obj.needs_rewards and sequence_advantages is None:
        raise ValueError(f"loss.objective={obj.name} needs sequence_advantages (B,): see group_normalized_advantages")
    return obj


def _check_shapes(lead: tuple, tokens: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    if lead != tuple(tokens.shape) or mask.shape != tokens.shape or old_logprobs.shape != tokens.shape:
        raise ValueError(f"shape mismatch: student {lead} (logits or hidden states without their last dim), "
                         f"tokens {tuple(tokens.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
                         f"mask {tuple(mask.shape)}")


def _needs(obj: Objective) -> tuple[bool, bool]:
    """(the teacher's top-k log-probs, the student's entropy): what the core computes for `obj`. Everything
    with diagnostics on; otherwise only what the objective's loss uses (`Objective`)."""
    return (obj.diagnostics or obj.trains_fkl,
            obj.diagnostics or obj.trains_entropy or obj.reads_entropy)


def _picked(logits_V: torch.Tensor, tokens: torch.Tensor, topk_ids_K: torch.Tensor, obj: Objective):
    """(log-prob of the sampled token, log-probs at the teacher's top-k ids, entropy) from logits (..., V) in
    the compute dtype; the last two None where `obj` needs them not (`_needs`). One fused pass for all three
    (`picked_logprobs`); the entropy carries a gradient only if the objective trains it."""
    need_topk, need_entropy = _needs(obj)
    lead = tuple(tokens.shape)
    ids_NM = (torch.cat([tokens.unsqueeze(-1), topk_ids_K], dim=-1) if need_topk else tokens.unsqueeze(-1))
    picked_NM, entropy_N = picked_logprobs(logits_V.reshape(-1, logits_V.shape[-1]),
                                           ids_NM.reshape(-1, ids_NM.shape[-1]), need_entropy)
    picked_M = picked_NM.view(*lead, ids_NM.shape[-1])
    picked, topk = picked_M[..., 0], (picked_M[..., 1:] if need_topk else None)
    if entropy_N is not None:
        entropy_N = entropy_N.view(lead) if obj.trains_entropy else entropy_N.detach().view(lead)
    return picked, topk, entropy_N


def objective_gate(cfg: Any, mask: torch.Tensor, teacher: TokenStats, old_logprobs: torch.Tensor,
                   num_tokens: int | float | torch.Tensor | None = None, generator: torch.Generator | None = None,
                   sequence_advantages: torch.Tensor | None = None, objective: Objective | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) bool: where the objective (`cfg.objective`, or `objective`) applies the forward KL, False outside
    the mask. Its `gate` sees only what is known before the student's forward (mask, teacher, pi_old, rewards,
    generator; the student's fields are None), so a trainer can gate every piece of a mini-batch first and
    divide each piece's forward KL by the whole mini-batch's gated count (`loss.fkl_normalizer=gated_tokens`).

    mask (B, T); teacher: TokenStats of (B, T) / (B, T, k); old_logprobs (B, T); sequence_advantages (B,);
    num_tokens and generator as in `eopd_loss`: a random gate draws from the generator what `eopd_loss` would
    have drawn, and `eopd_loss` given the gate draws nothing. dtype: the loss's compute dtype, in which the
    teacher's entropy is compared with tau."""
    obj = _objective(cfg, objective, sequence_advantages)
    mask_BT = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=mask_BT.device)
    old_BT, t_lp_BT, t_ent_BT = (_sanitised(x, mask_BT, zero) for x in (old_logprobs, teacher.logprobs,
                                                                         teacher.entropy))
    return _gate(obj, cfg, _inputs(cfg, mask_BT, None, old_BT, t_lp_BT, t_ent_BT, None, num_tokens, generator,
                                   sequence_advantages, zero))


def _sanitised(x: torch.Tensor, mask_BT: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x detached, in zero's dtype, zero outside the mask: a NaN there would otherwise reach the backward pass."""
    m = mask_BT if x.dim() == mask_BT.dim() else mask_BT.unsqueeze(-1)
    return torch.where(m, x.detach().to(zero.dtype), zero)


def _inputs(cfg: Any, mask_BT, logprobs_BT, old_BT, t_lp_BT, t_ent_BT, student_ent_BT, num_tokens, generator,
            sequence_advantages, zero) -> LossInputs:
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.random_seed)
    n_tok = _as_count(mask_BT.sum() if num_tokens is None else num_tokens, zero)
    return LossInputs(mask_BT, logprobs_BT, old_BT, t_lp_BT, t_ent_BT, student_ent_BT,
                      t_lp_BT - old_BT,  # eq. 6 with pi_old; built from detached tensors only
                      None if sequence_advantages is None else sequence_advantages.detach().to(zero.dtype),
                      generator, n_tok, zero)


def _gate(obj: Objective, cfg: Any, inputs: LossInputs) -> torch.Tensor:
    """The objective's gate on inputs without the student's fields: the same gate whether the trainer
    computes it before the forward (`objective_gate`) or the loss does."""
    with torch.no_grad():
        return inputs.mask_BT & obj.gate(replace(inputs, logprobs_BT=None, student_entropy_BT=None), cfg)


def _assemble(obj: Objective, cfg: Any, logprobs_BT: torch.Tensor, logq_topk_BTK: torch.Tensor,
              student_ent_BT: torch.Tensor, old_logprobs: torch.Tensor, teacher: TokenStats, mask_BT: torch.Tensor,
              num_tokens, generator, num_gated, sequence_advantages,
              gate: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Everything after the student's log-probs: the sanitised inputs, the objective's terms, the loss, the
    metrics. Shared by both front ends, so each formula exists once."""
    dt = logprobs_BT.dtype
    zero = torch.zeros((), dtype=dt, device=logprobs_BT.device)
    old_BT, t_lp_BT, t_ent_BT, t_topk_BTK = (_sanitised(x, mask_BT, zero) for x in (
        old_logprobs, teacher.logprobs, teacher.entropy, teacher.topk_logprobs))
    inputs = _inputs(cfg, mask_BT, logprobs_BT, old_BT, t_lp_BT, t_ent_BT, student_ent_BT, num_tokens, generator,
                     sequence_advantages, zero)
    n_tok = inputs.num_tokens
    # The gate first, as a trainer that gates every piece before its forward draws it (random gates).
    if gate is None:
        gate_BT = _gate(obj, cfg, inputs)
    elif tuple(gate.shape) != tuple(mask_BT.shape):
        raise ValueError(f"gate {tuple(gate.shape)} must have the mask's shape {tuple(mask_BT.shape)}")
    else:
        gate_BT = mask_BT & gate.to(mask_BT.device).bool()

    advantages_BT = obj.advantages(inputs, cfg)
    pg_BT = clipped_surrogate(logprobs_BT, old_BT, advantages_BT, cfg.clip_eps)
    # Computed for every objective with diagnostics on: the high-entropy FKL metric compares OPD runs with
    # EOPD (Fig. 5). Without them (logq_topk_BTK None) an objective that does not train it has no FKL term.
    fkl_BT = None if logq_topk_BTK is None else fkl_at_topk(
        logq_topk_BTK if obj.trains_fkl else logq_topk_BTK.detach(), t_topk_BTK, cfg.renormalize)

    pg_term = obj.policy_term(inputs, cfg, pg_BT)
    if fkl_BT is None:
        fkl_term = zero
    elif cfg.fkl_normalizer == "gated_tokens":
        fkl_sum = torch.where(gate_BT, fkl_BT, zero).sum()
        fkl_term = obj.fkl_coef(cfg) * fkl_sum / _as_count(gate_BT.sum() if num_gated is None else num_gated, fkl_sum)
    else:
        fkl_term = obj.fkl_coef(cfg) * torch.where(gate_BT, fkl_BT, zero).sum() / n_tok
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
            "teacher/entropy": mean(t_ent_BT, mask_BT),
            "pg/clip_fraction": mean(clipped_BT.to(dt), mask_BT), "pg/ratio_mean": mean(ratio_BT, mask_BT),
            "pg/advantage_mean": mean(advantages_BT, mask_BT), "kl/reverse": mean(old_BT - t_lp_BT, mask_BT),
            "tokens/masked": n_mask, "tokens/gated": gate_BT.sum(), "tokens/high_entropy": high_BT.sum(),
        }
        if student_ent_BT is not None:  # left out where diagnostics are off and the objective needs neither
            metrics_t["student/entropy"] = mean(student_ent_BT, mask_BT)
        if fkl_BT is not None:
            metrics_t.update({"fkl/gated_mean": mean(fkl_BT, gate_BT), "fkl/high_entropy_mean": mean(fkl_BT, high_BT),
                              "fkl/mean": mean(fkl_BT, mask_BT)})
        values = torch.stack([v.to(torch.float64) for v in metrics_t.values()]).tolist()  # one device sync
    return loss, dict(zip(metrics_t, values))
