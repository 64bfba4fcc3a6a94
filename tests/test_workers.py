"""The plain worker classes under the Ray actors, run directly in this process (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rollout.worker import RolloutWorker
from actors.rollout.engine import SamplingParams
from actors.runtime.dist import free_port
from actors.student.trainer import StudentTrainer
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import ROLLOUT_SCHEMA, TEACHER_SCHEMA, list_rows, payload_bytes_per_position, sequence_batch
from eopd_ray.config import load_config
from eopd_ray.data import synthetic_rows, tokenize_rows
from eopd_ray.losses import TokenStats, eopd_loss
from eopd_ray.models import load_causal_lm, load_tokenizer

K = 16


@pytest.fixture(scope="module")
def setup(tiny_models):
    teacher_dir, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    recs = tokenize_rows(synthetic_rows(16, 3, "train"), tok, 64, "synthetic")
    worker = RolloutWorker(student_dir, vocab_size=len(tok), num_threads=2)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=11)
    table, stats = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs], params)
    return dict(teacher=teacher_dir, student=student_dir, tok=tok, recs=recs, worker=worker, params=params,
                table=table, stats=stats)


def _reference_logprobs(model_dir, table, vocab, dtype=torch.float64):
    """Teacher-forced full-vocabulary float64 log-probs of the sampled tokens, row by row (no padding)."""
    model = load_causal_lm(model_dir).to(dtype).eval()
    out = []
    for p, r in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids"))):
        ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(r) - 1, :vocab].to(torch.float64)
        logp = torch.log_softmax(logits, -1)
        out.append((logp, torch.as_tensor(r, dtype=torch.long)))
    return out


def test_rollout_payload_and_behaviour_logprobs(setup):
    table, tok = setup["table"], setup["tok"]
    assert table.schema == ROLLOUT_SCHEMA and table.num_rows == len(setup["recs"])
    responses = list_rows(table.column("response_ids"))
    for r in responses:
        assert 1 <= len(r) <= 24
        eos = np.flatnonzero(r == tok.eos_token_id)
        assert len(eos) == 0 or eos[0] == len(r) - 1  # nothing kept after EOS
    ref = _reference_logprobs(setup["student"], table, len(tok))
    for (logp, r), lp, ent in zip(ref, list_rows(table.column("logprobs")), list_rows(table.column("entropy"))):
        np.testing.assert_allclose(lp, logp.gather(-1, r[:, None])[:, 0].numpy(), atol=2e-4)
        np.testing.assert_allclose(ent, -(logp.exp() * logp).sum(-1).numpy(), atol=2e-4)


def test_rollout_is_seeded(setup):
    w, recs, params = setup["worker"], setup["recs"], setup["params"]
    again, _ = w.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs], params)
    assert again.column("response_ids").to_pylist() == setup["table"].column("response_ids").to_pylist()
    params2 = SamplingParams(1.0, 1.0, 24, seed=12)
    other, _ = w.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs], params2)
    assert other.column("response_ids").to_pylist() != setup["table"].column("response_ids").to_pylist()


@pytest.mark.parametrize("forward_tokens", [1, 0, 10**9])  # batches by length: many small, auto, fewest
def test_teacher_scores_match_full_vocabulary_reference(setup, forward_tokens):
    tok = setup["tok"]
    scorer = TeacherScorer(setup["teacher"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id, chunk_size=7,
                           max_batch=5, forward_tokens=forward_tokens)
    batches = scorer._row_chunks(setup["table"])
    assert sorted(i for rows, _, _ in batches for i in rows) == list(range(setup["table"].num_rows))
    assert len(batches) > 1 and all(len(rows) <= 5 for rows, _, _ in batches)
    scored, stats = scorer.score(setup["table"])
    assert scored.schema == TEACHER_SCHEMA
    assert scored.column("sample_id").to_pylist() == setup["table"].column("sample_id").to_pylist()
    assert payload_bytes_per_position(scored) == 8 * K + 8
    ref = _reference_logprobs(setup["teacher"], setup["table"], len(tok))
    rows = zip(ref, *(list_rows(scored.column(c)) for c in ("teacher_logprobs", "teacher_entropy", "topk_ids",
                                                                "topk_logprobs")))
    for (logp, r), lp, ent, ids, tlp in rows:
        np.testing.assert_allclose(lp, logp.gather(-1, r[:, None])[:, 0].numpy(), atol=2e-5)
        np.testing.assert_allclose(ent, -(logp.exp() * logp).sum(-1).numpy(), atol=2e-5)
        ids, tlp = ids.reshape(-1, K), tlp.reshape(-1, K)
        assert ids.max() < len(tok)
        np.testing.assert_allclose(tlp, logp.gather(-1, torch.as_tensor(ids, dtype=torch.long)).numpy(), atol=2e-5)
        ref_top = torch.sort(logp, dim=-1, descending=True).values[:, :K].numpy()
        np.testing.assert_allclose(tlp, ref_top, atol=2e-5)  # the k largest, in descending order


def test_reduced_worker_stats_are_those_of_the_whole_batch(setup):
    """Two rollout workers' shares of unequal size and the teacher's stats of each: reduced by their declared
    kinds (eopd_ray.worker_stats), they are the statistics of the pooled tables, recomputed here from the rows."""
    from eopd_ray.worker_stats import reduce_worker_stats

    w, recs, tok = setup["worker"], setup["recs"], setup["tok"]
    scorer = TeacherScorer(setup["teacher"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id)
    tables, r_stats, t_stats = [], [], []
    for part in (recs[:3], recs[3:]):
        table, stats = w.rollout([r.id for r in part], [r.prompt_ids for r in part], [r.answer for r in part],
                                 setup["params"])
        tables.append(table)
        r_stats.append({**stats, "rollout/responses": len(part)})  # as the driver adds it (actors/driver/phases.py)
        t_stats.append(scorer.score(table)[1])
    rollout = reduce_worker_stats(r_stats)
    teacher = reduce_worker_stats(t_stats)
    lengths = [len(r) for t in tables for r in list_rows(t.column("response_ids"))]
    ent = np.concatenate([e for t in tables for e in list_rows(t.column("entropy"))]).astype(np.float64)
    assert rollout["rollout/tokens"] == sum(lengths) and rollout["rollout/responses"] == len(recs)
    assert rollout["rollout/response_length"] == pytest.approx(np.mean(lengths), rel=1e-12)
    correct = [c for t in tables for c in t.column("correct").to_pylist()]
    assert rollout["rollout/accuracy"] == pytest.approx(np.mean(correct), rel=0, abs=1e-12)
    assert rollout["rollout/entropy"] == pytest.approx(ent.mean(), rel=1e-6)
    assert rollout["rollout/high_entropy_fraction"] == pytest.approx((ent >= 1.0).mean(), rel=0, abs=1e-12)
    assert rollout["time/generate"] == max(s["time/generate"] for s in r_stats)
    t_ent = np.concatenate([scorer.score(t)[0].column("teacher_entropy").combine_chunks().values.to_numpy()
                            for t in tables]).astype(np.float64)
    assert teacher["teacher/tokens"] == sum(lengths) == t_ent.size
    assert teacher["teacher/entropy_rollout"] == pytest.approx(t_ent.mean(), rel=1e-6)
    assert teacher["teacher/high_entropy_fraction"] == pytest.approx((t_ent >= 1.0).mean(), rel=0, abs=1e-12)
    # the plain average of the two shares' means, as the driver took it before, differs
    assert sum(s["rollout/response_length"] for s in r_stats) / 2 != pytest.approx(np.mean(lengths), rel=1e-6)


@pytest.fixture(scope="module")
def trainer(setup):
    cfg = load_config(None, ["trainer.batch_size=16", "trainer.mini_batch_size=16", "trainer.max_steps=3",
                             "trainer.lr=1e-3"])
    tok = setup["tok"]
    tr = StudentTrainer(setup["student"], cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                        pad_id=tok.pad_token_id)
    tr.setup("127.0.0.1", free_port())
    scorer = TeacherScorer(setup["teacher"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id)
    scored, _ = scorer.score(setup["table"])
    return tr, cfg, scored


def test_train_step_loss_equals_eopd_loss_and_updates(setup, trainer):
    tr, cfg, scored = trainer
    table, tok = setup["table"], setup["tok"]
    model = load_causal_lm(setup["student"]).eval()
    before = {k: v.clone() for k, v in tr.engine.module.state_dict().items()}
    batch = sequence_batch(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids")),
                           tok.pad_token_id)
    t_max = batch.response_BT.shape[1]

    def pad(col, fill=0.0):
        rows = list_rows(scored.column(col) if col in scored.column_names else table.column(col))
        width = t_max * (K if col.startswith("topk") else 1)
        out = np.full((len(rows), width), fill, dtype=rows[0].dtype)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        t = torch.from_numpy(out)
        return t.view(len(rows), t_max, K) if col.startswith("topk") else t

    teacher = TokenStats(pad("teacher_logprobs"), pad("teacher_entropy"), pad("topk_logprobs"),
                         pad("topk_ids", 0).long())
    logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    logits = logits.gather(1, batch.logit_index_BT[..., None].expand(-1, -1, logits.shape[-1]))[..., :len(tok)]
    loss, ref = eopd_loss(logits, batch.response_BT, pad("logprobs"), teacher, batch.response_mask_BT, cfg.loss)
    metrics = tr.train_step(0, 1, table, scored)
    assert metrics["loss/total"] == pytest.approx(float(loss), rel=1e-4, abs=1e-6)
    for key in ("gate/fraction", "teacher/entropy", "student/entropy", "kl/reverse", "fkl/gated_mean"):
        assert metrics[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert metrics["train/tokens"] == batch.num_tokens
    after = tr.engine.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_weight_sync_reaches_the_rollout_engine(setup, trainer):
    tr, _, _ = trainer
    worker, tok = setup["worker"], setup["tok"]
    weights = tr.export_weights()
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    worker.update_weights(weights)
    table, _ = worker.rollout([r.id for r in setup["recs"]], [r.prompt_ids for r in setup["recs"]],
                              [r.answer for r in setup["recs"]], setup["params"])
    # The synced engine's behaviour log-probs equal the trainer model's own, teacher-forced.
    model = tr.engine.module.eval()
    for p, r, lp in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids")),
                        list_rows(table.column("logprobs"))):
        ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1, :len(tok)].double(), -1)
        np.testing.assert_allclose(lp, logp.gather(-1, torch.as_tensor(r, dtype=torch.long)[:, None])[:, 0], atol=2e-4)
    worker.load_model(setup["student"])  # leave the shared worker as other tests expect it


def test_object_store_arrays_become_the_engines_weights_without_a_copy(setup, trainer):
    """Read-only arrays (what ray.get gives: views of the node's shared memory) are adopted as the engine's
    parameters; writable ones (a live tensor's, in-process) are copied, so the engine never aliases the student;
    the broadcast path, which writes into the parameters, first takes them back as private copies."""
    from actors.rollout.hf_engine import TransformersEngine

    tr, _, _ = trainer
    engine = TransformersEngine(setup["student"], vocab_size=len(setup["tok"]))
    frozen = {k: v.copy() for k, v in tr.export_weights().items()}
    for v in frozen.values():
        v.flags.writeable = False
    engine.load_weights(frozen)
    params = dict(engine.model.named_parameters())
    assert set(params) <= set(frozen)
    for name, p in params.items():  # the same memory, not equal copies
        assert p.data_ptr() == frozen[name].ctypes.data, name
    live = tr.export_weights()  # writable: views of the student's own parameters
    engine.load_weights(live)
    for name, p in dict(engine.model.named_parameters()).items():
        assert p.data_ptr() != live[name].ctypes.data and torch.equal(p.data, torch.from_numpy(live[name])), name
    engine.load_weights(frozen)
    engine._own_parameters()  # what receive_weights does before writing
    for name, p in dict(engine.model.named_parameters()).items():
        assert p.data_ptr() != frozen[name].ctypes.data and torch.equal(p.data, torch.from_numpy(frozen[name]))
        p.data.add_(0.0)  # its own memory now: writing into an adopted view would change the shared copy


def test_checkpoint_round_trip(setup, trainer, tmp_path):
    from transformers import AutoModelForCausalLM

    tr, cfg, scored = trainer
    tr.save(str(tmp_path))
    assert (tmp_path / "hf" / "model.safetensors").exists() and not list((tmp_path / "hf").glob("*.bin"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in tr.engine.module.state_dict().items():
        assert torch.equal(hf.state_dict()[k], v), k
    saved = {k: v.clone() for k, v in tr.engine.module.state_dict().items()}
    lr_saved = tr.engine.get_lr()[0]
    tr.train_step(1, 1, setup["table"], scored)  # move away from the checkpoint
    assert tr.engine.get_lr()[0] != lr_saved
    tr.load(str(tmp_path))
    for k, v in tr.engine.module.state_dict().items():
        assert torch.equal(saved[k], v), k
    assert tr.engine.get_lr()[0] == pytest.approx(lr_saved)


def test_non_finite_loss_is_skipped_or_stops(setup, trainer):
    import pyarrow as pa

    from actors.student.trainer import NonFiniteLossError

    tr, _, scored = trainer
    col = scored.column("teacher_logprobs").combine_chunks()
    values = col.values.to_numpy().copy()
    values[0] = np.nan  # a NaN inside the response mask of row 0
    bad = scored.set_column(scored.schema.get_field_index("teacher_logprobs"), "teacher_logprobs",
                            pa.ListArray.from_arrays(col.offsets, pa.array(values)))
    before = {k: v.clone() for k, v in tr.engine.module.state_dict().items()}
    metrics = tr.train_step(5, 1, setup["table"], bad)
    assert metrics["train/skipped_updates"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in tr.engine.module.state_dict().items())
    tr.trainer.on_nonfinite = "stop"
    try:
        with pytest.raises(NonFiniteLossError, match=r"sample ids \[0,"):
            tr.train_step(5, 1, setup["table"], bad)
    finally:
        tr.trainer.on_nonfinite = "skip"


def _new_trainer(setup, *overrides, stage: int = 0, lr: float = 1e-3):
    """A one-rank trainer of the test student: B = 16, B_mini = 8 (two updates per step), 4 steps."""
    cfg = load_config(None, ["trainer.batch_size=16", "trainer.mini_batch_size=8", "trainer.max_steps=4",
                             f"trainer.lr={lr}", f"trainer.zero_stage={stage}", *overrides])
    tok = setup["tok"]
    tr = StudentTrainer(setup["student"], cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                        pad_id=tok.pad_token_id)
    tr.setup("127.0.0.1", free_port())
    return tr


def _weights(tr) -> dict:
    from actors.student.state import _base_optimizer, _full

    opt = _base_optimizer(tr.engine)
    return {n: _full(p, None, opt) for n, p in tr.engine.module.named_parameters()}


@pytest.mark.parametrize("save_stage,load_stage", [(0, 2), (2, 0), (1, 3)])
def test_training_state_moves_between_zero_stages(setup, trainer, tmp_path, save_stage, load_stage):
    """Save after two steps at one ZeRO stage, load at another: the next step lands on the same weights as
    continuing without the round trip. Adam's update depends on both moments, its step count (bias
    correction) and the scheduled lr, so a missing piece moves the weights by ~lr."""
    _, _, scored = trainer
    table = setup["table"]
    a = _new_trainer(setup, "trainer.weight_decay=0.1", stage=save_stage)
    a.train_step(0, 1, table, scored)
    a.train_step(1, 1, table, scored)
    a.save(str(tmp_path))
    a.train_step(2, 1, table, scored)
    expected, lr_expected = _weights(a), a.engine.get_lr()[0]
    b = _new_trainer(setup, "trainer.weight_decay=0.1", stage=load_stage)
    state = b.load(str(tmp_path))
    assert state["adam_step"] == 4 and state["saved_zero_stage"] == save_stage  # 2 steps x 2 mini-batches
    b.train_step(2, 1, table, scored)
    got = _weights(b)
    assert b.engine.get_lr()[0] == pytest.approx(lr_expected, rel=1e-9)
    moved = max((expected[n] - got[n]).abs().max().item() for n in expected)
    assert moved < 1e-6, f"resumed step differs from the continued one by {moved:.3g}"


# -- token-budget micro-batches, gradient checkpointing -------------------------------------------------------

def test_split_rows_respects_the_budget_and_the_piece_count():
    from actors.student.trainer import split_rows

    lengths = [5, 9, 3, 30, 4, 4, 4, 8]
    pieces = split_rows(lengths, 12)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(lengths)
    assert all(a < b for a, b in pieces) and all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    for a, b in pieces:  # within the budget, or a single row longer than it
        assert (b - a) * max(lengths[a:b]) <= 12 or b - a == 1
    assert (3, 4) in pieces  # the 30-token row alone
    assert split_rows(lengths, 0) == [(0, 8)] and split_rows(lengths, 10**6) == [(0, 8)]
    forced = split_rows(lengths, 12, len(lengths))
    assert forced == [(i, i + 1) for i in range(8)]
    more = split_rows(lengths, 12, len(pieces) + 1)
    assert len(more) == len(pieces) + 1 and all((b - a) * max(lengths[a:b]) <= 12 or b - a == 1 for a, b in more)
    with pytest.raises(ValueError):
        split_rows(lengths, 12, 9)


def _grads_at_step(tr) -> list:
    """Record the full gradients each time the engine steps (ZeRO 0: they are on the parameters)."""
    seen, step = [], tr.engine.step

    def recording_step(*a, **kw):
        seen.append({n: p.grad.detach().clone() for n, p in tr.engine.module.named_parameters() if p.grad is not None})
        return step(*a, **kw)

    tr.engine.step = recording_step
    return seen


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


BUDGET = 96  # padded prompt+response tokens: a few rows of this data per piece


@pytest.mark.parametrize("normalizer", ["all_tokens", "gated_tokens"])
def test_micro_batches_give_the_update_of_the_whole_share(setup, trainer, monkeypatch, normalizer):
    """Two mini-batches of 8 rows, each cut into several pieces: the accumulated gradients, the weights after
    each single optimizer step and the metrics equal those of one forward per mini-batch, for either
    forward-KL normaliser. The same check with the per-piece count (tokens, or gated tokens) in place of the
    mini-batch's global one fails."""
    from actors.student import trainer as student
    from actors.student.trainer import split_rows

    _, _, scored = trainer
    table = setup["table"]
    lengths = [len(p) + len(r) for p, r in zip(list_rows(table.column("prompt_ids")),
                                               list_rows(table.column("response_ids")))]
    assert min(len(split_rows(lengths[s:s + 8], BUDGET)) for s in (0, 8)) >= 3  # several pieces per mini-batch

    # lr 1e-4: Adam divides by |g|, so a float32 rounding difference in a near-zero gradient moves a weight
    # by up to ~lr x (relative rounding); at 1e-3 that reaches a few 1e-6 after two steps.
    # tau at the median teacher entropy: about half the positions gated, a different share in every piece
    tau = float(np.median(np.concatenate(list_rows(scored.column("teacher_entropy")))))
    norm = (f"loss.fkl_normalizer={normalizer}", f"loss.tau={tau!r}")
    whole = _new_trainer(setup, *norm, lr=1e-4)
    whole_grads = _grads_at_step(whole)
    m_whole = whole.train_step(0, 1, table, scored)
    assert 0 < m_whole["gate/fraction"] < 1  # some positions gated, not all: the two counts differ

    cut = _new_trainer(setup, *norm, f"trainer.micro_batch_tokens={BUDGET}", lr=1e-4)
    calls = []
    real_loss = student.eopd_loss
    monkeypatch.setattr(student, "eopd_loss", lambda *a, **kw: calls.append(a[0].shape[0]) or real_loss(*a, **kw))
    cut_grads = _grads_at_step(cut)
    m_cut = cut.train_step(0, 1, table, scored)
    assert len(calls) >= 6 and sum(calls) == 16 and len(cut_grads) == 2  # pieces, one step per mini-batch

    for g_whole, g_cut in zip(whole_grads, cut_grads):  # float32 sums in another order
        scale = max(g.abs().max().item() for g in g_whole.values())
        assert _max_diff(g_whole, g_cut) < 1e-5 * scale
    moved = _max_diff(_weights(whole), _weights(cut))
    assert moved < 1e-6, f"micro-batched step differs by {moved:.3g}"
    assert _max_diff(_weights(whole), {n: p.detach() for n, p in load_causal_lm(setup["student"]).named_parameters()
                                       if n in _weights(whole)}) > 1e-4  # and the step did move the weights
    assert set(m_whole) == set(m_cut)
    for key in m_whole:
        if key != "time/train":
            assert m_cut[key] == pytest.approx(m_whole[key], rel=1e-5, abs=1e-7), key

    # Sensitivity: each piece normalised by its own count (of tokens, or of gated tokens for the forward KL)
    # gives a different update.
    if normalizer == "all_tokens":
        monkeypatch.setattr(student, "eopd_loss", lambda *a, num_tokens=None, **kw: real_loss(*a, **kw))
    else:
        monkeypatch.setattr(student, "eopd_loss", lambda *a, num_gated=None, **kw: real_loss(*a, **kw))
    local = _new_trainer(setup, *norm, f"trainer.micro_batch_tokens={BUDGET}", lr=1e-4)
    local.train_step(0, 1, table, scored)
    assert _max_diff(_weights(whole), _weights(local)) > 1e-5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_non_finite_piece_skips_the_whole_mini_batch(setup, trainer, stage):
    """A NaN in the LAST piece of the first mini-batch: earlier pieces have back-propagated already, yet no
    weight moves, and the next clean step lands where a trainer that never saw the bad batch lands."""
    import pyarrow as pa

    _, _, scored = trainer
    table = setup["table"]
    col = scored.column("teacher_logprobs").combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy().copy()
    values[offsets[7]] = np.nan  # first response token of row 7: the last piece of mini-batch 0
    bad = scored.set_column(scored.schema.get_field_index("teacher_logprobs"), "teacher_logprobs",
                            pa.ListArray.from_arrays(col.offsets, pa.array(values)))
    cut = _new_trainer(setup, f"trainer.micro_batch_tokens={BUDGET}", stage=stage)
    before = _weights(cut)
    m = cut.train_step(0, 1, table.slice(0, 8), bad.slice(0, 8))
    assert m["train/skipped_updates"] == 1.0
    assert _max_diff(before, _weights(cut)) == 0.0
    cut.train_step(1, 1, table.slice(8, 8), scored.slice(8, 8))
    fresh = _new_trainer(setup, f"trainer.micro_batch_tokens={BUDGET}", stage=stage)
    fresh.train_step(1, 1, table.slice(8, 8), scored.slice(8, 8))
    moved = _max_diff(_weights(fresh), _weights(cut))
    assert moved < 1e-6, f"gradients of the skipped pieces leaked into the next step ({moved:.3g})"
    assert cut.engine.get_lr()[0] == pytest.approx(fresh.engine.get_lr()[0])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(setup, trainer):
    _, _, scored = trainer
    table = setup["table"]
    plain = _new_trainer(setup)
    ckpt = _new_trainer(setup, "trainer.gradient_checkpointing=true")
    flag = "is_activation_checkpointing" if hasattr(plain.engine.module, "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    assert getattr(ckpt.engine.module, flag) and not getattr(plain.engine.module, flag)
    g_plain, g_ckpt = _grads_at_step(plain), _grads_at_step(ckpt)
    m_plain = plain.train_step(0, 1, table, scored)
    m_ckpt = ckpt.train_step(0, 1, table, scored)
    assert m_ckpt["loss/total"] == pytest.approx(m_plain["loss/total"], rel=1e-6, abs=1e-7)
    for a, b in zip(g_plain, g_ckpt):
        assert _max_diff(a, b) < 1e-6
    assert _max_diff(_weights(plain), _weights(ckpt)) < 1e-6
