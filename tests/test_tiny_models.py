"""Tokenizer and tiny teacher/student: offline HF round trips, safetensors, determinism, atomic cache."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from eopd_ray import task as T
from eopd_ray import tiny_models as tm
from eopd_ray.tiny_models import (TinyModelSpec, TinyModelsConfig, build_tiny_models, build_tokenizer,
                                  ensure_tiny_models, evaluate_model)


def small_config(**kw) -> TinyModelsConfig:
    """Seconds to build; deliberately undertrained. Sequential unless asked (a child process costs
    imports)."""
    kw.setdefault("parallel", False)
    return TinyModelsConfig(
        teacher=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, steps=20, lr=3e-3),
        student=TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, steps=10, lr=3e-3, targets="hard",
                              canonical_frac=0.75),
        batch_size=16, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache_dir, teacher_dir, student_dir) of `small_config()`, built through the cache."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    teacher, student = ensure_tiny_models(cache_dir=cache, cfg=small_config(), progress=False)
    return cache, teacher, student


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_single_digit_tokens():
    tok = build_tokenizer()
    p = T.problem_from_terms([13, 5, 2])
    for text in (p.prompt, T.canonical_trace(p), "5+2=7;7+3=10;#10", "a b\nc?"):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert len(ids) == len(text)  # one token per character, no special token added on encode
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("13+5=")["input_ids"]) == ["1", "3", "+", "5", "="]
    assert all(tok.convert_tokens_to_ids(c) == i for c, i in tm._CHAR_IDS.items())
    assert tok.convert_tokens_to_ids("~") == tok.unk_token_id  # outside the alphabet


def test_special_tokens_and_chat_template():
    tok = build_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 4 + len(tm.ALPHABET)
    user = [{"role": "user", "content": "3+5+2="}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == "<bos>3+5+2="
    ids = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == [tok.bos_token_id] + tok("3+5+2=")["input_ids"]
    full = user + [{"role": "assistant", "content": "3+5=8;8+2=10;#10"}]
    assert tok.apply_chat_template(full, tokenize=False) == "<bos>3+5+2=3+5=8;8+2=10;#10<eos>"
    assert tok.decode(tok("<bos>1<eos>")["input_ids"]) == "<bos>1<eos>"
    assert tok("<bos>1<eos>")["input_ids"] == [1, tm._CHAR_IDS["1"], 2]


def test_tokenizer_save_reload_offline(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["3+5+2=", "5+2=7;7+3=10;#10", "<bos>9+9<eos><pad>", "x y"]
    assert [again(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert again.chat_template == tok.chat_template and again.padding_side == "left"
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


# ------------------------------------------------------------------------------------------- models
def test_models_are_hf_qwen3_with_safetensors(built, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, teacher, student = built
    sizes = []
    for d in (teacher, student):
        names = set(os.listdir(d))
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
        assert not any(n.endswith(".bin") for n in names)
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert isinstance(model, Qwen3ForCausalLM) and model.config.vocab_size == len(tok)
        assert model.generation_config.eos_token_id == tok.eos_token_id
        logits = model(**tok.apply_chat_template([{"role": "user", "content": "1+2+3="}], tokenize=True,
                                                 add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)).logits
        assert logits.shape == (1, 7, len(tok)) and torch.isfinite(logits).all()
        sizes.append(sum(p.numel() for p in model.parameters()))
    assert sizes[0] > sizes[1]  # the student is the smaller model


def test_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    cfg = small_config()
    a = build_tiny_models(tmp_path / "a", cfg, progress=False)
    b = build_tiny_models(tmp_path / "b", cfg, progress=False)
    for da, db in zip(a, b):
        ta, tb = load_file(da / "model.safetensors"), load_file(db / "model.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    other = load_file(build_tiny_models(tmp_path / "c", small_config(seed=1), progress=False)[0]
                      / "model.safetensors")
    assert not all(torch.equal(other[k], ta[k]) for k in other if k in ta and "norm" not in k)


def test_parallel_build_matches_sequential(tmp_path):
    from safetensors.torch import load_file

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a parallel build needs 2 usable CPUs")
    seq = build_tiny_models(tmp_path / "seq", small_config(), progress=False)
    par = build_tiny_models(tmp_path / "par", small_config(parallel=True), progress=False)
    for a, b in zip(seq, par):
        ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert sorted(os.listdir(tmp_path / "par")) == ["build_info.json", "student", "teacher"]
    assert small_config(parallel=True).key() == small_config().key()  # same weights, same cache entry


def test_build_leaves_caller_rng_and_threads_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_models(tmp_path, small_config(num_threads=1), progress=False)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_cache_hit_does_not_rebuild(built, monkeypatch):
    cache, teacher, student = built
    marker = teacher.parent / tm.MARKER
    stamp = marker.stat().st_mtime_ns
    monkeypatch.setattr(tm, "build_tiny_models", lambda *a, **k: pytest.fail("rebuilt a cached build"))
    t0 = time.perf_counter()
    assert ensure_tiny_models(cache_dir=cache, cfg=small_config(), progress=False) == (teacher, student)
    assert time.perf_counter() - t0 < 1.0 and marker.stat().st_mtime_ns == stamp
    assert teacher.parent.name == small_config().key() != TinyModelsConfig().key()


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("parallel", [False, True])
def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, parallel):
    """Sequential: dies in the student, after the teacher was saved. Parallel: dies in the teacher while a
    child process trains the student (the child is killed)."""
    real = tm._train_model
    victim = "teacher" if parallel else "student"

    def train_then_die(model, tok, spec, cfg, seed, progress, desc, on_step=None):
        if victim in desc:
            def die(step, model, loss):
                if step == 3:
                    raise Interrupted
            on_step = die
        return real(model, tok, spec, cfg, seed, progress, desc, on_step=on_step)

    cfg = small_config(parallel=parallel)
    monkeypatch.setattr(tm, "_train_model", train_then_die)
    with pytest.raises(Interrupted):
        ensure_tiny_models(cache_dir=tmp_path, cfg=cfg, progress=False)
    leftovers = [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # neither the final directory nor the temporary one
    monkeypatch.setattr(tm, "_train_model", real)
    teacher, student = ensure_tiny_models(cache_dir=tmp_path, cfg=cfg, progress=False)
    assert (teacher.parent / tm.MARKER).exists() and (student / "model.safetensors").exists()


def test_killed_build_debris_is_ignored(tmp_path):
    """What a SIGKILL leaves (a temporary directory, a final one without marker) is never reused."""
    cfg = small_config()
    key = cfg.key()
    (tmp_path / f".{key}.tmp-99999-deadbeef" / "teacher").mkdir(parents=True)
    (tmp_path / key / "teacher").mkdir(parents=True)
    (tmp_path / key / "teacher" / "config.json").write_text("{}")
    teacher, _ = ensure_tiny_models(cache_dir=tmp_path, cfg=cfg, progress=False)
    assert (teacher / "model.safetensors").exists() and (teacher.parent / tm.MARKER).exists()
    assert not list(tmp_path.glob(f".{key}.tmp-*"))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="tiny_models.student.traces='sorted' is invalid"):
        build_tiny_models("unused", TinyModelsConfig(student=TinyModelSpec(traces="sorted")))
    with pytest.raises(ValueError, match="canonical_frac=1.5 is invalid"):
        build_tiny_models("unused", TinyModelsConfig(student=TinyModelSpec(canonical_frac=1.5)))
    with pytest.raises(ValueError, match="hidden_size=30 is invalid: allowed a multiple of num_heads"):
        ensure_tiny_models("unused", TinyModelsConfig(teacher=TinyModelSpec(hidden_size=30, num_heads=4)))


def test_evaluate_model_reports_entropy_by_position_kind(built):
    _, teacher, _ = built
    r = evaluate_model(teacher, T.make_problems(16, seed=0, split="test"), n=2, seed=0)
    assert r["n"] == 32 and 0 <= r["accuracy"] <= 1 and 0 <= r["valid_trace_rate"] <= r["accuracy"] + 1e-9
    assert 0 <= r["frac_entropy_ge_1.0"] <= r["frac_entropy_ge_0.8"] <= 1
    assert r["tokens_per_response"] > 0 and not math.isnan(r["mean_entropy_determined"])
    assert tm.sample_accuracy(teacher, T.make_problems(4, seed=0, split="test")) <= 1


@pytest.mark.e2e
def test_default_models_meet_the_quality_bars():
    """The shipped default pair (about a minute to build on 2 idle cores, then cached): a strong teacher that
    uses every order and is sure where the task is determined, and a much weaker, under-confident student
    (measured at build time: teacher 0.96 accurate, student 0.08; entropy where determined 0.007 vs 0.75)."""
    teacher, student = ensure_tiny_models(progress=False)
    problems = T.make_problems(200, seed=0, split="test")
    te, st = evaluate_model(teacher, problems), evaluate_model(student, problems)
    assert te["accuracy"] >= 0.85 and 0.02 <= st["accuracy"] <= 0.3 and st["accuracy"] < te["accuracy"] - 0.5
    assert te["mean_entropy_decision"] > 0.8 and te["mean_entropy_determined"] < 0.05
    assert te["noncanonical_rate"] > 0.7
    assert st["mean_entropy_determined"] > 0.3 and st["frac_entropy_ge_1.0"] > 3 * te["frac_entropy_ge_1.0"]


def test_label_smoothing_spreads_a_share_of_each_target_over_the_vocabulary():
    import numpy as np

    from eopd_ray.tiny_models import _batch, build_tokenizer

    tok = build_tokenizer()
    cfg = TinyModelsConfig(batch_size=4)
    plain, smooth = TinyModelSpec(targets="soft"), TinyModelSpec(targets="soft", label_smoothing=0.2)
    x0, y0 = _batch(np.random.default_rng(3), cfg, plain, tok)
    x1, y1 = _batch(np.random.default_rng(3), cfg, smooth, tok)
    assert torch.equal(x0, x1)  # same rows: only the targets differ
    resp = y0.sum(-1) > 0
    assert torch.equal(resp, y1.sum(-1) > 0)  # no target outside the responses
    torch.testing.assert_close(y1[resp], 0.8 * y0[resp] + 0.2 / len(tok), rtol=0, atol=1e-7)
    torch.testing.assert_close(y1[resp].sum(-1), torch.ones(int(resp.sum())), rtol=0, atol=1e-6)


def test_variants_share_the_teacher_and_validate(tmp_path):
    from eopd_ray.config import ConfigError, load_config
    from eopd_ray.tiny_models import VARIANTS

    assert VARIANTS["default"].key() == TinyModelsConfig().key()  # `tiny` alone keeps its cache
    assert len({v.key() for v in VARIANTS.values()}) == len(VARIANTS)
    for name, cfg in VARIANTS.items():
        cfg.validate()
        assert cfg.teacher == TinyModelsConfig().teacher, name  # one teacher: only the student differs
        assert load_config(None, [f"model.tiny_variant={name}"]).model.tiny_variant == name
    with pytest.raises(ConfigError, match="model.tiny_variant='big' is invalid: allowed one of default"):
        load_config(None, ["model.tiny_variant=big"])
