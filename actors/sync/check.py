"""The post-sync check: after a weight sync, every engine's teacher-forced log-probs of a few sampled rows must
equal the student's, within a tolerance that follows the dtype the engines and the student run in; and, given
both sides' log-probs of the same rows before the step (the reference), the engine must have moved with the
student since then.

Why the second part: in bf16 the limits are 0.3 / 0.05 nats, and one step at a realistic learning rate moves
the student's log-probs by far less (tiny Qwen3, lr 3e-6, one step: max 4e-3, mean 6e-4 nats), so an engine
still holding the previous weights passes them. A weight fingerprint is no way out: vLLM's CPU backend keeps
linear weights only inside oneDNN handles, and what the kernels use is what must be checked. Movements are
differences within one implementation, so the kernel noise between engine and student largely cancels.
With `moved` the rms per token of the student's movement since the reference and `noise` the rms of the
engine-student gap at the reference:
- an engine whose log-probs did not change at all (bit for bit) while the student's changed at
  >= MIN_MOVED_POSITIONS positions received nothing: caught at any learning rate;
- an engine's residual (its movement minus the student's) may be NOISE_ALLOWANCE x noise plus
  MAX_UNFOLLOWED x moved; an engine with the previous weights has residual = moved, one that left tensors
  out the share of the movement those carry;
- moved >= CONCLUSIVE x noise is needed before the previous weights must exceed that allowance. Below, the
  check is inconclusive: it says so, and the caller checks again after the next sync against the same
  reference, as the movement adds up.

Ray-free and engine-free, so the engines (transformers, vLLM) and the sync paths share one definition.
"""

from __future__ import annotations

import numpy as np
import torch

# bf16 weights give per-token log-prob differences of a few 1e-2 between two implementations (different
# kernels and reduction orders); a wrong weight moves them by far more (a stale one may not: see above).
SYNC_MAX_ABS, SYNC_MEAN_ABS = 0.3, 0.05
# float32 on both sides: only kernels and summation order differ. Measured: transformers vs transformers
# ~1e-6 per token; vLLM's CPU backend vs transformers at most 6e-6 on random tiny Qwen3s whose log-probs
# span 10 nats (docs/testing.md, "What has run where"). A stale tied output head moved them by 0.032.
SYNC_MAX_ABS_FP32, SYNC_MEAN_ABS_FP32 = 1e-3, 1e-4
# Movement since the reference. A sound sync's residual is the change of the engine-student gap: measured at
# most 1.6x the gap (vLLM CPU bf16 vs transformers bf16, tiny Qwen3, gap 2.8e-3 rms, 6 steps at lr 3e-7 to
# 3e-5), not growing with the movement (<= 0.02 of it); 0 when both sides compute bit for bit alike. The
# floor stands for float32 rounding there. At CONCLUSIVE x noise, the previous weights (residual = moved)
# exceed the allowance of 3 + 0.1 x 5 = 3.5 x noise. MIN_MOVED_POSITIONS: after the smallest steps the two
# sides' bf16 log-probs change at a few different positions (seen: the student's at 2, a sound engine's at 1
# other), so "received nothing" is only said once the student's changed at many (lr 3e-6, one step: 38 of 59).
CONCLUSIVE, NOISE_ALLOWANCE, MAX_UNFOLLOWED, NOISE_FLOOR, MIN_MOVED_POSITIONS = 5.0, 3.0, 0.1, 1e-6, 16


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


def _flat(rows: list) -> np.ndarray:
    """Rows of per-token log-probs (T_i,) -> one float64 array (sum T_i,)."""
    return np.concatenate([np.asarray(r, np.float64) for r in rows])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def check_synced_logprobs(engine_logprobs: list, student_logprobs: list, max_abs: float = SYNC_MAX_ABS,
                          mean_abs: float = SYNC_MEAN_ABS, engine_before: list | None = None,
                          student_before: list | None = None) -> dict:
    """Compare the engine's log-probs of given tokens with the student's after a sync; raise SyncCheckError
    naming the worst position if they differ by more than the limits. Every argument is a list of rows, one
    array (T_i,) per row, the same rows for all. Returns {max_abs, mean_abs}.

    With `engine_before` and `student_before` (both sides' log-probs of the same rows at the reference, before
    the student trained), also how far each moved since: raises if the engine did not move with the student
    (module doc), and returns `moved` (rms nats per token of the student's movement), `noise` (rms gap at the
    reference), `unfollowed` (rms of the engine's residual / moved) and `conclusive` (whether the movement
    was large enough to tell new weights from the previous ones)."""
    diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b in zip(engine_logprobs, student_logprobs)]
    flat = np.concatenate(diffs)
    stats = {"max_abs": float(flat.max()), "mean_abs": float(flat.mean())}
    if stats["max_abs"] > max_abs or stats["mean_abs"] > mean_abs:
        row = int(np.argmax([d.max() for d in diffs]))
        raise SyncCheckError(f"engine and student log-probs differ after the weight sync: {stats} (allowed "
                             f"max {max_abs}, mean {mean_abs}); worst in row {row} at position {int(diffs[row].argmax())}")
    if engine_before is None or student_before is None:
        return stats
    e0, s0 = _flat(engine_before), _flat(student_before)
    d_engine, d_student = _flat(engine_logprobs) - e0, _flat(student_logprobs) - s0
    moved, noise, residual = _rms(d_student), _rms(e0 - s0), _rms(d_engine - d_student)
    noise_floor = max(noise, NOISE_FLOOR)
    stats.update(moved=moved, noise=noise, unfollowed=residual / moved if moved else 0.0,
                 conclusive=bool(moved >= CONCLUSIVE * noise_floor))
    changed = int(np.count_nonzero(d_student))
    if not d_engine.any() and changed >= MIN_MOVED_POSITIONS:
        raise SyncCheckError(f"the engine's log-probs did not change at all since the reference, while the student's "
                             f"changed at {changed} of {d_student.size} positions (rms {moved:.3g} nats): the weight "
                             f"sync left the engine with its previous weights")
    allowed = NOISE_ALLOWANCE * noise_floor + MAX_UNFOLLOWED * moved
    if residual > allowed:
        raise SyncCheckError(f"the engine did not move with the student since the reference: the student moved by "
                             f"{moved:.3g} nats rms, the engine differs from that by {residual:.3g} (allowed {allowed:.3g}: "
                             f"{NOISE_ALLOWANCE:g} x the gap at the reference, {noise:.3g}, + {MAX_UNFOLLOWED:g} x the "
                             f"movement): the sync left tensors out or sent the previous weights")
    return stats
