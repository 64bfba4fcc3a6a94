"""Family swaps: the teacher scorer, the rollout engine and the student trainer on causal LMs of other
transformers families (tiny, random, built here), against float64 references from the model's own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rollout import RolloutWorker, SamplingParams
from actors.student import StudentTrainer, free_port
from actors.teacher import TeacherScorer
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
    table, _ = worker.rollout([0, 1], prompts, ["1", "2"], SamplingParams(1.0, 1.0, 10, seed=3))
    ref = _reference(family_dirs[family], table, len(tok))
    for (logp, r), lp in zip(ref, list_rows(table.column("logprobs"))):
        assert r.max() < len(tok)
        np.testing.assert_allclose(lp, logp.gather(-1, r[:, None])[:, 0].numpy(), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_student_of_another_family_trains_on_teacher_statistics(family_dirs, family):
    """A Llama teacher scores, a student of `family` (possibly another) takes one EOPD step through DeepSpeed:
    the loss is finite and every parameter moves."""
    tok = load_tokenizer(family_dirs[family])
    table = _table(tok, n_rows=4, seed=1)
    scored, _ = TeacherScorer(family_dirs["llama"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id,
                              device="cpu").score(table)
    cfg = load_config(None, ["trainer.batch_size=4", "trainer.mini_batch_size=4", "trainer.max_steps=2",
                             "trainer.lr=1e-3", "loss.tau=0.0", f"loss.top_k={K}"])
    tr = StudentTrainer(family_dirs[family], cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                        pad_id=tok.pad_token_id)
    tr.setup("127.0.0.1", free_port())
    before = {n: p.detach().clone() for n, p in tr.engine.module.named_parameters()}
    metrics = tr.train_step(0, 1, table, scored)
    assert np.isfinite(metrics["loss/total"])
    moved = [n for n, p in tr.engine.module.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)
