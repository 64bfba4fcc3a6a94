"""The frozen teacher: per-token statistics of every sampled response position, as compact Arrow.

For each response token it returns log pi_te(x_t | c_t), the full-vocabulary entropy H_t and the top-k ids
and log-probs. The hidden states of the response positions are projected through the model's own output head
(`eopd_ray.models.output_head`: any family's soft-capping or logit scaling included) chunk by chunk
(`token_stats_from_hidden`), so neither the [B, T, V] logits nor their float32 log-probabilities
ever exist at once. On a GPU (`device="auto"` picks CUDA when there is one) the model runs in the configured
dtype (bf16 at paper scale), the statistics are computed chunk by chunk on the GPU, and each scored batch
crosses to the host once as four compact tensors (8k + 8 bytes per position).

Data parallelism is the teacher actor group itself (one worker per GPU, rollout shards spread over them).
A teacher that does not fit one GPU runs as `actors/teacher/zero3.py` (`teacher.zero_stage=3`): DeepSpeed
ZeRO-3 inference with its parameters partitioned over the workers, optionally offloaded to host memory.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from actors.runtime.faults import maybe_fail
from eopd_ray.batch import list_rows, make_teacher_table, sequence_batch, teacher_prompt_rows
from eopd_ray.sharding import length_groups
from eopd_ray.teacher_context import swap_ids
from eopd_ray.stats import TokenStats, token_stats_from_hidden
from eopd_ray.models import check_output_head, load_causal_lm, output_head, set_threads


# teacher.forward_tokens=0: the padded tokens one more forward is worth. CPU: measured on the tiny default
# (2-core machine, 2026-12-04: 64 scored fastest of 0, 32, 64, 128, 256 and one batch); CUDA: an estimate
# (a forward's fixed cost of some hundreds of kernel launches), not measured.
FORWARD_TOKENS_AUTO = {"cpu": 64, "cuda": 1024}


def _empty_columns() -> dict[str, list]:
    """Per-row arrays of a teacher table being filled: logprobs, entropy (T,), topk_ids, topk_logprobs (T, k),
    and each array's row of the rollout table (`rows`: batches are formed by length, not in row order)."""
    return {"logprobs": [], "entropy": [], "topk_ids": [], "topk_logprobs": [], "rows": []}


class TeacherScorer:
    def __init__(self, model_path: str, top_k: int, vocab_size: int, pad_id: int, chunk_size: int = 1024,
                 dtype: str = "float32", trust_remote_code: bool = False, num_threads: int | None = None,
                 max_batch: int = 64, device: str = "auto", end_swap: tuple[int, int] | None = None,
                 forward_tokens: int = 0):
        self._configure(top_k, vocab_size, pad_id, chunk_size, max_batch, num_threads, end_swap, forward_tokens)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._attach(load_causal_lm(model_path, dtype, trust_remote_code).to(self.device))

    def _configure(self, top_k: int, vocab_size: int, pad_id: int, chunk_size: int, max_batch: int,
                   num_threads: int | None, end_swap: tuple[int, int] | None = None,
                   forward_tokens: int = 0) -> None:
        set_threads(num_threads)
        self.top_k, self.vocab_size, self.pad_id = top_k, vocab_size, pad_id
        # forward_tokens: what one more forward costs, in padded tokens (eopd_ray.sharding.length_groups);
        # 0 = FORWARD_TOKENS_AUTO for the device the model runs on
        self.chunk_size, self.max_batch, self.forward_tokens = chunk_size, max_batch, forward_tokens
        # teacher.eos_remap: the two end tokens exchanged in everything the teacher reads and returns
        self.end_swap = tuple(end_swap) if end_swap else None

    def _attach(self, model) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # The model's own head (soft-capping, logit scales and biases included), proven on a probe now
        # rather than discovered as wrong statistics later.
        self.head = output_head(self.model)
        check_output_head(self.model, self.head, self.device, self.vocab_size)

    def ping(self) -> bool:
        return True

    @torch.no_grad()
    def score(self, rollout: pa.Table) -> tuple[pa.Table, dict]:
        """rollout: ROLLOUT_SCHEMA table -> (TEACHER_SCHEMA table in the same row order, stats)."""
        maybe_fail("teacher")
        t0 = time.perf_counter()
        cols = _empty_columns()
        for rows, prompts, responses in self._row_chunks(rollout):
            self._score_chunk(prompts, responses, cols, rows)
        return self._result(rollout, cols, time.perf_counter() - t0)

    def _row_chunks(self, rollout: pa.Table) -> list[tuple[list[int], list, list]]:
        """(row indices, prompts, responses) of at most `max_batch` rows each, rows of similar length together
        (`length_groups`: padding costs a full forward per padded token), as the teacher reads them: its own
        rendering of the prompt where the rollout carries one, and the responses with the two end tokens
        exchanged (teacher.eos_remap; prompts are left alone, their template's turn markers are meant as written)."""
        prompts = teacher_prompt_rows(rollout)
        responses = [swap_ids(r, self.end_swap) for r in list_rows(rollout.column("response_ids"))]
        cost = self.forward_tokens or FORWARD_TOKENS_AUTO.get(self.device.type, FORWARD_TOKENS_AUTO["cpu"])
        groups = length_groups([len(p) + len(r) for p, r in zip(prompts, responses)], self.max_batch, cost)
        return [(g, [prompts[i] for i in g], [responses[i] for i in g]) for g in groups]

    @staticmethod
    def _result(rollout: pa.Table, cols: dict[str, list], seconds: float) -> tuple[pa.Table, dict]:
        order = np.argsort(np.asarray(cols["rows"], dtype=np.int64), kind="stable")  # back into row order
        cols = {name: [values[i] for i in order] for name, values in cols.items()}
        table = make_teacher_table(rollout.column("sample_id").to_numpy(), cols["logprobs"], cols["entropy"],
                                   cols["topk_ids"], cols["topk_logprobs"])
        ent = np.concatenate(cols["entropy"]) if cols["entropy"] else np.zeros(0)
        stats = {"teacher/entropy_rollout": float(ent.mean()) if ent.size else 0.0,
                 "teacher/high_entropy_fraction": float((ent >= 1.0).mean()) if ent.size else 0.0,
                 "teacher/tokens": int(ent.size),  # what the two means are over: the driver weighs them by it
                 "time/teacher": seconds}
        return table, stats

    def _response_hidden(self, prompts, responses, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder forward over prompt + response rows -> ((N, H) final hidden states of the N real response
        positions, row-major, each the one that predicts its token; (N,) those tokens)."""
        batch = sequence_batch(prompts, responses, pad_id)
        dev = self.device
        hidden_BLH = self.model.get_decoder()(input_ids=batch.input_ids_BL.to(dev),
                                              attention_mask=batch.attention_mask_BL.to(dev)).last_hidden_state
        mask_BT = batch.response_mask_BT.to(dev)
        # Only real response positions are projected: padding would cost V-wide work for nothing.
        index_N = (batch.logit_index_BT.to(dev)
                   + torch.arange(len(prompts), device=dev)[:, None] * hidden_BLH.shape[1])[mask_BT]
        # (B, L, H) of the prompts too is dropped on return, before the V-wide chunks
        return hidden_BLH.reshape(-1, hidden_BLH.shape[-1])[index_N], batch.response_BT.to(dev)[mask_BT]

    def _score_chunk(self, prompts, responses, cols, rows: list[int]) -> None:
        """Scores one batch of rows (`rows`: their indices in the rollout table) into `cols`."""
        cols["rows"].extend(rows)
        hidden_NH, tokens_N = self._response_hidden(prompts, responses, self.pad_id)
        stats = self._position_stats(hidden_NH, tokens_N)
        stats = stats.to("cpu")  # one device-to-host copy of the compact (N,), (N,), (N, k), (N, k) tensors
        start = 0
        for r in responses:  # rows are contiguous in the flattened (row-major) masked order
            end = start + len(r)
            cols["logprobs"].append(stats.logprobs[start:end].float().numpy())
            cols["entropy"].append(stats.entropy[start:end].float().numpy())
            # back into the student's ids: the top-k target at its end position names the student's end token
            cols["topk_ids"].append(swap_ids(stats.topk_ids[start:end].numpy().astype(np.int32), self.end_swap))
            cols["topk_logprobs"].append(stats.topk_logprobs[start:end].float().numpy())
            start = end

    def _position_stats(self, hidden_NH: torch.Tensor, tokens_N: torch.Tensor) -> TokenStats:
        """(N, H) final hidden states of response positions and their (N,) tokens -> TokenStats of (N,)/(N, k)."""
        return token_stats_from_hidden(hidden_NH, self.head, tokens_N, self.top_k, chunk_size=self.chunk_size,
                                       vocab_size=self.vocab_size)
