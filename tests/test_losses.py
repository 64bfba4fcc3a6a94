"""CPU tests of eopd_ray.losses against slow float64 references written with explicit loops.

The references never call the functions under test: log-softmax, entropy, top-k, forward KL and the PPO
case analysis are re-derived per position with Python loops or full-vocabulary sums.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eopd_ray.config import ConfigError, LossConfig
from eopd_ray.losses import (TokenStats, clipped_mask, clipped_surrogate, eopd_loss, forward_kl_topk, token_stats,
                             token_stats_chunked, token_stats_from_hidden)

F64 = dict(rtol=0.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------- references
def ref_row_logprobs(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def ref_token_stats(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Python-float loop over positions: (logprob, entropy, top-k values, top-k ids) as nested lists."""
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    toks = tokens.reshape(-1).tolist()
    out = []
    for row, tok in zip(rows, toks):
        lp = ref_row_logprobs(row)
        ent = -sum(math.exp(x) * x for x in lp)
        order = sorted(range(len(lp)), key=lambda i: -lp[i])[:k]
        out.append((lp[tok], ent, [lp[i] for i in order], order))
    return out


def ref_fkl(student_row: list[float], ids: list[int], tlp: list[float], renormalize: bool) -> float:
    logq = ref_row_logprobs(student_row)
    if renormalize:
        z = sum(math.exp(x) for x in tlp)
        p = [math.exp(x) / z for x in tlp]
    else:
        p = [math.exp(x) for x in tlp]
    return sum(pj * (math.log(pj) - logq[i]) for pj, i in zip(p, ids))


def ref_eopd(logits, tokens, old, teacher: TokenStats, mask, cfg: LossConfig, gate=None) -> torch.Tensor:
    """Differentiable float64 per-position loop over one (B, T, V) batch; `gate` overrides the gate. The forward
    KL is divided by the response tokens, or by the gated ones under fkl_normalizer=gated_tokens."""
    B, T, _ = logits.shape
    n = int(mask.sum())
    total = torch.zeros((), dtype=torch.float64)
    fkl, n_gated = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for t in range(T):
            if not bool(mask[b, t]):
                continue
            row = logits[b, t].double()
            m = row.max().detach()
            logq = row - (m + torch.log(torch.exp(row - m).sum()))
            ent = -(torch.exp(logq) * logq).sum()
            lp = logq[int(tokens[b, t])]
            adv = float(teacher.logprobs[b, t]) - float(old[b, t])
            if cfg.objective == "advantage_shaping":
                adv += min(cfg.shaping_alpha * ent.item(), abs(adv) / cfg.shaping_kappa)
            r = torch.exp(lp - float(old[b, t]))
            if adv >= 0:  # PPO case analysis: the clip only bites in the direction the advantage pushes
                total = total - torch.clamp(r, max=1 + cfg.clip_eps) * adv
            else:
                total = total - torch.clamp(r, min=1 - cfg.clip_eps) * adv
            if gate is not None:
                on = bool(gate[b, t])
            else:
                on = {"eopd": float(teacher.entropy[b, t]) > cfg.tau, "full_fkl": True}.get(cfg.objective, False)
            if on:
                n_gated += 1
                ids = teacher.topk_ids[b, t].tolist()
                tlp = teacher.topk_logprobs[b, t].double().tolist()
                p = [math.exp(x) for x in tlp]
                if cfg.renormalize:
                    p = [x / sum(p) for x in p]
                for pj, i in zip(p, ids):
                    fkl = fkl + cfg.fkl_coef * pj * (math.log(pj) - logq[i])
            if cfg.objective == "entropy_bonus":
                total = total - cfg.entropy_coef * ent
    return total / n + fkl / max(n_gated if cfg.fkl_normalizer == "gated_tokens" else n, 1)


def teacher_from_logits(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> TokenStats:
    """Input generation (not a reference): teacher stats built with plain torch ops."""
    lp = torch.log_softmax(logits.double(), -1)
    v, i = lp.topk(k, -1)
    return TokenStats(lp.gather(-1, tokens[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1), v, i)


def make_batch(B=3, T=6, V=11, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_(True)
    # Per-position temperatures spread the teacher entropies on both sides of tau = 0.8.
    scale = torch.rand(B, T, 1, generator=g, dtype=torch.float64) * 4.0 + 0.3
    t_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    tokens = torch.randint(0, V, (B, T), generator=g)
    teacher = teacher_from_logits(t_logits, tokens, k)
    s_lp = torch.log_softmax(student.detach().double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = s_lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4  # ratios inside and outside the clip
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[0, 0] = True
    mask[0, -1] = False
    return student, tokens, old, teacher, mask


# ----------------------------------------------------------------------------------------------- token_stats
def assert_stats_match_ref(stats: TokenStats, ref, atol: float):
    assert torch.allclose(stats.logprobs.reshape(-1).double(), torch.tensor([r[0] for r in ref], dtype=torch.float64),
                          rtol=0, atol=atol)
    assert torch.allclose(stats.entropy.reshape(-1).double(), torch.tensor([r[1] for r in ref], dtype=torch.float64),
                          rtol=0, atol=atol)
    k = stats.topk_ids.shape[-1]
    assert torch.allclose(stats.topk_logprobs.reshape(-1, k).double(),
                          torch.tensor([r[2] for r in ref], dtype=torch.float64), rtol=0, atol=atol)
    assert stats.topk_ids.dtype == torch.int64
    assert stats.topk_ids.reshape(-1, k).tolist() == [r[3] for r in ref]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_token_stats_matches_float64_loop(dtype, atol):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 37, generator=g, dtype=torch.float64) * 3).to(dtype)
    tokens = torch.randint(0, 37, (2, 5), generator=g)
    stats = token_stats(logits, tokens, top_k=6)
    assert stats.logprobs.shape == (2, 5) and stats.topk_ids.shape == (2, 5, 6)
    assert stats.entropy.dtype == dtype
    assert_stats_match_ref(stats, ref_token_stats(logits, tokens, 6), atol)


def test_token_stats_bf16_gives_float32_close_to_reference():
    g = torch.Generator().manual_seed(2)
    logits32 = torch.randn(3, 4, 50, generator=g) * 3
    tokens = torch.randint(0, 50, (3, 4), generator=g)
    stats = token_stats(logits32.bfloat16(), tokens, top_k=5)
    assert stats.logprobs.dtype == stats.entropy.dtype == stats.topk_logprobs.dtype == torch.float32
    # Tight against the exact statistics of the bf16-rounded values, loose against the unrounded logits.
    assert_stats_match_ref(stats, ref_token_stats(logits32.bfloat16(), tokens, 5), 5e-6)
    ref32 = token_stats(logits32, tokens, top_k=5)
    assert torch.allclose(stats.entropy, ref32.entropy, rtol=0, atol=0.05)
    assert torch.allclose(stats.logprobs, ref32.logprobs, rtol=0, atol=0.1)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 10, 64])
def test_token_stats_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 29, generator=g).bfloat16()
    tokens = torch.randint(0, 29, (2, 5), generator=g)
    full, part = token_stats(logits, tokens, 4), token_stats_chunked(logits, tokens, 4, chunk_size=chunk)
    for f in dataclasses.fields(TokenStats):
        assert torch.equal(getattr(full, f.name), getattr(part, f.name)), f.name


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_token_stats_from_hidden_equals_token_stats_on_logits(chunk):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(23, 8, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 23, (3, 5), generator=g)
    ref = ref_token_stats(hidden @ weight.T, tokens, 5)
    assert_stats_match_ref(token_stats_from_hidden(hidden, weight, tokens, 5, chunk_size=chunk), ref, 1e-12)
    head = lambda h: h @ weight.T  # noqa: E731 - a callable head (e.g. an nn.Linear) works the same
    assert_stats_match_ref(token_stats_from_hidden(hidden, head, tokens, 5, chunk_size=chunk), ref, 1e-12)


def test_vocab_size_slicing_excludes_padded_ids():
    g = torch.Generator().manual_seed(5)
    V, pad, k = 19, 6, 7
    hidden = torch.cat([torch.randn(2, 4, 5, generator=g, dtype=torch.float64), torch.ones(2, 4, 1, dtype=torch.float64)], -1)
    weight = torch.randn(V + pad, 6, generator=g, dtype=torch.float64)
    weight[:, -1] = 0.0
    weight[V:, -1] = 100.0  # padded rows: huge logits everywhere
    tokens = torch.randint(0, V, (2, 4), generator=g)
    logits = hidden @ weight.T
    assert (token_stats(logits, tokens, k).topk_ids >= V).any()  # the padding does leak without vocab_size
    ref = ref_token_stats(logits[..., :V], tokens, k)
    outs = [token_stats(logits, tokens, k, vocab_size=V), token_stats_chunked(logits, tokens, k, 3, vocab_size=V),
            token_stats_from_hidden(hidden, weight, tokens, k, chunk_size=3, vocab_size=V),
            token_stats_from_hidden(hidden, lambda h: h @ weight.T, tokens, k, chunk_size=3, vocab_size=V)]
    for stats in outs:
        assert int(stats.topk_ids.max()) < V
        assert_stats_match_ref(stats, ref, 1e-12)


def test_token_stats_rejects_out_of_vocab_tokens():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="token ids"):
        token_stats(logits, torch.tensor([1, 10]), 3)
    with pytest.raises(ValueError, match="token ids"):
        token_stats(torch.zeros(2, 12), torch.tensor([1, 10]), 3, vocab_size=10)


def test_token_stats_to_and_index():
    stats = token_stats(torch.randn(4, 3, 9), torch.zeros(4, 3, dtype=torch.long), 2)
    moved, sub = stats.to("cpu"), stats.index(slice(1, 3))
    assert torch.equal(moved.topk_ids, stats.topk_ids)
    assert sub.topk_logprobs.shape == (2, 3, 2) and torch.equal(sub.entropy, stats.entropy[1:3])


# ----------------------------------------------------------------------------------------------- forward KL
def fkl_inputs(N=7, V=13, k=5, seed=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_(True)
    tlp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    v, i = tlp.topk(k, -1)
    return student, i, v


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 5e-6), (torch.bfloat16, 5e-6)])
def test_forward_kl_topk_matches_loop(renormalize, dtype, atol):
    student, ids, tlp = fkl_inputs(dtype=dtype)
    out = forward_kl_topk(student, ids, tlp, renormalize=renormalize)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == (7,)
    ref = [ref_fkl(s, i, t, renormalize) for s, i, t in zip(student.detach().double().tolist(), ids.tolist(), tlp.tolist())]
    assert torch.allclose(out.double(), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=atol)
    out.sum().backward()
    assert student.grad is not None and student.grad.dtype == dtype and torch.isfinite(student.grad.float()).all()


def test_forward_kl_identities():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 9, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(logits, -1)
    v, i = lp.topk(9, -1)  # k == V
    for renorm in (True, False):
        assert torch.allclose(forward_kl_topk(logits, i, v, renorm), torch.zeros(5, dtype=torch.float64), **F64)
    v, i = lp.topk(3, -1)  # k < V: the renormalised KL to the same model is -log(top-k mass)
    mass = torch.tensor([sum(math.exp(x) for x in row) for row in v.tolist()], dtype=torch.float64)
    assert torch.allclose(forward_kl_topk(logits, i, v, True), -torch.log(mass), **F64)
    assert (forward_kl_topk(logits, i, v, True) > 1e-3).all()
    assert torch.allclose(forward_kl_topk(logits, i, v, False), torch.zeros(5, dtype=torch.float64), **F64)


@pytest.mark.parametrize("renormalize", [True, False])
def test_forward_kl_gradient_is_analytic(renormalize):
    student, ids, tlp = fkl_inputs(seed=8)
    tlp = tlp.clone().requires_grad_(True)
    forward_kl_topk(student, ids, tlp, renormalize).sum().backward()
    assert tlp.grad is None  # the teacher is a constant
    q = torch.softmax(student.detach(), -1)
    p = torch.softmax(tlp.detach(), -1) if renormalize else tlp.detach().exp()
    expected = q * p.sum(-1, keepdim=True) - torch.zeros_like(q).scatter(-1, ids, p)
    assert torch.allclose(student.grad, expected, **F64)


# ----------------------------------------------------------------------------------------------- PPO surrogate
def test_clipped_surrogate_cases_and_gradient():
    eps = 0.2
    cases = [(r, a) for r in (0.5, 0.79, 0.9, 1.0, 1.1, 1.21, 1.5) for a in (-2.0, -0.5, 0.7, 3.0)]
    logprobs = torch.tensor([math.log(r) - 0.3 for r, _ in cases], dtype=torch.float64, requires_grad=True)
    old = torch.full((len(cases),), -0.3, dtype=torch.float64)
    adv = torch.tensor([a for _, a in cases], dtype=torch.float64)
    loss = clipped_surrogate(logprobs, old, adv, eps)
    ref, ref_grad, ref_clip = [], [], []
    for r, a in cases:
        clipped = (a > 0 and r > 1 + eps) or (a < 0 and r < 1 - eps)
        ref.append(-min(r, 1 + eps) * a if a > 0 else -max(r, 1 - eps) * a)
        ref_grad.append(0.0 if clipped else -r * a)  # d(-r a)/d logprob = -r a
        ref_clip.append(clipped)
    assert torch.allclose(loss, torch.tensor(ref, dtype=torch.float64), **F64)
    loss.sum().backward()
    assert torch.allclose(logprobs.grad, torch.tensor(ref_grad, dtype=torch.float64), **F64)
    assert clipped_mask(logprobs, old, adv, eps).tolist() == ref_clip
    assert 0 < sum(ref_clip) < len(cases)


# ----------------------------------------------------------------------------------------------- eopd_loss
def run(objective, batch=None, **cfg_kw):
    student, tokens, old, teacher, mask = batch if batch is not None else make_batch()
    cfg = LossConfig(objective=objective, **cfg_kw)
    student.grad = None
    loss, metrics = eopd_loss(student, tokens, old, teacher, mask, cfg)  # random_fkl: seeded by cfg
    loss.backward()
    return loss.detach(), student.grad.clone(), metrics


@pytest.mark.parametrize("objective,kw", [("eopd", {}), ("eopd", {"renormalize": False, "fkl_coef": 0.5}),
                                          ("entropy_bonus", {"entropy_coef": 0.3}),
                                          ("advantage_shaping", {"shaping_alpha": 0.4}), ("opd", {}),
                                          ("full_fkl", {})])
def test_eopd_loss_matches_float64_loop(objective, kw):
    batch = make_batch(seed=11)
    student, tokens, old, teacher, mask = batch
    cfg = LossConfig(objective=objective, **kw)
    loss, metrics = eopd_loss(student, tokens, old, teacher, mask, cfg)
    (grad,) = torch.autograd.grad(loss, student)
    ref = ref_eopd(student, tokens, old, teacher, mask, cfg)
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert torch.allclose(loss, ref, **F64) and torch.allclose(grad, ref_grad, **F64)
    assert metrics["loss/total"] == pytest.approx(ref.item(), rel=0, abs=1e-12)
    if objective == "eopd":
        assert 0 < metrics["tokens/gated"] < metrics["tokens/masked"]  # the gate really splits positions
    if objective == "advantage_shaping":  # the shaping term really changes the loss
        assert abs(loss.item() - run("opd", batch)[0].item()) > 1e-4
    assert 0 < metrics["pg/clip_fraction"] < 1


def test_eopd_loss_bf16_student_close_to_reference():
    student, tokens, old, teacher, mask = make_batch(seed=12)
    s16 = student.detach().bfloat16().requires_grad_(True)
    loss, _ = eopd_loss(s16, tokens, old, teacher, mask, LossConfig())
    assert loss.dtype == torch.float32
    ref = ref_eopd(s16.detach().double(), tokens, old, teacher, mask, LossConfig())
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


def test_student_equal_teacher_gives_zero_advantage():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    teacher = teacher_from_logits(logits, tokens, k=7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for objective in ("opd", "eopd", "full_fkl"):
        student = logits.clone().requires_grad_(True)
        loss, m = eopd_loss(student, tokens, teacher.logprobs, teacher, mask, LossConfig(objective=objective, tau=0.0))
        loss.backward()
        assert m["pg/advantage_mean"] == 0.0 and m["kl/reverse"] == 0.0 and m["pg/ratio_mean"] == pytest.approx(1, abs=1e-12)
        assert abs(loss.item()) < 1e-12 and student.grad.abs().max().item() < 1e-12


def test_tau_limits_equal_opd_and_full_fkl_exactly():
    batch = make_batch(seed=14)
    for a, b in ((run("eopd", batch, tau=float("inf")), run("opd", batch)),
                 (run("eopd", batch, tau=-1.0), run("full_fkl", batch))):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(run("opd", batch)[0], run("full_fkl", batch)[0])


@pytest.mark.parametrize("objective", ["eopd", "advantage_shaping", "random_fkl"])
def test_no_gradient_through_teacher_gate_or_advantage(objective):
    student, tokens, old, teacher, mask = make_batch(seed=15)
    leaves = TokenStats(teacher.logprobs.clone().requires_grad_(True), teacher.entropy.clone().requires_grad_(True),
                        teacher.topk_logprobs.clone().requires_grad_(True), teacher.topk_ids)
    old_leaf = old.clone().requires_grad_(True)
    cfg = LossConfig(objective=objective, tau=0.5)
    loss, _ = eopd_loss(student, tokens, old_leaf, leaves, mask, cfg, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert all(t.grad is None for t in (leaves.logprobs, leaves.entropy, leaves.topk_logprobs, old_leaf))
    grad = student.grad.clone()
    student.grad = None
    loss2, _ = eopd_loss(student, tokens, old, teacher, mask, cfg, generator=torch.Generator().manual_seed(1))
    loss2.backward()
    assert torch.equal(grad, student.grad) and torch.equal(loss.detach(), loss2.detach())


@pytest.mark.parametrize("objective", ["opd", "eopd", "full_fkl", "random_fkl", "entropy_bonus", "advantage_shaping"])
def test_positions_outside_mask_change_nothing(objective):
    student, tokens, old, teacher, mask = make_batch(seed=16)
    out = ~mask
    nan = float("nan")
    t2 = TokenStats(teacher.logprobs.masked_fill(out, nan), teacher.entropy.masked_fill(out, nan),
                    teacher.topk_logprobs.masked_fill(out[..., None], nan),
                    teacher.topk_ids.masked_fill(out[..., None], 10_000))
    s2 = torch.where(out[..., None], torch.randn_like(student) * 50, student.detach()).requires_grad_(True)
    batch2 = (s2, tokens.masked_fill(out, -100), old.masked_fill(out, nan), t2, mask)
    a, b = run(objective, (student, tokens, old, teacher, mask)), run(objective, batch2)
    assert torch.isfinite(b[0]) and torch.isfinite(b[1]).all()
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert torch.equal(a[1][mask], b[1][mask]) and (b[1][out] == 0).all()


@pytest.mark.parametrize("objective,kw", [("eopd", {}), ("full_fkl", {}), ("entropy_bonus", {"entropy_coef": 0.2}),
                                          ("advantage_shaping", {}), ("eopd", {"fkl_normalizer": "gated_tokens"})])
def test_split_minibatch_sums_to_full_loss_and_gradient(objective, kw):
    g = torch.Generator().manual_seed(17)
    _, tokens, old, teacher, mask = make_batch(B=4, T=6, V=11, seed=17)
    mask[:2, :] = True  # unequal halves: a per-call token mean would not sum to the full loss
    h = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(objective=objective, **kw)
    n_gated = int((mask & (teacher.entropy > cfg.tau)).sum())
    full, _ = eopd_loss(h @ w, tokens, old, teacher, mask, cfg, num_gated=n_gated)
    (g_full,) = torch.autograd.grad(full, w)
    parts, g_sum = 0.0, torch.zeros_like(w)
    for sl in (slice(0, 2), slice(2, 4)):
        part, _ = eopd_loss(h[sl] @ w, tokens[sl], old[sl], teacher.index(sl), mask[sl], cfg,
                            num_tokens=int(mask.sum()), num_gated=n_gated)
        g_sum += torch.autograd.grad(part, w)[0]
        parts += part.item()
    assert parts == pytest.approx(full.item(), rel=0, abs=1e-12)
    assert torch.allclose(g_sum, g_full, **F64)


def test_random_fkl_seeded_and_fraction():
    batch = make_batch(B=40, T=100, V=8, k=3, seed=18)
    student, tokens, old, teacher, mask = batch
    cfg = LossConfig(objective="random_fkl", random_fraction=0.2, random_seed=3)

    def call(gen):
        loss, m = eopd_loss(student, tokens, old, teacher, mask, cfg, generator=gen)
        return loss.item(), m

    a, b = call(torch.Generator().manual_seed(5)), call(torch.Generator().manual_seed(5))
    assert a == b
    assert abs(a[1]["gate/fraction"] - 0.2) < 0.03  # 4000 positions: 5 standard deviations
    assert call(torch.Generator().manual_seed(6))[1]["tokens/gated"] != a[1]["tokens/gated"]
    assert call(None) == call(torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(5)  # a persistent generator draws a fresh gate each call
    assert call(gen) != call(gen)
    # Against the loop reference with the gate it must have drawn.
    small = make_batch(seed=19)
    draw = torch.rand(small[4].shape, generator=torch.Generator().manual_seed(9)) < 0.5
    cfg2 = LossConfig(objective="random_fkl", random_fraction=0.5)
    loss, m = eopd_loss(*small, cfg2, generator=torch.Generator().manual_seed(9))
    ref = ref_eopd(*small, cfg2, gate=draw & small[4])
    assert abs(loss.item() - ref.item()) < 1e-12 and m["tokens/gated"] == int((draw & small[4]).sum()) > 0


@pytest.mark.parametrize("normalizer", ["all_tokens", "gated_tokens"])
def test_metrics_hand_computed(normalizer):
    lq = math.log(0.25)
    student = torch.zeros(1, 4, 4, dtype=torch.float64, requires_grad=True)  # uniform: log q = log 1/4
    tokens = torch.tensor([[0, 1, 2, 3]])
    ratios = [1.5, 1.0, 0.5, 1.0]
    old = torch.tensor([[lq - math.log(r) for r in ratios]], dtype=torch.float64)
    l5, l9, l1 = math.log(0.5), math.log(0.9), math.log(0.1)
    teacher = TokenStats(old + 1.0, torch.tensor([[0.5, 1.0, 0.9, 5.0]], dtype=torch.float64),
                         torch.tensor([[[l5, l5], [l5, l5], [l9, l1], [l5, l5]]], dtype=torch.float64),
                         torch.tensor([[[0, 1], [2, 3], [0, 1], [0, 1]]]))
    mask = torch.tensor([[True, True, True, False]])
    cfg = LossConfig(objective="eopd", tau=0.9, fkl_coef=0.5, clip_eps=0.2, fkl_normalizer=normalizer)
    loss, m = eopd_loss(student, tokens, old, teacher, mask, cfg)
    fkl1 = math.log(2.0)
    fkl2 = 0.9 * math.log(0.9 / 0.25) + 0.1 * math.log(0.1 / 0.25)
    pg = (-1.2 - 1.0 - 0.5) / 3  # A = 1: clipped at r = 1.5, not at r = 0.5 (the clip only bites upward)
    fkl_term = 0.5 * fkl1 / (3 if normalizer == "all_tokens" else 1)
    expected = {"loss/pg": pg, "loss/fkl": fkl_term, "loss/total": pg + fkl_term, "loss/entropy": 0.0,
                "gate/fraction": 1 / 3, "teacher/entropy": 0.8, "student/entropy": math.log(4.0),
                "fkl/gated_mean": fkl1, "fkl/high_entropy_mean": (fkl1 + fkl2) / 2,
                "fkl/mean": (fkl1 + fkl1 + fkl2) / 3, "pg/clip_fraction": 1 / 3, "pg/ratio_mean": 1.0,
                "pg/advantage_mean": 1.0, "kl/reverse": -1.0, "tokens/masked": 3, "tokens/gated": 1,
                "tokens/high_entropy": 2}
    assert set(expected) <= set(m) and all(isinstance(v, float) for v in m.values())
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=0, abs=1e-12), key
    assert loss.item() == pytest.approx(pg + fkl_term, rel=0, abs=1e-12)


def test_empty_mask_and_no_gated_tokens_are_finite_zeros():
    student, tokens, old, teacher, mask = make_batch(seed=20)
    loss, m = eopd_loss(student, tokens, old, teacher, torch.zeros_like(mask), LossConfig())
    assert loss.item() == 0.0 and m["tokens/masked"] == 0 and all(math.isfinite(v) for v in m.values())
    loss, m = eopd_loss(student, tokens, old, teacher, mask, LossConfig(tau=1e9, fkl_normalizer="gated_tokens"))
    assert m["fkl/gated_mean"] == 0.0 and m["loss/fkl"] == 0.0 and math.isfinite(loss.item())


def test_config_validation_names_bad_objective():
    with pytest.raises(ConfigError, match="bad"):
        LossConfig(objective="bad").validate()
    student, tokens, old, teacher, mask = make_batch()
    with pytest.raises(ConfigError, match="bad"):
        eopd_loss(student, tokens, old, teacher, mask, LossConfig(objective="bad"))


# ---- baselines of the comparison harness: GRPO advantages and off-policy KD ---------------------------------

def test_group_normalized_advantages_match_loop():
    from eopd_ray.losses import group_normalized_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9, 9])
    out = group_normalized_advantages(rewards, groups)
    for i in range(len(rewards)):
        members = [float(rewards[j]) for j in range(len(rewards)) if groups[j] == groups[i]]
        mu = sum(members) / len(members)
        sd = (sum((m - mu) ** 2 for m in members) / len(members)) ** 0.5
        assert float(out[i]) == pytest.approx((float(rewards[i]) - mu) / (sd + 1e-6), abs=1e-5)
    assert torch.all(out[3:6] == 0)  # all-correct group: no signal


def test_grpo_loss_uses_sequence_advantages():
    g = torch.Generator().manual_seed(5)
    B, T, V, K = 3, 4, 11, 4
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    teacher = token_stats(torch.randn(B, T, V, generator=g, dtype=torch.float64), tokens, K)
    adv = torch.tensor([0.7, -1.2, 0.0], dtype=torch.float64)
    cfg = LossConfig(objective="grpo", clip_eps=0.2)
    loss, _ = eopd_loss(logits, tokens, old, teacher, mask, cfg, sequence_advantages=adv)
    ref, n = 0.0, 0
    logq = torch.log_softmax(logits.detach(), -1)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(float(logq[b, t, tokens[b, t]]) - float(old[b, t]))
            a = float(adv[b])
            ref += max(-r * a, -min(max(r, 0.8), 1.2) * a)
            n += 1
    assert float(loss) == pytest.approx(ref / n, abs=1e-10)
    with pytest.raises(ValueError, match="sequence_advantages"):
        eopd_loss(logits, tokens, old, teacher, mask, cfg)


def test_kd_loss_is_cross_entropy_plus_forward_kl_everywhere():
    g = torch.Generator().manual_seed(6)
    B, T, V, K = 2, 5, 9, 3
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4] = False
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = token_stats(teacher_logits, tokens, K)
    cfg = LossConfig(objective="kd", kd_ce_coef=0.5, kd_fkl_coef=0.5, tau=100.0)
    loss, metrics = eopd_loss(logits, tokens, torch.zeros(B, T, dtype=torch.float64), teacher, mask, cfg)
    logq, logp = torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)
    ref, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ids = sorted(range(V), key=lambda v: -float(logp[b, t, v]))[:K]
            mass = sum(math.exp(float(logp[b, t, v])) for v in ids)
            fkl = sum(math.exp(float(logp[b, t, v])) / mass * (float(logp[b, t, v]) - math.log(mass) - float(logq[b, t, v]))
                      for v in ids)
            ref += 0.5 * -float(logq[b, t, tokens[b, t]]) + 0.5 * fkl
            n += 1
    assert float(loss) == pytest.approx(ref / n, abs=1e-10)
    assert metrics["gate/fraction"] == 1.0  # the forward KL applies at every position, whatever tau
