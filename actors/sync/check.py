"""The post-sync check: after a weight sync, every engine's teacher-forced log-probs of a few sampled rows must
equal the student's, within a tolerance that follows the dtype the engines and the student run in.

Ray-free and engine-free, so the engines (transformers, vLLM) and the sync paths share one definition.
"""

from __future__ import annotations

import numpy as np
import torch

# bf16 weights give per-token log-prob differences of a few 1e-2 between two implementations (different
# kernels and reduction orders); a stale or wrong weight moves them by far more.
SYNC_MAX_ABS, SYNC_MEAN_ABS = 0.3, 0.05
# float32 on both sides: only kernels and summation order differ. Measured: transformers vs transformers
# ~1e-6 per token; vLLM's CPU backend vs transformers at most 6e-6 on random tiny Qwen3s whose log-probs
# span 10 nats (docs/testing.md, "What has run where"). A stale tied output head moved them by 0.032.
SYNC_MAX_ABS_FP32, SYNC_MEAN_ABS_FP32 = 1e-3, 1e-4


def sync_limits(dtype: str) -> tuple[float, float]:
    """(max, mean) absolute log-prob difference allowed after a sync when engines and student run `dtype`."""
    return (SYNC_MAX_ABS_FP32, SYNC_MEAN_ABS_FP32) if dtype == "float32" else (SYNC_MAX_ABS, SYNC_MEAN_ABS)


class SyncCheckError(AssertionError):
    """The engine's log-probs after a weight sync are not the student's: the engines hold other weights."""


@torch.no_grad()
def teacher_forced_logprobs(model: torch.nn.Module, prompt_ids, response_ids, vocab_size: int | None = None):
    """log p(response_t | prompt, response_<t) under `model`, float32 numpy of shape (len(response),)."""
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long, device=device)[None]
    p = len(prompt_ids)
    logits = model(input_ids=ids).logits[0, p - 1:p + len(response_ids) - 1].float()
    if vocab_size:
        logits = logits[:, :vocab_size]
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, ids[0, p:, None])[:, 0].cpu().numpy()


def check_synced_logprobs(engine_logprobs: list, student_logprobs: list, max_abs: float = SYNC_MAX_ABS,
                          mean_abs: float = SYNC_MEAN_ABS) -> dict:
    """Compare the engine's log-probs of given tokens with the student's after a sync; raise SyncCheckError
    naming the worst position if they differ by more than the limits. Returns {max_abs, mean_abs}."""
    diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b in zip(engine_logprobs, student_logprobs)]
    flat = np.concatenate(diffs)
    stats = {"max_abs": float(flat.max()), "mean_abs": float(flat.mean())}
    if stats["max_abs"] > max_abs or stats["mean_abs"] > mean_abs:
        row = int(np.argmax([d.max() for d in diffs]))
        raise SyncCheckError(f"engine and student log-probs differ after the weight sync: {stats} (allowed "
                             f"max {max_abs}, mean {mean_abs}); worst in row {row} at position {int(diffs[row].argmax())}")
    return stats
