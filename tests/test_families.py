"""Family swaps: the teacher scorer, the rollout engine and the student trainer on causal LMs of other
transformers families (tiny, random, built here), against float64 references from the model's own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rollout.worker import RolloutWorker
from actors.rollout.engine import SamplingParams
from actors.runtime.dist import free_port
from actors.student.trainer import StudentTrainer
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows, make_rollout_table
from eopd_ray.config import load_config
from eopd_ray.models import check_output_head, load_causal_lm, load_tokenizer, output_head
from tests.family_models import FAMILIES, build_family_model

K = 8
EXTRA_ROWS = 5  # padded output rows beyond the tokenizer, as real checkpoints have


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: str(build_family_model(root / f, f, EXTRA_ROWS, seed=i)) for i, f in enumerate(FAMILIES)}


def _table(tok, n_rows=5, seed=0):
    """Rollout rows of random real-token prompts and responses of different lengths (so batches pad)."""
    rng = np.random.default_rng(seed)
    first = 4  # after <pad> <bos> <eos> <unk>
    prompts = [rng.integers(first, len(tok), size=rng.integers(3, 9)) for _ in range(n_rows)]
    responses = [rng.integers(first, len(tok), size=rng.integers(2, 12)) for _ in range(n_rows)]
    zeros = [np.zeros(len(r), np.float32) for r in responses]
    return make_rollout_table(np.arange(n_rows), prompts, responses, zeros, zeros, np.zeros(n_rows, bool))


def _reference(model_dir, table, vocab):
    """Per row, unpadded: float64 log-softmax over the shared vocabulary of the model's own logits at the
    positions that predict the response tokens. (T, V) per row."""
    model = load_causal_lm(model_dir).to(torch.float64).eval()
    if getattr(model.config, "_experts_implementation", None) is not None:
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    out = []
    for p, r in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids"))):
        ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(r) - 1, :vocab]
        out.append((torch.log_softmax(logits, -1), torch.tensor(r, dtype=torch.long)))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_statistics_match_the_models_own_logits(family_dirs, family):
    tok = load_tokenizer(family_dirs[family])
    table = _table(tok)
    scorer = TeacherScorer(family_dirs[family], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id,
                           chunk_size=6, device="cpu")
    scored, _ = scorer.score(table)
    for (logp, r), lp, ent, ids, tlp in zip(_reference(family_dirs[family], table, len(tok)),
                                            *(list_rows(scored.column(c)) for c in (
                                                "teacher_logprobs", "teacher_entropy", "topk_ids", "topk_logprobs"))):
        np.testing.assert_allclose(lp, logp.gather(-1, r[:, None])[:, 0].numpy(), atol=2e-5)
        np.testing.assert_allclose(ent, -(logp.exp() * logp).sum(-1).numpy(), atol=2e-5)
        ids, tlp = ids.reshape(-1, K), tlp.reshape(-1, K)
        assert ids.max() < len(tok)  # never a padded row
        np.testing.assert_allclose(tlp, torch.sort(logp, -1, descending=True).values[:, :K].numpy(), atol=2e-5)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_a_plain_lm_head_matmul_would_be_wrong_for_this_family(family_dirs, family):
    """Why the teacher uses the model's own head: for these families hidden @ W.T is not the logits."""
    model = load_causal_lm(family_dirs[family]).eval()
    ids = torch.arange(4, 20)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
        plain = hidden @ model.get_output_embeddings().weight.T
        via_head = output_head(model)(hidden)
    assert (plain - logits).abs().max() > 0.05
    torch.testing.assert_close(via_head, logits, atol=1e-6, rtol=0)


def test_a_head_that_does_not_reproduce_the_logits_is_refused(family_dirs):
    model = load_causal_lm(family_dirs["llama"]).eval()
    head = output_head(model)
    with pytest.raises(ValueError, match="'llama'.*does not reproduce"):
        check_output_head(model, lambda h: head(h) * 1.01, "cpu", 40)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_rollout_behaviour_logprobs_match_the_models_own_logits(family_dirs, family):
    tok = load_tokenizer(family_dirs[family])
    prompts = [np.array([5, 9, 7, 11]), np.array([6, 8])]
    worker = RolloutWorker(family_dirs[family], vocab_size=len(tok), num_threads=1)
    table, stats = worker.rollout([0, 1], prompts, ["1", "2"], SamplingParams(1.0, 1.0, 10, seed=3))
    assert stats["rollout/cut_at_padded_id"] == 0  # the engine never sampled a padded row
    ref = _reference(family_dirs[family], table, len(tok))
    for (logp, r), lp in zip(ref, list_rows(table.column("logprobs"))):
        assert r.max() < len(tok)
        np.testing.assert_allclose(lp, logp.gather(-1, r[:, None])[:, 0].numpy(), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_student_of_another_family_trains_on_teacher_statistics(family_dirs, family):
    """A Llama teacher scores, a student of `family` (possibly another) takes one EOPD step through DeepSpeed:
    the loss is finite and every parameter moves; with the chunked logits path (through the family's own
    output head: Gemma 2 soft-caps its logits) the step gives the same loss and weights."""
    tok = load_tokenizer(family_dirs[family])
    table = _table(tok, n_rows=4, seed=1)
    scored, _ = TeacherScorer(family_dirs["llama"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id,
                              device="cpu").score(table)
    runs = []
    for chunk in (0, 3):
        cfg = load_config(None, ["trainer.batch_size=4", "trainer.mini_batch_size=4", "trainer.max_steps=2",
                                 "trainer.lr=1e-3", "loss.tau=0.0", f"loss.top_k={K}", f"trainer.logits_chunk={chunk}"])
        tr = StudentTrainer(family_dirs[family], cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                            pad_id=tok.pad_token_id)
        tr.setup("127.0.0.1", free_port())
        before = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
        metrics = tr.train_step(0, 1, table, scored)
        assert np.isfinite(metrics["loss/total"])
        after = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
        assert all(not torch.equal(after[n], before[n]) for n in before)
        runs.append((metrics, after))
    (m_full, w_full), (m_cut, w_cut) = runs
    assert m_cut["loss/total"] == pytest.approx(m_full["loss/total"], rel=1e-5)
    # lr 1e-3 on the first Adam step moves each weight by about lr x sign(g): equal steps agree to rounding
    assert max((w_full[n] - w_cut[n]).abs().max().item() for n in w_full) < 1e-5


def test_padded_ids_from_an_engine_end_the_response_before_them(family_dirs):
    """vLLM samples over the padded rows too. An engine that does so (the transformers engine with its
    suppression switched off, on a random model whose padded rows carry real mass) gives responses that
    the worker ends before their first padded id, keeping the prefix's ids and log-probs as they were."""
    from actors.rollout.engine import cut_at_padded_ids

    tok = load_tokenizer(family_dirs["llama"])
    worker = RolloutWorker(family_dirs["llama"], vocab_size=len(tok), num_threads=1)
    worker.engine.suppress = None
    prompts = [np.array([5 + i % 30, 9, 7]) for i in range(12)]
    params = SamplingParams(1.0, 1.0, 16, seed=5)
    raw = worker.engine.generate(prompts, params)
    assert any((r >= len(tok)).any() for r in raw.response_ids)  # the situation exists
    table, stats = worker.rollout(list(range(12)), prompts, ["1"] * 12, params)
    expected, cut = cut_at_padded_ids(raw, len(tok))
    assert cut > 0 and stats["rollout/cut_at_padded_id"] == cut / 12
    for ids, lp, want_ids, want_lp in zip(list_rows(table.column("response_ids")), list_rows(table.column("logprobs")),
                                          expected.response_ids, expected.logprobs):
        assert (ids < len(tok)).all()
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(lp, want_lp)
    first = next(i for i, r in enumerate(raw.response_ids) if (r >= len(tok)).any())
    n = int(np.flatnonzero(raw.response_ids[first] >= len(tok))[0])
    assert len(expected.response_ids[first]) == n


@pytest.mark.e2e
def test_job_distils_a_gemma2_teacher_into_a_llama_student_through_ray(tmp_path):
    """The main job with both families swapped and different padded vocabularies (teacher 55 + 5 rows,
    student 55 + 3): every metric finite, and the checkpoint is the student's family with its own rows."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.test_e2e_ray import run_job

    teacher = build_family_model(tmp_path / "gemma2", "gemma2", extra_rows=5, seed=1)
    student = build_family_model(tmp_path / "llama", "llama", extra_rows=3, seed=2)
    out = tmp_path / "run"
    run_job(out, (teacher, student), "trainer.max_steps=2", "eval.enabled=false")
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps_done"] == 2
    for row in results["train"]["metrics"]:
        for key in ("loss/total", "loss/fkl", "teacher/entropy", "student/entropy", "rollout/cut_at_padded_id"):
            assert np.isfinite(row[key]), key
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1] / "hf"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == "llama" and model.get_output_embeddings().weight.shape[0] == 58


def test_broadcast_receiver_names_parameters_it_cannot_take(family_dirs):
    """Checked before any bucket moves: the same model matches; extra, missing and reshaped parameters are
    each named."""
    from actors.sync.buckets import ParamMeta, param_metas

    tok = load_tokenizer(family_dirs["llama"])
    engine = RolloutWorker(family_dirs["llama"], vocab_size=len(tok), num_threads=1).engine
    same = param_metas(load_causal_lm(family_dirs["llama"]), "float32")
    assert engine.weight_mismatches(same) == []
    gemma = engine.weight_mismatches(param_metas(load_causal_lm(family_dirs["gemma2"]), "float32"))
    assert "model.layers.0.pre_feedforward_layernorm.weight: the engine has no such parameter, the student " \
           "sends (32,)" in gemma
    assert engine.weight_mismatches(same[1:]) == [f"{same[0].name}: never sent"]
    wider = [ParamMeta(m.name, (m.shape[0] + 1,) + m.shape[1:], m.dtype) if m.name == "lm_head.weight" else m
             for m in same]
    rows = len(tok) + EXTRA_ROWS
    assert engine.weight_mismatches(wider) == [f"lm_head.weight: the engine has ({rows}, 32), the student sends "
                                               f"({rows + 1}, 32)"]


def test_output_head_puts_back_an_instance_level_forward(family_dirs):
    """Hooks and wrappers (accelerate, peft) set a forward on the module instance; the head restores it."""
    model = load_causal_lm(family_dirs["llama"]).eval()
    decoder = model.get_decoder()
    original = decoder.forward
    decoder.forward = wrapped = lambda *args, **kwargs: original(*args, **kwargs)  # noqa: E731
    with torch.no_grad():
        output_head(model)(torch.zeros(3, 32))
    assert decoder.__dict__["forward"] is wrapped
    del decoder.forward
    with torch.no_grad():
        output_head(model)(torch.zeros(3, 32))
    assert "forward" not in decoder.__dict__
