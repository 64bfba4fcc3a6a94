"""`Objective.diagnostics=False`: the core computes only what the objective's loss uses (no top-k forward KL or
student entropy for OPD), with the same loss and gradients as with the diagnostics on. The loss benchmark
(examples/benchmarks/loss_overhead.py) times plain OPD this way against EOPD."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import eopd_ray.objectives.core as core
from eopd_ray.config import LossConfig
from eopd_ray.objectives import eopd_loss, eopd_loss_from_hidden, get_objective, objective_names
from test_chunked_loss import _problem

DIAGNOSTIC_KEYS = {"student/entropy", "fkl/gated_mean", "fkl/high_entropy_mean", "fkl/mean"}


def _run(name: str, diagnostics: bool, chunk_size: int, problem=None):
    """(loss, metrics, grads wrt hidden and head) of objective `name` on one float64 problem (`_problem()` by
    default); chunk_size 0 = the full-logits front end."""
    hidden, weight, tokens, old, teacher, mask, seq_adv, V = problem or _problem()
    obj = dataclasses.replace(get_objective(name), diagnostics=diagnostics)
    cfg = LossConfig(objective=name, top_k=teacher.topk_ids.shape[-1])
    kw = dict(generator=torch.Generator().manual_seed(5), objective=obj,
              sequence_advantages=seq_adv if obj.needs_rewards else None)

    def head(h):
        return h @ weight.T

    if chunk_size:
        loss, metrics = eopd_loss_from_hidden(hidden, head, tokens, old, teacher, mask, cfg, chunk_size=chunk_size,
                                              vocab_size=V, **kw)
    else:
        loss, metrics = eopd_loss(head(hidden)[..., :V], tokens, old, teacher, mask, cfg, **kw)
    return loss, metrics, torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("name", objective_names())
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_diagnostics_off_trains_the_same(name, chunk_size):
    on_loss, on_m, on_g = _run(name, True, chunk_size)
    off_loss, off_m, off_g = _run(name, False, chunk_size)
    assert off_loss.item() == pytest.approx(on_loss.item(), rel=1e-12, abs=1e-12)
    for a, b in zip(off_g, on_g):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    obj = get_objective(name)
    kept = set(on_m) - DIAGNOSTIC_KEYS
    kept |= {"student/entropy"} if (obj.trains_entropy or obj.reads_entropy) else set()
    kept |= {"fkl/gated_mean", "fkl/high_entropy_mean", "fkl/mean"} if obj.trains_fkl else set()
    assert set(off_m) == kept
    for key in kept:
        assert off_m[key] == pytest.approx(on_m[key], rel=1e-10, abs=1e-12), key
    assert DIAGNOSTIC_KEYS <= set(on_m)  # with the diagnostics on, every objective reports them


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_plain_opd_skips_the_forward_kl_and_the_entropy(monkeypatch, chunk_size):
    """The work itself is skipped, not just its metrics: OPD without diagnostics never evaluates the student's
    entropy or the top-k forward KL, and gathers one log-prob per position; EOPD without them still evaluates
    its forward KL (and not the entropy)."""
    calls = {"entropy": 0, "fkl": 0, "gathered": []}
    picked, fkl, gather = core.picked_logprobs, core.fkl_at_topk, torch.Tensor.gather

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    def counted_gather(self, dim, index, *a, **k):
        calls["gathered"].append(index.shape[-1])
        return gather(self, dim, index, *a, **k)

    def counted_picked(logits, ids, with_entropy):
        calls["entropy"] += int(with_entropy)
        return picked(logits, ids, with_entropy)

    monkeypatch.setattr(core, "picked_logprobs", counted_picked)
    monkeypatch.setattr(core, "fkl_at_topk", count("fkl", fkl))
    monkeypatch.setattr(torch.Tensor, "gather", counted_gather)
    for name, diagnostics, entropy_calls, fkl_calls, topk in (("opd", True, 1, 1, True), ("opd", False, 0, 0, False),
                                                             ("eopd", False, 0, 1, True)):
        problem = _problem()  # built before counting: making the batch gathers too
        width = problem[4].topk_ids.shape[-1] + 1 if topk else 1
        calls.update(entropy=0, fkl=0, gathered=[])
        _run(name, diagnostics, chunk_size, problem)
        assert calls["fkl"] == fkl_calls, (name, diagnostics, calls)
        # the chunked front end recomputes every chunk in backward: count per forward, at least one call
        assert (calls["entropy"] > 0) == (entropy_calls > 0), (name, diagnostics, calls)
        assert calls["gathered"] and set(calls["gathered"]) == {width}, (name, diagnostics, calls)
