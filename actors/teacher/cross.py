"""The teacher of another tokenizer (`teacher.tokenizer=cross`): it reads each response re-tokenised from its
bytes after its own prompt, and its statistics come back at the student's positions and in the student's
vocabulary (`eopd_ray.cross_tokenizer`, `eopd_ray.cross_stats`, `docs/cross_tokenizer.md`).

Per scored batch: the student's response ids -> their bytes -> the teacher's ids (its end token where the
student's response ended) -> one teacher forward over the teacher's prompt + response. The teacher's log-prob
of each of its own tokens comes from a chunked log-softmax at every teacher response position; its full
distribution is taken only at the heads' decision points (one per aligned group), where its entropy is read
and its mass is moved onto student ids (`map_logprobs`). The table carries a mask: merged and unaligned
student positions have no statistics and stay out of the loss.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from actors.runtime.faults import maybe_fail
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows, make_teacher_table, teacher_prompt_rows
from eopd_ray.cross_stats import MappedTopK, map_logprobs, student_stats
from eopd_ray.cross_tokenizer import Alignment, ResponseEncoder, TokenBytes, align, retokenize, vocab_map
from eopd_ray.models import load_tokenizer
from eopd_ray.stats import entropy_from_logprobs

HEAD_CHUNK = 128  # head positions per full-distribution chunk: (128, V_teacher) float32 is 134 MB at 262k


class CrossTeacherScorer(TeacherScorer):
    """`TeacherScorer` whose teacher has its own tokenizer. vocab_size: the teacher's real vocabulary;
    student_vocab_size and student_tokenizer_path: the student's (its top-k ids index the student's)."""

    def __init__(self, model_path: str, top_k: int, vocab_size: int, pad_id: int, student_tokenizer_path: str,
                 student_vocab_size: int, trust_remote_code: bool = False, **kwargs):
        super().__init__(model_path, top_k, vocab_size, pad_id, trust_remote_code=trust_remote_code, **kwargs)
        teacher_tok = load_tokenizer(model_path, trust_remote_code)
        student_tok = load_tokenizer(student_tokenizer_path, trust_remote_code)
        self.encoder = ResponseEncoder(teacher_tok)
        self.student_bytes = TokenBytes(student_tok)
        self.vmap = vocab_map(self.student_bytes, self.encoder.bytes)
        self.vmap.student_of = self.vmap.student_of[:vocab_size]  # the teacher's real vocabulary only
        self.teacher_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
        if not 1 <= top_k <= student_vocab_size:
            raise ValueError(f"loss.top_k={top_k} must lie in [1, the student's vocabulary {student_vocab_size}]")

    def teacher_response(self, response: np.ndarray) -> tuple[np.ndarray, Alignment]:
        """(T,) student ids -> ((M,) teacher ids of the same bytes, the alignment of the two)."""
        teacher_ids, s_bytes = retokenize(response, self.student_bytes, self.encoder)
        return teacher_ids, align(s_bytes, self.encoder.bytes(teacher_ids))

    @torch.no_grad()
    def score(self, rollout: pa.Table) -> tuple[pa.Table, dict]:
        """rollout: ROLLOUT_SCHEMA table -> (TEACHER_SCHEMA table with its mask, in the same row order, stats)."""
        maybe_fail("teacher")
        t0 = time.perf_counter()
        prompts = teacher_prompt_rows(rollout)
        responses = list_rows(rollout.column("response_ids"))
        behaviour = list_rows(rollout.column("logprobs"))
        rows = []
        for s in range(0, len(prompts), self.max_batch):
            rows += self._score_rows(prompts[s:s + self.max_batch], responses[s:s + self.max_batch],
                                     behaviour[s:s + self.max_batch])
        table = make_teacher_table(rollout.column("sample_id").to_numpy(), [r.logprobs for r in rows],
                                   [r.entropy for r in rows], [r.topk_ids for r in rows],
                                   [r.topk_logprobs for r in rows], mask=[r.mask for r in rows])
        return table, self._cross_stats(rows, time.perf_counter() - t0)

    def _score_rows(self, prompts, responses, behaviour) -> list:
        pairs = [self.teacher_response(r) for r in responses]
        teacher_rows = [ids for ids, _ in pairs]
        hidden_MH, tokens_M = self._response_hidden(prompts, teacher_rows, self.teacher_pad)  # every teacher position
        token_lp_M = self._token_logprobs(hidden_MH, tokens_M)
        dev = self.device
        starts = np.cumsum([0] + [len(t) for t in teacher_rows])[:-1]  # each row's first flattened position
        heads = np.concatenate([a.head_positions() + s for (_, a), s in zip(pairs, starts)]).astype(np.int64)
        entropy_H, mapped = self._head_distributions(hidden_MH[torch.as_tensor(heads, device=dev)])
        out, h0 = [], 0
        for (ids, alignment), s, slp in zip(pairs, starts, behaviour):
            h1 = h0 + int(alignment.head.sum())
            head_topk = MappedTopK(mapped.logprobs[h0:h1], mapped.ids[h0:h1], mapped.unmatched_logprob[h0:h1])
            out.append(student_stats(alignment, token_lp_M[s:s + len(ids)], entropy_H[h0:h1], head_topk,
                                     np.asarray(slp, dtype=np.float64)))
            h0 = h1
        return out

    def _token_logprobs(self, hidden_MH: torch.Tensor, tokens_M: torch.Tensor) -> np.ndarray:
        """(M,) float64 teacher log-probs of its own tokens, chunk by chunk over its real vocabulary."""
        out = []
        for s in range(0, hidden_MH.shape[0], self.chunk_size):
            logits = self.head(hidden_MH[s:s + self.chunk_size])[..., :self.vocab_size].float()
            tok = tokens_M[s:s + self.chunk_size].long().unsqueeze(-1)
            out.append((logits.gather(-1, tok).squeeze(-1) - torch.logsumexp(logits, dim=-1)).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def _head_distributions(self, hidden_HH: torch.Tensor) -> tuple[torch.Tensor, MappedTopK]:
        """At the heads' decision points (H, hidden): the teacher's entropy (H,) and its top-k over student ids."""
        ents, lps, ids, unmatched = [], [], [], []
        for s in range(0, hidden_HH.shape[0], HEAD_CHUNK):
            logp = torch.log_softmax(self.head(hidden_HH[s:s + HEAD_CHUNK])[..., :self.vocab_size].float(), dim=-1)
            ents.append(entropy_from_logprobs(logp).cpu())
            m = map_logprobs(logp, self.vmap, self.top_k)
            lps.append(m.logprobs.cpu()), ids.append(m.ids.cpu()), unmatched.append(m.unmatched_logprob.cpu())
        if not ents:
            empty = torch.zeros(0, self.top_k)
            return torch.zeros(0), MappedTopK(empty, empty.long(), torch.zeros(0))
        return torch.cat(ents), MappedTopK(torch.cat(lps), torch.cat(ids), torch.cat(unmatched))

    @staticmethod
    def _cross_stats(rows, seconds: float) -> dict:
        masks = [r.mask for r in rows]
        scored = np.concatenate(masks) if masks else np.zeros(0, bool)
        ent = np.concatenate([r.entropy[r.mask] for r in rows]) if rows else np.zeros(0)
        unmatched = np.concatenate([r.unmatched_logprob[r.mask] for r in rows]) if rows else np.zeros(0)
        return {"teacher/entropy_rollout": float(ent.mean()) if ent.size else 0.0,
                "teacher/high_entropy_fraction": float((ent >= 1.0).mean()) if ent.size else 0.0,
                "teacher/tokens": int(ent.size),
                # the share of student positions with a teacher counterpart, and the teacher's mean mass there
                # on tokens no student token spells (renormalised out of the forward KL)
                "cross/positions": int(scored.size),
                "cross/aligned_fraction": float(scored.mean()) if scored.size else 0.0,
                "cross/unmatched_mass": float(np.exp(unmatched).mean()) if unmatched.size else 0.0,
                "time/teacher": seconds}

