"""The student's chunked logits path (trainer.logits_chunk): one DeepSpeed step gives the metrics and the
weights of the full-logits step, at every ZeRO stage, for an objective with and one without a gradient
through the student's entropy, and for a soft-capped output head (Gemma 2)."""

from __future__ import annotations

import pytest

from test_workers import _new_trainer, _weights, setup, trainer  # noqa: F401  (fixtures)

# lr 1e-4 (as the micro-batch test): Adam divides by |g|, so a float32 rounding difference in a near-zero
# gradient moves a weight by up to ~lr x (relative rounding).
LR = 1e-4


def _step(setup, stage: int, chunk: int, *overrides):
    """One step; returns (trainer, metrics, the largest number of positions the output head saw at once)."""
    tr = _new_trainer(setup, f"trainer.logits_chunk={chunk}", *overrides, stage=stage, lr=LR)
    head, rows = tr._head, [0]
    tr._head = lambda h: rows.append(h.shape[0]) or head(h)
    return tr, tr.train_step(0, 1, setup["table"], setup["scored"]), max(rows)


@pytest.fixture(scope="module")
def scored_setup(setup, trainer):  # noqa: F811
    return dict(setup, scored=trainer[2])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("objective", ["eopd", "entropy_bonus"])
def test_chunked_logits_step_equals_the_full_logits_step(scored_setup, stage, objective):
    full, m_full, full_rows = _step(scored_setup, stage, 0, f"loss.objective={objective}")
    cut, m_cut, cut_rows = _step(scored_setup, stage, 5, f"loss.objective={objective}")
    assert full_rows == 0 and cut_rows == 5  # the full path never calls the head alone; the chunked one by 5
    for key in ("loss/total", "loss/pg", "loss/fkl", "loss/entropy", "gate/fraction", "student/entropy",
                "pg/ratio_mean", "optim/grad_norm"):
        assert m_cut[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-7), key
    a, b = _weights(full), _weights(cut)
    moved = max((a[n] - b[n]).abs().max().item() for n in a)
    assert moved < 1e-6, f"chunked step differs from the full-logits step by {moved:.3g}"
    start = _weights(_new_trainer(scored_setup, stage=stage, lr=LR))
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 1e-5  # both really stepped
