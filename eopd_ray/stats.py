"""Teacher statistics per response position, from logits or hidden states: the sampled token's log-prob, the
full-vocabulary entropy and the top-k log-probs and ids (the payload the loss reads), without keeping a float32
[N, V] tensor for more than `chunk_size` positions.

Precision: statistics are computed in float32, except that float64 inputs stay float64 (tests use that to
compare against float64 references at tight tolerances).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
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
    logprobs_NV = torch.log_softmax(logits_NV.to(compute_dtype(logits_NV.dtype)), dim=-1)
    tok_N = logprobs_NV.gather(-1, tokens_N.unsqueeze(-1)).squeeze(-1)
    topv_NK, topi_NK = logprobs_NV.topk(top_k, dim=-1, largest=True, sorted=True)
    return tok_N, entropy_from_logprobs(logprobs_NV), topv_NK, topi_NK


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
