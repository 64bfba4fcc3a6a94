"""The teacher of another tokenizer (`teacher.tokenizer=cross`): it reads each response re-tokenised from its
bytes after its own prompt, and its statistics come back at the student's positions and in the student's
vocabulary (`eopd_ray.cross_tokenizer`, `eopd_ray.cross_stats`, `docs/cross_tokenizer.md`).

Per scored batch: the student's response ids -> their bytes -> the teacher's ids (its end token where the
student's response ended) -> one teacher forward over the teacher's prompt + response. The log-prob of each of
the teacher's own tokens and its entropy come from one chunked pass over every teacher response position
(`token_stats_from_hidden`); its full distribution is taken again only at the heads' decision points (one per
aligned group), where its mass is moved onto student ids (`map_logprobs`). The table carries a mask: merged
and unaligned student positions have no statistics and stay out of the loss.
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
from eopd_ray.stats import token_stats_from_hidden

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
        # the log-prob of each of its own tokens and the entropy at every teacher position, chunked (top-1 unused)
        own = token_stats_from_hidden(hidden_MH, self.head, tokens_M, 1, chunk_size=self.chunk_size,
                                      vocab_size=self.vocab_size).to("cpu")
        starts = np.cumsum([0] + [len(t) for t in teacher_rows])[:-1]  # each row's first flattened position
        heads = np.concatenate([a.head_positions() + s for (_, a), s in zip(pairs, starts)]).astype(np.int64)
        mapped = self._head_topk(hidden_MH[torch.as_tensor(heads, device=self.device)])
        entropy_H = own.entropy[torch.as_tensor(heads)]
        out, h0 = [], 0
        for (ids, alignment), s, slp in zip(pairs, starts, behaviour):
            h1 = h0 + int(alignment.head.sum())
            head_topk = MappedTopK(mapped.logprobs[h0:h1], mapped.ids[h0:h1], mapped.unmatched_logprob[h0:h1])
            out.append(student_stats(alignment, own.logprobs[s:s + len(ids)], entropy_H[h0:h1], head_topk,
                                     np.asarray(slp, dtype=np.float64)))
            h0 = h1
        return out

    def _head_topk(self, hidden_HH: torch.Tensor) -> MappedTopK:
        """At the heads' decision points (H, hidden): the teacher's top-k over student ids (`map_logprobs`)."""
        parts = []
        for s in range(0, hidden_HH.shape[0], HEAD_CHUNK):
            logp = torch.log_softmax(self.head(hidden_HH[s:s + HEAD_CHUNK])[..., :self.vocab_size].float(), dim=-1)
            m = map_logprobs(logp, self.vmap, self.top_k)
            parts.append((m.logprobs.cpu(), m.ids.cpu(), m.unmatched_logprob.cpu()))
        if not parts:
            empty = torch.zeros(0, self.top_k)
            return MappedTopK(empty, empty.long(), torch.zeros(0))
        return MappedTopK(*(torch.cat(p) for p in zip(*parts)))

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
