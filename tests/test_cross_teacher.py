"""The teacher worker of another tokenizer (`actors/teacher/cross.py`), run as a plain class: its chunked
statistics against the library's reference composition on full float64 log-probs, and a teacher whose ids are
a permutation of the student's against the same-tokenizer scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.teacher.cross import CrossTeacherScorer
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows, make_rollout_table, teacher_mask_rows
from eopd_ray.cross_stats import cross_teacher_stats
from eopd_ray.cross_tokenizer import ResponseEncoder, TokenBytes, align, retokenize, vocab_map
from eopd_ray.teacher_context import teacher_prompt_ids
from tests.cross_models import build_permuted_teacher
from tests.test_cross_tokenizer import TEXTS, byte_level_tokenizer, sentencepiece_tokenizer

K = 4


def random_model(tok, out_dir, seed: int = 0):
    """A random 2-layer Llama over `tok`, saved with it (logits far from uniform: init std 0.2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def rollout_of(student_tok, teacher_tok, texts, ended, seed: int = 0):
    """Rollout rows of `texts` in the student's ids (its EOS appended where `ended`), the teacher's own prompt."""
    rng = np.random.default_rng(seed)
    questions = [f"question {i}" for i in range(len(texts))]
    prompts = teacher_prompt_ids(questions, student_tok, "")
    t_prompts = teacher_prompt_ids(questions, teacher_tok, "")
    responses = [np.asarray(student_tok(t, add_special_tokens=False)["input_ids"] + ([student_tok.eos_token_id]
                                                                                     if e else []), np.int32)
                 for t, e in zip(texts, ended)]
    logprobs = [-rng.uniform(0.1, 2.0, len(r)).astype(np.float32) for r in responses]
    entropy = [np.zeros(len(r)) for r in responses]
    return make_rollout_table(np.arange(len(texts)), prompts, responses, logprobs, entropy, [False] * len(texts),
                              t_prompts)


def test_chunked_cross_scorer_equals_the_reference_on_full_float64_logprobs(tmp_path):
    student_tok, teacher_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    student_dir = tmp_path / "student"
    student_tok.save_pretrained(student_dir)
    teacher_dir = random_model(teacher_tok, tmp_path / "teacher")
    # merges, multi-byte characters on both sides, ended and cut responses (one cut inside a character)
    texts = TEXTS + ["café 中"]
    ended = [True, False, True, False, True, False]
    rollout = rollout_of(student_tok, teacher_tok, texts, ended)
    scorer = CrossTeacherScorer(teacher_dir, K, len(teacher_tok), 0, str(student_dir), len(student_tok),
                                chunk_size=3, max_batch=4, device="cpu")
    table, stats = scorer.score(rollout)

    model = scorer.model
    s_bytes, encoder = TokenBytes(student_tok), ResponseEncoder(teacher_tok)
    vmap = vocab_map(s_bytes, encoder.bytes)
    responses = list_rows(rollout.column("response_ids"))
    masks = teacher_mask_rows(table, [len(r) for r in responses])
    got = {c: list_rows(table.column(c)) for c in ("teacher_logprobs", "teacher_entropy", "topk_ids", "topk_logprobs")}
    merged_rows = 0
    for i, (resp, t_prompt, slp) in enumerate(zip(responses, list_rows(rollout.column("teacher_prompt_ids")),
                                                   list_rows(rollout.column("logprobs")))):
        t_ids, sb = retokenize(resp, s_bytes, encoder)
        alignment = align(sb, encoder.bytes(t_ids))
        merged_rows += bool(alignment.merged.any())
        seq = torch.as_tensor(np.concatenate([t_prompt, t_ids]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0].double()
        lp_MV = torch.log_softmax(logits[len(t_prompt) - 1:len(t_prompt) - 1 + len(t_ids)], dim=-1)
        ref = cross_teacher_stats(alignment, lp_MV, t_ids, vmap, K, np.asarray(slp, np.float64))
        np.testing.assert_array_equal(masks[i], ref.mask)
        m = ref.mask
        np.testing.assert_allclose(got["teacher_logprobs"][i][m], ref.logprobs[m], atol=2e-5)
        np.testing.assert_allclose(got["teacher_entropy"][i][m], ref.entropy[m], atol=2e-5)
        top = got["topk_logprobs"][i].reshape(-1, K)[m]
        np.testing.assert_allclose(top, ref.topk_logprobs[m], atol=2e-5)
        ids = got["topk_ids"][i].reshape(-1, K)[m]
        distinct = np.abs(np.diff(ref.topk_logprobs[m], axis=-1)) > 1e-4  # ids of tied slots may swap
        np.testing.assert_array_equal(ids[:, :-1][distinct], ref.topk_ids[m][:, :-1][distinct])
    assert merged_rows >= 2  # the case that needs the behaviour log-probs was exercised
    assert 0 < stats["cross/aligned_fraction"] < 1
    assert stats["teacher/tokens"] == sum(int(m.sum()) for m in masks)


def test_a_permuted_tokenizer_gives_the_same_tokenizer_statistics(tmp_path, tiny_models):
    from eopd_ray.models import load_tokenizer

    teacher_dir, student_dir = tiny_models
    permuted = str(build_permuted_teacher(teacher_dir, tmp_path / "permuted"))
    s_tok, p_tok = load_tokenizer(student_dir), load_tokenizer(permuted)
    assert s_tok.get_vocab() != p_tok.get_vocab()
    texts = ["12+3=15;", "7*8=56;4-1=3", "(2+3)*4=20;", "9/3=3"]
    ended = [True, False, True, True]
    rollout = rollout_of(s_tok, p_tok, texts, ended)  # the teacher's prompt in the permuted ids
    shared, _ = TeacherScorer(teacher_dir, K, len(s_tok), s_tok.pad_token_id, device="cpu").score(
        rollout_of(s_tok, s_tok, texts, ended))
    cross, stats = CrossTeacherScorer(permuted, K, len(p_tok), s_tok.pad_token_id, student_dir, len(s_tok),
                                      device="cpu").score(rollout)
    assert stats["cross/aligned_fraction"] == 1.0 and stats["cross/unmatched_mass"] < 1e-6
    for col in ("teacher_logprobs", "teacher_entropy", "topk_logprobs"):
        for a, b in zip(list_rows(shared.column(col)), list_rows(cross.column(col))):
            np.testing.assert_allclose(b, a, atol=1e-5)
    for a, b, lp in zip(list_rows(shared.column("topk_ids")), list_rows(cross.column("topk_ids")),
                        list_rows(shared.column("topk_logprobs"))):
        lp = lp.reshape(-1, K)
        distinct = np.abs(np.diff(lp, axis=-1)) > 1e-4
        np.testing.assert_array_equal(b.reshape(-1, K)[:, :-1][distinct], a.reshape(-1, K)[:, :-1][distinct])


def test_cross_scorer_refuses_a_top_k_wider_than_the_student_vocabulary(tmp_path):
    student_tok, teacher_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    student_tok.save_pretrained(tmp_path / "student")
    teacher_dir = random_model(teacher_tok, tmp_path / "teacher")
    with pytest.raises(ValueError, match="loss.top_k=100000"):
        CrossTeacherScorer(teacher_dir, 100000, len(teacher_tok), 0, str(tmp_path / "student"), len(student_tok),
                           device="cpu")


CROSS = ["teacher.tokenizer=cross", "teacher.prompt_template=teacher", "eval.teacher=false"]


@pytest.mark.parametrize("override, match", [
    ("teacher.prompt_template=student", "teacher.prompt_template='student' is invalid: allowed teacher with"),
    ("teacher.eos_remap=auto", "teacher.eos_remap='auto' is invalid"),
    ("teacher.zero_stage=3", "teacher.zero_stage=3 is invalid: allowed 0 with teacher.tokenizer=cross"),
    ("loss.objective=kd", "loss.objective='kd' is invalid: allowed an on-policy objective"),
    ("eval.teacher=true", "eval.teacher=True is invalid: allowed false with teacher.tokenizer=cross"),
    ("teacher.tokenizer=bytes", "teacher.tokenizer='bytes' is invalid: allowed shared or cross"),
])
def test_cross_settings_that_cannot_work_are_refused_up_front(override, match):
    from eopd_ray.config import load_config
    from eopd_ray.errors import ConfigError

    load_config(None, CROSS)  # the settings a cross run needs are accepted
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        load_config(None, CROSS + [override])


def test_a_tokenizer_that_cannot_be_read_as_bytes_is_a_setup_error_naming_the_model():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from eopd_ray.run_setup import check_cross_tokenizers
    from eopd_ray.vocab import VocabMismatchError

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer, wp.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    check_cross_tokenizers(byte_level_tokenizer(), sentencepiece_tokenizer())  # both readable: no error
    for student, teacher, role in ((wordpiece, sentencepiece_tokenizer(), "student"),
                                   (byte_level_tokenizer(), wordpiece, "teacher")):
        with pytest.raises(VocabMismatchError, match=f"model.{role}: teacher.tokenizer=cross cannot use its "
                                                     "tokenizer: .*WordPiece"):
            check_cross_tokenizers(student, teacher)
