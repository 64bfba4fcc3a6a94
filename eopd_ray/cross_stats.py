"""Teacher statistics carried across two tokenizers (the third part of `eopd_ray.cross_tokenizer`): at each
student head, the group's teacher log-prob less the merged tokens' behaviour log-probs, the teacher's entropy
at the head's decision point, and its distribution mapped onto student ids by equal bytes (`map_logprobs`,
`map_topk`), with teacher mass no student token spells left out of the k slots (`docs/cross_tokenizer.md`).

With one tokenizer on both sides every output equals the same-tokenizer path (`eopd_ray.stats.token_stats`).
Arrays are per response; the shapes and dtypes are those of a teacher-table row (`eopd_ray/batch.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eopd_ray.cross_tokenizer import NEG_INF, Alignment, VocabMap
from eopd_ray.stats import TokenStats, entropy_from_logprobs


@dataclass
class MappedTopK:
    """Per row (N,): the top-k of a teacher distribution over student ids, sorted descending; logprobs (N, k)
    (-inf in slots no student id fills), ids (N, k) int64, unmatched_logprob (N,) the teacher's log-mass on
    tokens with no student id (-inf when none)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    unmatched_logprob: torch.Tensor


def _check_width(width: int, vmap: VocabMap, what: str) -> None:
    if width != len(vmap.student_of):
        raise ValueError(f"{what} has {width} teacher ids per row but the vocabulary map covers "
                         f"{len(vmap.student_of)}; restrict the teacher's log-probs to its real vocabulary")


def map_logprobs(logprobs_NV: torch.Tensor, vmap: VocabMap, top_k: int) -> MappedTopK:
    """From full teacher log-probs (N, V_teacher): the distribution over student ids (teacher mass summed per
    student id) and its top-k. A one-to-one map returns the teacher's own values, exactly."""
    _check_width(logprobs_NV.shape[-1], vmap, "logprobs_NV")
    if not 1 <= top_k <= vmap.student_size:
        raise ValueError(f"top_k={top_k} must lie in [1, student vocabulary {vmap.student_size}]")
    dev, dt, n = logprobs_NV.device, logprobs_NV.dtype, logprobs_NV.shape[0]
    target = torch.as_tensor(vmap.student_of, device=dev)
    matched = target >= 0
    x_NM = logprobs_NV[:, matched]
    index_NM = target[matched].expand(n, -1)
    peak = torch.full((n, vmap.student_size), NEG_INF, dtype=dt, device=dev).scatter_reduce(1, index_NM, x_NM, "amax")
    shifted = torch.where(x_NM == NEG_INF, NEG_INF, x_NM - peak.gather(1, index_NM))
    total = torch.zeros_like(peak).scatter_add_(1, index_NM, shifted.exp())
    mapped = torch.where(peak == NEG_INF, NEG_INF, peak + total.log())
    values, ids = mapped.topk(top_k, dim=-1, largest=True, sorted=True)
    unmatched = torch.logsumexp(logprobs_NV[:, ~matched], dim=-1) if bool((~matched).any()) else \
        torch.full((n,), NEG_INF, dtype=dt, device=dev)
    return MappedTopK(values, ids, unmatched)


def map_topk(topk_logprobs_NK: torch.Tensor, topk_ids_NK: torch.Tensor, vmap: VocabMap) -> MappedTopK:
    """From the teacher's top-k only (N, k): each entry moved to its student id, entries landing on one id
    summed, unmatched ones out of the slots (into unmatched_logprob), re-sorted descending (stably)."""
    target = torch.as_tensor(vmap.student_of, device=topk_ids_NK.device)
    if topk_ids_NK.numel() and int(topk_ids_NK.max()) >= len(target):
        raise ValueError(f"teacher top-k ids reach {int(topk_ids_NK.max())}, outside the vocabulary map "
                         f"({len(target)} teacher ids)")
    sid = target[topk_ids_NK.long()]
    ok = sid >= 0
    same = (sid.unsqueeze(-1) == sid.unsqueeze(-2)) & ok.unsqueeze(-1) & ok.unsqueeze(-2)  # (N, k, k)
    lp = topk_logprobs_NK
    merged = torch.logsumexp(torch.where(same, lp.unsqueeze(-2), NEG_INF), dim=-1)
    k = lp.shape[-1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=lp.device).tril(-1)
    keep = ok & ~(same & earlier).any(-1)  # the first slot of each student id carries the sum
    values = torch.where(keep, merged, NEG_INF)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    ids = torch.where(keep, sid, 0).gather(-1, order)
    unmatched = torch.logsumexp(torch.where(ok, NEG_INF, lp), dim=-1)
    return MappedTopK(values.gather(-1, order), ids, unmatched)


@dataclass
class CrossStats:
    """Teacher statistics at the student's positions, in the arrays of a teacher-table row (`make_teacher_table`):
    logprobs, entropy (T,) float32; topk_ids (T, k) int32; topk_logprobs (T, k) float32. mask (T,) bool: the
    positions that carry statistics (elsewhere every value is 0, as padding is; the loss must not read them);
    unmatched_logprob (T,) float32: the teacher's log-mass at the head's decision point on tokens no student
    token spells (-inf: none; 0 where masked)."""

    logprobs: np.ndarray
    entropy: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    mask: np.ndarray
    unmatched_logprob: np.ndarray

    def token_stats(self) -> TokenStats:
        """The same values as the (T,) / (T, k) torch tensors the loss reads (ids int64)."""
        return TokenStats(torch.from_numpy(self.logprobs), torch.from_numpy(self.entropy),
                          torch.from_numpy(self.topk_logprobs), torch.from_numpy(self.topk_ids).long())


def student_stats(alignment: Alignment, teacher_token_logprobs: np.ndarray | torch.Tensor,
                  head_entropy: np.ndarray | torch.Tensor, head_topk: MappedTopK,
                  student_logprobs: np.ndarray | None = None) -> CrossStats:
    """Per student position, from the teacher's log-prob of each of its own tokens (num_teacher,) and, at the
    heads' decision points (`Alignment.head_positions`, H rows), its entropy (H,) and mapped top-k (H, k).

    A head's log-prob is the sum of its group's teacher log-probs, less `student_logprobs` (T,) (the rollout's
    behaviour log-probs) over the group's other student tokens; without them a head of a group of several
    student tokens is masked. A head with no student id in its top-k is masked too (no forward-KL target)."""
    head = alignment.head
    t, h = len(head), int(head.sum())
    token_lp = np.asarray(_numpy(teacher_token_logprobs), dtype=np.float64)
    if len(token_lp) != alignment.num_teacher:
        raise ValueError(f"{len(token_lp)} teacher log-probs for {alignment.num_teacher} teacher positions")
    top_lp, top_ids = _numpy(head_topk.logprobs), _numpy(head_topk.ids)
    if top_lp.shape[0] != h or len(_numpy(head_entropy)) != h:
        raise ValueError(f"{h} heads but {top_lp.shape[0]} top-k rows and {len(_numpy(head_entropy))} entropies")
    k = top_lp.shape[-1]
    starts, stops = alignment.teacher_start[head], alignment.teacher_stop[head]
    sums = np.array([token_lp[a:b].sum() for a, b in zip(starts, stops)], dtype=np.float64)
    groups, inner = alignment.group[head], alignment.merged
    n_groups = int(alignment.group.max()) + 1 if t else 0
    several = np.bincount(alignment.group[inner], minlength=n_groups)[groups] > 0  # heads with merged tokens
    valid = np.isfinite(top_lp).any(-1)
    if student_logprobs is None:
        valid &= ~several
    else:
        slp = np.asarray(student_logprobs, dtype=np.float64)
        if slp.shape != (t,):
            raise ValueError(f"student_logprobs has shape {slp.shape}; expected ({t},)")
        others = np.bincount(alignment.group[inner], weights=slp[inner], minlength=n_groups)
        sums[several] -= others[groups[several]]
    rows = np.flatnonzero(head)[valid]
    out = CrossStats(np.zeros(t, np.float32), np.zeros(t, np.float32), np.zeros((t, k), np.int32),
                     np.zeros((t, k), np.float32), np.zeros(t, bool), np.zeros(t, np.float32))
    out.logprobs[rows] = sums[valid]
    out.entropy[rows] = _numpy(head_entropy)[valid]
    out.topk_ids[rows] = top_ids[valid]
    out.topk_logprobs[rows] = top_lp[valid]
    out.mask[rows] = True
    out.unmatched_logprob[rows] = _numpy(head_topk.unmatched_logprob)[valid]
    return out


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def cross_teacher_stats(alignment: Alignment, teacher_logprobs_MV: torch.Tensor, teacher_ids, vmap: VocabMap,
                        top_k: int, student_logprobs: np.ndarray | None = None) -> CrossStats:
    """`student_stats` from the teacher's full log-probs at every one of its response positions (M, V_teacher)
    and its response ids (M,): the reference composition of the pieces a chunked scorer runs."""
    ids = torch.as_tensor(np.asarray(teacher_ids), dtype=torch.long, device=teacher_logprobs_MV.device)
    if teacher_logprobs_MV.shape[0] != len(ids):
        raise ValueError(f"{teacher_logprobs_MV.shape[0]} rows of teacher log-probs for {len(ids)} teacher ids")
    token_lp = teacher_logprobs_MV.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rows = teacher_logprobs_MV[torch.as_tensor(alignment.head_positions(), device=teacher_logprobs_MV.device)]
    return student_stats(alignment, token_lp, entropy_from_logprobs(rows), map_logprobs(rows, vmap, top_k),
                         student_logprobs)
