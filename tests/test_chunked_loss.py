"""The chunked student loss (`eopd_loss_from_hidden`): loss, metrics and gradients equal the unchunked
`eopd_loss` of the same logits, for every registered objective, in float64 (summation order only) and in bf16
(within the rounding of bf16 logits), and its logits never exceed one chunk."""

from __future__ import annotations

import pytest
import torch

from eopd_ray.config import LossConfig
from eopd_ray.losses import eopd_loss, eopd_loss_from_hidden
from eopd_ray.objectives import group_normalized_advantages, objective_names
from test_losses import make_batch

H = 7


def _problem(dtype=torch.float64, V=11, seed=0):
    student, tokens, old, teacher, mask = make_batch(V=V, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    B, T = tokens.shape
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(V + 3, H, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_(True)
    seq_adv = group_normalized_advantages(torch.rand(B, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1]))
    return hidden, weight, tokens, old, teacher, mask, seq_adv, V


def _both(objective: str, chunk_size: int, dtype=torch.float64, **cfg_kw):
    hidden, weight, tokens, old, teacher, mask, seq_adv, V = _problem(dtype)
    cfg = LossConfig(objective=objective, top_k=teacher.topk_ids.shape[-1], **cfg_kw)
    adv = seq_adv.to(dtype) if objective == "grpo" else None

    def head(h):  # a padded output head: 3 extra rows beyond the real vocabulary, sliced off by vocab_size
        return h @ weight.T

    full_loss, full_m = eopd_loss(head(hidden)[..., :V], tokens, old, teacher, mask, cfg,
                                  generator=torch.Generator().manual_seed(5), sequence_advantages=adv)
    full_grads = torch.autograd.grad(full_loss, (hidden, weight))
    chunk_loss, chunk_m = eopd_loss_from_hidden(hidden, head, tokens, old, teacher, mask, cfg, chunk_size=chunk_size,
                                                vocab_size=V, generator=torch.Generator().manual_seed(5),
                                                sequence_advantages=adv)
    chunk_grads = torch.autograd.grad(chunk_loss, (hidden, weight))
    return (full_loss, full_m, full_grads), (chunk_loss, chunk_m, chunk_grads)


@pytest.mark.parametrize("objective", objective_names())
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_unchunked_in_float64(objective, chunk_size):
    (fl, fm, fg), (cl, cm, cg) = _both(objective, chunk_size)
    assert cl.item() == pytest.approx(fl.item(), rel=1e-12, abs=1e-12)
    for key in fm:
        assert cm[key] == pytest.approx(fm[key], rel=1e-10, abs=1e-12), key
    for a, b in zip(cg, fg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in cg)  # the comparison is of real gradients


def test_chunked_equals_unchunked_with_the_gated_normaliser_and_authors_fkl():
    (fl, fm, fg), (cl, cm, cg) = _both("eopd", 3, fkl_normalizer="gated_tokens", renormalize=False)
    assert cl.item() == pytest.approx(fl.item(), rel=1e-12)
    for a, b in zip(cg, fg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["eopd", "opd", "kd"])
def test_chunked_equals_unchunked_in_bf16(objective):
    """bf16 hidden states and head: both paths round the same bf16 logits to float32 before the log-softmax,
    so they agree to float32 summation order (the chunk's GEMM blocking may change a logit's last bf16 bit:
    measured below 1e-3 in the loss; a wrong chunk, an unmasked position or a missing head row moves it by
    more than 1e-1 here)."""
    (fl, fm, fg), (cl, cm, cg) = _both(objective, 4, dtype=torch.bfloat16)
    assert cl.item() == pytest.approx(fl.item(), abs=1e-4)
    for a, b in zip(cg, fg):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2**-7)


def test_only_one_chunk_of_logits_is_ever_built():
    hidden, weight, tokens, old, teacher, mask, _, V = _problem()
    rows = []

    def head(h):
        rows.append(h.shape[0])
        return h @ weight.T

    loss, m = eopd_loss_from_hidden(hidden, head, tokens, old, teacher, mask, LossConfig(top_k=4), chunk_size=2,
                                    vocab_size=V)
    forward_calls = len(rows)
    loss.backward()
    assert max(rows) <= 2 and sum(rows[:forward_calls]) == int(mask.sum())  # response positions only
    assert len(rows) == 2 * forward_calls  # every chunk recomputed once in backward, none kept


def test_no_response_positions_gives_a_zero_loss_with_a_graph():
    hidden, weight, tokens, old, teacher, mask, _, V = _problem()
    empty = torch.zeros_like(mask)
    loss, m = eopd_loss_from_hidden(hidden, lambda h: h @ weight.T, tokens, old, teacher, empty, LossConfig(top_k=4),
                                    vocab_size=V)
    loss.backward()
    assert loss.item() == 0.0 and m["tokens/masked"] == 0 and torch.count_nonzero(hidden.grad) == 0


def test_auto_logits_chunk_chunks_large_vocabularies_only():
    from eopd_ray.config import ConfigError, load_config
    from eopd_ray.objectives.core import CHUNK_MIN_VOCAB, LOGITS_CHUNK, resolve_logits_chunk

    assert load_config(None, []).trainer.logits_chunk == -1  # auto is the default
    assert resolve_logits_chunk(-1, 151_936) == LOGITS_CHUNK == 256
    assert resolve_logits_chunk(-1, CHUNK_MIN_VOCAB) == LOGITS_CHUNK
    assert resolve_logits_chunk(-1, CHUNK_MIN_VOCAB - 1) == 0 and resolve_logits_chunk(-1, 55) == 0
    assert resolve_logits_chunk(0, 151_936) == 0 and resolve_logits_chunk(64, 55) == 64  # explicit wins
    with pytest.raises(ConfigError, match="trainer.logits_chunk=-2"):
        load_config(None, ["trainer.logits_chunk=-2"])
