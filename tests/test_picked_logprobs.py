"""The fused log-probs-at-ids and entropy (`eopd_ray/objectives/picked.py`) against slow float64 references
written with loops over positions and the full vocabulary, and its gradients against finite differences."""

import math

import pytest
import torch

from eopd_ray.objectives.picked import picked_logprobs


def _reference(logits, ids):
    """Per position, in Python float64 arithmetic: log p at ids, and the entropy (0 * log 0 = 0)."""
    picked, entropy = [], []
    for row, row_ids in zip(logits.tolist(), ids.tolist()):
        finite = [z for z in row if z != -math.inf]
        m = max(finite)
        lse = m + math.log(sum(math.exp(z - m) for z in finite))
        picked.append([row[i] - lse for i in row_ids])
        entropy.append(-sum(math.exp(z - lse) * (z - lse) for z in finite))
    return torch.tensor(picked, dtype=torch.float64), torch.tensor(entropy, dtype=torch.float64)


def _problem(n=6, v=37, m=4, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    ids = torch.randint(0, v, (n, m), generator=g)
    return logits, ids


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_values_match_a_loop_reference(dtype, tol):
    logits, ids = _problem(scale=8.0)
    picked, entropy = picked_logprobs(logits.to(dtype), ids, True)
    ref_picked, ref_entropy = _reference(logits, ids)
    assert picked.dtype == dtype and entropy.dtype == dtype
    torch.testing.assert_close(picked.double(), ref_picked, atol=tol, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=tol, rtol=0)


def test_masked_ids_contribute_nothing():
    """-inf logits (masked vocabulary ids) have probability 0: finite entropy, -inf log-prob where picked."""
    logits, ids = _problem()
    logits[:, 5:9] = -math.inf
    ids[0, 0] = 6
    picked, entropy = picked_logprobs(logits, ids, True)
    ref_picked, ref_entropy = _reference(logits, ids)
    assert picked[0, 0] == -math.inf
    torch.testing.assert_close(picked, ref_picked, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-12, rtol=0)
    assert torch.isfinite(entropy).all()


def test_gradients_against_finite_differences():
    logits, ids = _problem(n=3, v=11, m=3)
    ids[1] = torch.tensor([4, 4, 7])  # a repeated id gets both gradients
    logits.requires_grad_(True)
    torch.autograd.gradcheck(lambda z: picked_logprobs(z, ids, True), (logits,), eps=1e-6, atol=1e-8)
    torch.autograd.gradcheck(lambda z: picked_logprobs(z, ids, False)[0], (logits,), eps=1e-6, atol=1e-8)


def test_gradients_match_autograd_through_log_softmax():
    """Every combination of the two outputs, weighted, equals autograd through the plain formulas."""
    logits, ids = _problem(n=5, v=29, m=3, seed=3)
    logits[:, 0] = -math.inf  # and a masked id nobody picks gets no gradient, not NaN
    ids = ids.clamp_min(1)
    g = torch.Generator().manual_seed(9)
    w_picked, w_ent = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g,
                                                                                   dtype=torch.float64)
    for use_picked, use_entropy in ((True, False), (False, True), (True, True)):
        z1 = logits.clone().requires_grad_(True)
        picked, entropy = picked_logprobs(z1, ids, True)
        ((picked * w_picked).sum() * use_picked + (entropy * w_ent).sum() * use_entropy).backward()
        z2 = logits.clone().requires_grad_(True)
        logq = torch.log_softmax(z2, -1)
        finite = torch.isfinite(logq)  # masked before the product: 0 * -inf would make the reference NaN
        logq_f = torch.where(finite, logq, 0.0)
        ref_entropy = -torch.where(finite, logq_f.exp() * logq_f, 0.0).sum(-1)
        ((logq.gather(-1, ids) * w_picked).sum() * use_picked + (ref_entropy * w_ent).sum() * use_entropy).backward()
        assert torch.isfinite(z1.grad).all()
        torch.testing.assert_close(z1.grad, z2.grad, atol=1e-12, rtol=0)
        assert (z1.grad[:, 0] == 0).all()


def test_a_detached_entropy_costs_no_gradient_and_changes_nothing():
    logits, ids = _problem()
    z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    picked1, entropy1 = picked_logprobs(z1, ids, True)
    (picked1.sum() + entropy1.detach().sum()).backward()
    picked2, entropy2 = picked_logprobs(z2, ids, False)
    picked2.sum().backward()
    assert entropy2 is None
    torch.testing.assert_close(z1.grad, z2.grad, atol=0, rtol=0)
