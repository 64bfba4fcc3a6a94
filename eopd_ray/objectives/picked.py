"""The student's log-probs at a few ids per position, and its entropy, from logits in one fused pass.

An objective needs log pi(y_t) at the sampled token, at the teacher's top-k ids (the forward KL) and often
the student's entropy. Through autograd that is a (N, V) log-softmax, a (N, V) entropy product and, in the
backward, a dense (N, V) gather gradient plus the log-softmax's: at the paper's V = 151,936 these V-wide
passes, not the matmuls, are most of the loss's time on a CPU, and the entropy alone cost EOPD about 15% over
plain OPD (docs/results.md). Here the forward makes one (N, V) exp and reduces it twice (its sum for the
log-normaliser, its dot with the logits for the entropy); the backward makes one (N, V) softmax and writes
the gradient into it in place.

With p = softmax(z), lse = logsumexp(z), H = -sum_j p_j log p_j = lse - sum_j p_j z_j:
    d log p_i / dz = onehot(i) - p            d H / dz_j = -p_j (log p_j + H)
"""

from __future__ import annotations

import torch

from eopd_ray.stats import entropy_from_logprobs


class _PickedLogSoftmax(torch.autograd.Function):
    """(N, V) logits, (N, M) int64 ids -> ((N, M) log-softmax at ids, (N,) entropy or an empty tensor)."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, ids_NM: torch.Tensor, with_entropy: bool):
        ctx.set_materialize_grads(False)  # an output nobody differentiates (a detached entropy) costs nothing
        max_N1 = logits_NV.amax(-1, keepdim=True)
        max_N1 = torch.where(torch.isfinite(max_N1), max_N1, torch.zeros_like(max_N1))  # an all -inf row
        exp_NV = torch.sub(logits_NV, max_N1).exp_()
        sum_N1 = exp_NV.sum(-1, keepdim=True)
        lse_N1 = max_N1 + sum_N1.log()
        picked_NM = logits_NV.gather(-1, ids_NM) - lse_N1
        if with_entropy:
            # sum_j p_j z_j as a batched dot product: no third (N, V) tensor
            pz_N = torch.bmm(exp_NV.unsqueeze(1), logits_NV.unsqueeze(2)).view(-1) / sum_N1.view(-1)
            entropy_N = lse_N1.view(-1) - pz_N
            bad_N = ~torch.isfinite(entropy_N)
            if bad_N.any():  # -inf logits (masked ids) make 0 * -inf; they contribute 0 to the entropy
                entropy_N[bad_N] = entropy_from_logprobs(logits_NV[bad_N] - lse_N1[bad_N])
        else:
            entropy_N = logits_NV.new_zeros(0)
            ctx.mark_non_differentiable(entropy_N)
        del exp_NV
        ctx.save_for_backward(logits_NV, lse_N1, ids_NM, entropy_N)
        return picked_NM, entropy_N

    @staticmethod
    def backward(ctx, grad_picked_NM: torch.Tensor, grad_entropy_N: torch.Tensor):
        logits_NV, lse_N1, ids_NM, entropy_N = ctx.saved_tensors
        if grad_picked_NM is None:
            grad_picked_NM = torch.zeros(ids_NM.shape, dtype=logits_NV.dtype, device=logits_NV.device)
        grad_NV = torch.sub(logits_NV, lse_N1).exp_()  # p, then the gradient in place
        if grad_entropy_N is not None and entropy_N.numel():
            # -g_H p (log p + H) = -g_H p (z - lse + H); -inf logits have p = 0 and get 0
            g_N1 = grad_entropy_N.view(-1, 1)
            logq_plus_h = torch.sub(logits_NV, lse_N1 - entropy_N.view(-1, 1))
            term_NV = grad_NV * logq_plus_h.masked_fill_(grad_NV == 0, 0.0)
            grad_NV.mul_(-grad_picked_NM.sum(-1, keepdim=True)).sub_(term_NV * g_N1)
        else:
            grad_NV.mul_(-grad_picked_NM.sum(-1, keepdim=True))
        grad_NV.scatter_add_(-1, ids_NM, grad_picked_NM)
        return grad_NV, None, None


def picked_logprobs(logits_NV: torch.Tensor, ids_NM: torch.Tensor,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log_softmax(logits)[n, ids[n, m]] (N, M), entropy of softmax(logits) (N,) or None), both
    differentiable with respect to logits_NV (N, V); ids_NM (N, M) int64 in [0, V). Equals
    `log_softmax(...).gather(...)` and `-(p * log p).sum(-1)` up to rounding; -inf logits give probability 0."""
    picked_NM, entropy_N = _PickedLogSoftmax.apply(logits_NV, ids_NM, with_entropy)
    return picked_NM, (entropy_N if with_entropy else None)
