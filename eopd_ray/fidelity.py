"""Fidelity to the teacher, exact over the full vocabulary, and diversity of sampled responses.

For a model M and the teacher T, on held-out prompts (per token, averaged over all response tokens):
- reverse KL, KL(p_M || p_T), at the positions of M's own samples (what on-policy distillation minimises);
- forward KL, KL(p_T || p_M), at the positions of the teacher's samples (how well M covers what T writes);
  also over only the teacher-sample positions where the teacher's entropy is >= tau (the positions EOPD gates);
- the teacher's NLL of M's samples, -log p_T(x_t), and the teacher's entropy there;
- distinct n-grams across the k samples of a prompt.

Under a teacher context of its own (teacher.prompt_template / system_prompt) every sample is read by the
teacher after the teacher's prompt and by M after the student's prompt, as in training (`Samples`).

Every distribution is a log-softmax over the shared real vocabulary (the first `vocab` ids), in float64, from
the models' own logits. At a 135M model and 50k tokens this is cheap; at 8B and 150k it is a GPU job, and
`eval.fidelity=false` turns it off. A teacher of another tokenizer (teacher.tokenizer=cross) has no shared
vocabulary: `cross_fidelity` estimates the reverse KL over whole responses, per teacher token.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch


@torch.no_grad()
def response_logprobs(model, prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], vocab: int,
                      batch_size: int = 8) -> Iterator[torch.Tensor]:
    """For each (prompt, response) pair in order, the (R, vocab) float64 log-probabilities the model gives each
    response position (the distribution the response token at that position was drawn from).

    Rows are laid out [left padding, prompt, response, right padding], so every response starts at the same
    column and the output head runs on the response columns only (`logits_to_keep`)."""
    device = next(model.parameters()).device
    for b in range(0, len(prompts), batch_size):
        ps = [np.asarray(p, dtype=np.int64) for p in prompts[b:b + batch_size]]
        rs = [np.asarray(r, dtype=np.int64) for r in responses[b:b + batch_size]]
        if any(len(p) == 0 for p in ps):  # the first response token is predicted from the prompt's last one
            raise ValueError("response_logprobs: every prompt needs at least one token")
        p_max, r_max = max(len(p) for p in ps), max(max(len(r) for r in rs), 1)
        ids_BS = torch.zeros(len(ps), p_max + r_max, dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BS)
        for i, (p, r) in enumerate(zip(ps, rs)):
            ids_BS[i, p_max - len(p):p_max] = torch.from_numpy(p)
            ids_BS[i, p_max:p_max + len(r)] = torch.from_numpy(r)
            mask_BS[i, p_max - len(p):p_max + len(r)] = 1
        pos_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        # the logits at columns p_max-1 .. p_max+r_max-2 predict response tokens 0 .. r_max-1
        out = model(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device), position_ids=pos_BS.to(device),
                    use_cache=False, logits_to_keep=r_max + 1)
        logits_BRV = out.logits[:, :r_max, :vocab].double()
        logp_BRV = torch.log_softmax(logits_BRV, dim=-1).cpu()
        for i, r in enumerate(rs):
            yield logp_BRV[i, :len(r)]


class Samples(NamedTuple):
    """Sampled responses and the prompts they follow, in the student's and in the teacher's context.

    prompts: (P_i,) ids the model measured reads; responses: (R_i,) ids; teacher_prompts: (P'_i,) ids the
    teacher reads (None: `prompts`, the default context). A plain (prompts, responses) pair is taken too."""

    prompts: Sequence[np.ndarray]
    responses: Sequence[np.ndarray]
    teacher_prompts: Sequence[np.ndarray] | None = None

    def teacher_side(self) -> Sequence[np.ndarray]:
        return self.prompts if self.teacher_prompts is None else self.teacher_prompts


def kl_R(logp_a_RV: torch.Tensor, logp_b_RV: torch.Tensor) -> torch.Tensor:
    """(R,) KL(a || b) = sum_v p_a (log p_a - log p_b) per position (0 * log 0 counted as 0)."""
    p_a = logp_a_RV.exp()
    return torch.where(p_a > 0, p_a * (logp_a_RV - logp_b_RV), torch.zeros_like(p_a)).sum(-1)


def entropy_R(logp_RV: torch.Tensor) -> torch.Tensor:
    p = logp_RV.exp()
    return -torch.where(p > 0, p * logp_RV, torch.zeros_like(p)).sum(-1)


def _mean(parts: list[torch.Tensor]) -> float | None:
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return float(flat.mean()) if flat.numel() else None


def fidelity(model, teacher, own, teacher_samples, vocab: int, tau: float, batch_size: int = 8) -> dict:
    """Fidelity of `model` to `teacher` (module docstring). own / teacher_samples: `Samples` (or (prompt id
    arrays, response id arrays) pairs) sampled from the model and from the teacher; the model reads each after
    `prompts`, the teacher after `teacher_prompts`. Means are over response tokens; None where no token."""
    own = Samples(*own)
    rkl, nll, t_ent = [], [], []
    # the teacher against itself: one forward in its own context (its KLs are exactly 0)
    own_m = response_logprobs(model, own.teacher_side() if model is teacher else own.prompts, own.responses, vocab,
                              batch_size)
    pairs = ((lp, lp) for lp in own_m) if model is teacher else \
        zip(own_m, response_logprobs(teacher, own.teacher_side(), own.responses, vocab, batch_size))
    for resp, (lp_m_RV, lp_t_RV) in zip(own.responses, pairs):
        ids_R = torch.as_tensor(np.asarray(resp, dtype=np.int64))
        rkl.append(kl_R(lp_m_RV, lp_t_RV))
        nll.append(-lp_t_RV.gather(-1, ids_R[:, None])[:, 0])
        t_ent.append(entropy_R(lp_t_RV))
    out = {"reverse_kl": _mean(rkl), "teacher_nll": _mean(nll), "teacher_entropy_on_samples": _mean(t_ent),
           "response_tokens": int(sum(len(r) for r in own.responses))}
    if teacher_samples is not None:
        ts = Samples(*teacher_samples)
        fkl, fkl_gated, gated = [], [], 0
        pairs = zip(response_logprobs(teacher, ts.teacher_side(), ts.responses, vocab, batch_size),
                    response_logprobs(model, ts.teacher_side() if model is teacher else ts.prompts, ts.responses,
                                      vocab, batch_size))
        for lp_t_RV, lp_m_RV in pairs:
            f_R = kl_R(lp_t_RV, lp_m_RV)
            high_R = entropy_R(lp_t_RV) >= tau
            fkl.append(f_R)
            fkl_gated.append(f_R[high_R])
            gated += int(high_R.sum())
        out.update({"forward_kl": _mean(fkl), "forward_kl_high_entropy": _mean(fkl_gated),
                    "teacher_high_entropy_positions": gated,
                    "teacher_sample_tokens": int(sum(len(r) for r in ts.responses))})
    return out


def distinct_ngrams(samples: Sequence[Sequence[int]], n: int = 2) -> float | None:
    """Distinct n-grams across the samples of one prompt over all n-grams they hold: 1.0 when no n-gram repeats
    (within or across samples), 1/len when every sample is the same repeated token. None: no n-gram at all."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def diversity(responses_PK: Sequence[Sequence[Sequence[int]]], n: int = 2) -> float | None:
    """Mean over prompts of `distinct_ngrams` of the prompt's k sampled responses (token ids)."""
    values = [v for v in (distinct_ngrams([list(r) for r in samples], n) for samples in responses_PK) if v is not None]
    return float(np.mean(values)) if values else None


def sequence_logprobs(model, prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], vocab: int,
                      batch_size: int = 2) -> np.ndarray:
    """(N,) float64 log p(response | prompt): the sum of the model's log-probs of each response's tokens."""
    out = [float(lp_RV.gather(-1, torch.as_tensor(np.asarray(r, dtype=np.int64))[:, None]).sum())
           for r, lp_RV in zip(responses, response_logprobs(model, prompts, responses, vocab, batch_size))]
    return np.asarray(out, dtype=np.float64)


def cross_fidelity(model, teacher, own: Samples, teacher_responses: Sequence[np.ndarray], vocab: int,
                   teacher_vocab: int, batch_size: int = 2) -> dict:
    """Fidelity to a teacher of another tokenizer (teacher.tokenizer=cross), in the teacher's tokenisation.

    No per-token KL exists between two vocabularies, so the reverse KL is estimated at the level of whole
    responses, where both models give a probability to the same bytes: on the model's own samples y (each
    read by the model after `own.prompts` and, as `teacher_responses` ((M_i,) the teacher's ids of the same
    bytes), by the teacher after `own.teacher_prompts`), KL(p_M || p_T) ~ mean_y [log p_M(y) - log p_T(y)],
    reported per teacher token (sum over samples / teacher tokens), with its standard error. Each model's
    probability is that of its own tokenisation of y (the one it sampled, or its encoder's), not the sum over
    every tokenisation, as in every sequence-level estimate of this kind."""
    own = Samples(*own)
    lp_m = sequence_logprobs(model, own.prompts, own.responses, vocab, batch_size)
    lp_t = sequence_logprobs(teacher, own.teacher_side(), teacher_responses, teacher_vocab, batch_size)
    n_t = np.asarray([len(r) for r in teacher_responses], dtype=np.float64)
    tokens = float(n_t.sum())
    diff = lp_m - lp_t
    # per teacher token: a ratio estimate; its standard error by the delta method over the N samples
    rkl = float(diff.sum() / tokens) if tokens else None
    stderr = float(np.std(diff - rkl * n_t, ddof=1) * np.sqrt(len(diff)) / tokens) if tokens and len(diff) > 1 else None
    return {"reverse_kl": rkl, "reverse_kl_stderr": stderr,
            "teacher_nll": float(-lp_t.sum() / tokens) if tokens else None,
            "estimator": "sequence", "response_tokens": int(sum(len(r) for r in own.responses)),
            "teacher_tokens": int(tokens)}
