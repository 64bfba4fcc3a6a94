"""bf16 on the CPU path: the teacher runs in bf16 but hands on float32 statistics; the bf16 student trains on
float32 master weights (DeepSpeed ZeRO-1's bf16 optimizer) that a step moves by less than bf16 resolves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rollout.engine import SamplingParams
from actors.rollout.worker import RolloutWorker
from actors.runtime.dist import free_port
from actors.student.state import _base_optimizer, _full
from actors.student.trainer import StudentTrainer
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import TEACHER_SCHEMA, list_rows
from eopd_ray.config import load_config
from eopd_ray.data import synthetic_rows, tokenize_rows
from eopd_ray.models import load_causal_lm, load_tokenizer

K = 8


@pytest.fixture(scope="module")
def setup(tiny_models):
    teacher_dir, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    recs = tokenize_rows(synthetic_rows(8, 3, "train"), tok, 64, "synthetic")
    worker = RolloutWorker(student_dir, vocab_size=len(tok), num_threads=2)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=5)
    table, _ = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs], params)
    return dict(teacher=teacher_dir, student=student_dir, tok=tok, table=table)


def _not_bf16_values(x: np.ndarray) -> float:
    """The share of float32 values that bf16 cannot hold: about 1 for values computed in float32, exactly 0 for
    values computed in bf16 and widened afterwards."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return float((t.to(torch.bfloat16).float() != t).float().mean())


def _reference(model_dir, table, vocab):
    """Per row: (T, V) float64 log-probs of the float32 teacher, teacher-forced, row by row, and the (T,) tokens."""
    model = load_causal_lm(model_dir).to(torch.float64).eval()
    for p, r in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids"))):
        ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(r) - 1, :vocab]
        yield torch.log_softmax(logits, -1), torch.as_tensor(r, dtype=torch.long)


def test_bf16_teacher_gives_float32_statistics_near_the_float32_teacher(setup):
    tok, table = setup["tok"], setup["table"]
    scorer = TeacherScorer(setup["teacher"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id,
                           dtype="bfloat16", chunk_size=5, max_batch=3)
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}  # the teacher really runs in bf16
    scored, _ = scorer.score(table)
    assert scored.schema == TEACHER_SCHEMA
    cols = {c: np.concatenate(list_rows(scored.column(c)))
            for c in ("teacher_logprobs", "teacher_entropy", "topk_logprobs")}
    for name, values in cols.items():
        assert values.dtype == np.float32, name
        # computed in float32 from the bf16 logits, not in bf16: nearly every value lies between bf16's
        assert _not_bf16_values(values) > 0.9, name
    # bf16 weights and activations move the statistics, by a bounded amount: bf16 keeps 8 bits of mantissa
    err_lp, err_ent = [], []
    for (logp_TV, r_T), lp, ent in zip(_reference(setup["teacher"], table, len(tok)),
                                       list_rows(scored.column("teacher_logprobs")),
                                       list_rows(scored.column("teacher_entropy"))):
        err_lp.append(np.abs(lp - logp_TV.gather(-1, r_T[:, None])[:, 0].numpy()).max())
        err_ent.append(np.abs(ent - -(logp_TV.exp() * logp_TV).sum(-1).numpy()).max())
    assert 0 < max(err_lp) < 0.15 and 0 < max(err_ent) < 0.15, (max(err_lp), max(err_ent))


def _trainer(setup, dtype: str):
    cfg = load_config(None, ["trainer.batch_size=8", "trainer.mini_batch_size=8", "trainer.max_steps=2",
                             "trainer.lr=1e-4", "trainer.zero_stage=1", f"model.dtype={dtype}"])
    tok = setup["tok"]
    tr = StudentTrainer(setup["student"], cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                        pad_id=tok.pad_token_id, dtype=cfg.model.dtype)
    tr.setup("127.0.0.1", free_port())
    return tr


def _masters(tr) -> dict[str, torch.Tensor]:
    opt = _base_optimizer(tr.engine)
    return {n: _full(p, None, opt) for n, p in tr.engine.module.named_parameters()}


def test_bf16_student_keeps_float32_master_weights_that_a_step_moves(setup):
    from deepspeed.utils import safe_get_full_fp32_param

    tok, table = setup["tok"], setup["table"]
    scored, _ = TeacherScorer(setup["teacher"], top_k=16, vocab_size=len(tok), pad_id=tok.pad_token_id).score(table)
    tr = _trainer(setup, "bfloat16")
    params = dict(tr.engine.module.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}  # the working copy the forward uses
    raw = {n: safe_get_full_fp32_param(p) for n, p in params.items()}
    assert {v.dtype for v in raw.values()} == {torch.float32}
    before = _masters(tr)
    tr.train_step(0, 1, table, scored)
    after = _masters(tr)
    moved = {n: (after[n] - before[n]).abs() for n in before}
    assert all(m.max() > 0 for m in moved.values()), [n for n, m in moved.items() if m.max() == 0]
    # Adam's first step moves every weight by about lr = 1e-4: far below bf16's spacing (2^-8 relative) for
    # weights of size ~0.05, so the masters hold values bf16 cannot, and the bf16 copy is their rounding
    masters = torch.cat([v.flatten() for v in after.values()])
    assert float((masters.to(torch.bfloat16).float() != masters).float().mean()) > 0.5
    for n, p in tr.engine.module.named_parameters():
        torch.testing.assert_close(p.detach(), after[n].to(torch.bfloat16), rtol=0, atol=0, msg=n)
    # the same step in float32 points the same way, well above chance (a random direction: cosine ~0). Adam's
    # first update is about +-lr per weight, the sign of its gradient, so bf16's perturbed forward and backward
    # flip it wherever a gradient is small: on this tiny model about 3 signs in 10 (cosine 0.45 measured)
    ref = _trainer(setup, "float32")
    ref.train_step(0, 1, table, scored)
    ref_after = _masters(ref)
    d_bf16 = torch.cat([(after[n] - before[n]).flatten() for n in before]).double()
    d_fp32 = torch.cat([(ref_after[n] - before[n]).flatten() for n in before]).double()
    cos = float(d_bf16 @ d_fp32 / (d_bf16.norm() * d_fp32.norm()))
    assert cos > 0.25, cos
