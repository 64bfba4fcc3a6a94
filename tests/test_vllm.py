"""The vLLM engine on vLLM's CPU build, without Ray: its log-probs against a float64 transformers reference,
seeded sampling, and every weight path into it (object store, bucketed broadcast over gloo, a checkpoint on
disk) for tied and untied models, with the post-sync check catching stale weights and a stale tied head.

Tolerances: vLLM and the reference run the same float32 model; vLLM's CPU kernels (repacked GEMMs, its own
attention) and summation order differ, which moves a per-token log-prob by a few 1e-6 on these models
(printed by the tests). A float32 bound of 1e-4 is 10-100x that, and 300x below the 0.032 that a stale tied
head caused; the post-sync check itself uses its float32 limits (actors/sync/check.py).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from actors.rollout.engine import EngineUnusableError, SamplingParams
from actors.sync.buckets import GlooComm, flatten, param_metas, plan_buckets
from actors.sync.check import SyncCheckError, check_synced_logprobs, sync_limits
from tests.isolation import reset_distributed

pytestmark = pytest.mark.vllm
ATOL = 1e-4


def untie(src: str, dst) -> str:
    """A copy of the model at `src` whose output head is a matrix of its own (a perturbed copy of the
    embedding), for the untied paths."""
    from eopd_ray.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(src)
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    torch.manual_seed(7)
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone()
                                     + 0.05 * torch.randn_like(head.weight))
    model.save_pretrained(dst)
    load_tokenizer(src).save_pretrained(dst)
    return str(dst)


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def float64_logprobs(model: torch.nn.Module, prompts, responses) -> list[np.ndarray]:
    """log p(response_t | prompt, response_<t) in float64 over the full vocabulary, one position at a time."""
    ref = model.double()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([list(p) + list(r)])
            logp = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)
            out.append(np.array([logp[len(p) - 1 + j, int(t)].item() for j, t in enumerate(r)]))
    model.float()
    return out


@pytest.fixture(scope="module")
def paths(tiny_models, tmp_path_factory):
    _, student = tiny_models
    return {"tied": student, "untied": untie(student, tmp_path_factory.mktemp("untied") / "student")}


@pytest.fixture(scope="module")
def engines(paths):
    from actors.rollout.vllm_engine import VLLMEngine

    reset_distributed()  # an engine in this process would adopt a group another test left behind
    built = {kind: VLLMEngine(path, dtype="float32", max_model_len=128, seed=0, kv_cache_gib=0.25, cpu_ids=[0])
             for kind, path in paths.items()}
    yield built
    for engine in built.values():
        engine.shutdown()
    reset_distributed()


@pytest.fixture(scope="module")
def rows(paths, engines):
    from eopd_ray.data import synthetic_rows, tokenize_rows
    from eopd_ray.models import load_tokenizer

    recs = tokenize_rows(synthetic_rows(6, 0, "test"), load_tokenizer(paths["tied"]), 64, "synthetic")
    prompts = [np.asarray(r.prompt_ids) for r in recs]
    gen = engines["tied"].generate(prompts, SamplingParams(1.0, 1.0, 24, seed=3))
    return prompts, gen


def _scores(engine, prompts, responses):
    return engine.score_tokens(prompts, responses)


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - y).max()) for x, y in zip(a, b))


def test_generate_logprobs_match_a_float64_reference_and_seeds_reproduce(paths, engines, rows):
    from eopd_ray.models import load_causal_lm

    prompts, gen = rows
    assert all(len(r) for r in gen.response_ids) and all(np.isnan(e).all() for e in gen.entropy)
    assert all(ids.dtype == np.int32 and lp.dtype == np.float32 and lp.shape == ids.shape
               for ids, lp in zip(gen.response_ids, gen.logprobs))
    ref = float64_logprobs(load_causal_lm(paths["tied"]), prompts, gen.response_ids)
    behaviour, scored = _max_diff(gen.logprobs, ref), _max_diff(_scores(engines["tied"], prompts, gen.response_ids), ref)
    print(f"vLLM CPU float32 vs float64 reference: behaviour log-probs {behaviour:.2e}, scored {scored:.2e}")
    assert behaviour < ATOL and scored < ATOL
    again = engines["tied"].generate(prompts, SamplingParams(1.0, 1.0, 24, seed=3))
    other = engines["tied"].generate(prompts, SamplingParams(1.0, 1.0, 24, seed=4))
    assert [r.tolist() for r in again.response_ids] == [r.tolist() for r in gen.response_ids]
    assert [r.tolist() for r in other.response_ids] != [r.tolist() for r in gen.response_ids]


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_object_store_sync_and_load_model_reach_the_engine(kind, paths, engines, rows):
    from eopd_ray.models import load_causal_lm

    engine, (prompts, gen) = engines[kind], rows
    new = perturbed(load_causal_lm(paths[kind]), seed=1)
    ref = float64_logprobs(new, prompts, gen.response_ids)
    limits = sync_limits("float32")
    with pytest.raises(SyncCheckError):  # the engine does not hold these weights yet
        check_synced_logprobs(_scores(engine, prompts, gen.response_ids), ref, *limits)
    state = {n: p.detach().numpy() for n, p in new.named_parameters()}  # tied: lm_head.weight appears once
    engine.load_weights(state)
    print(f"{kind}: object-store sync {_max_diff(_scores(engine, prompts, gen.response_ids), ref):.2e}")
    check_synced_logprobs(_scores(engine, prompts, gen.response_ids), ref, *limits)
    engine.load_model(paths[kind])  # same architecture: the checkpoint's files through one session
    original = float64_logprobs(load_causal_lm(paths[kind]), prompts, gen.response_ids)
    check_synced_logprobs(_scores(engine, prompts, gen.response_ids), original, *limits)


def test_a_stale_tied_head_is_caught_by_the_float32_check(paths, engines, rows, monkeypatch):
    """The bug of the first vLLM try: the tied output head not loaded (no alias), so vLLM's own copy of it
    stays stale. The float32 check must refuse it; loading the alias fixes it."""
    from eopd_ray.models import load_causal_lm

    engine, (prompts, gen) = engines["tied"], rows
    new = perturbed(load_causal_lm(paths["tied"]), seed=2)
    ref = float64_logprobs(new, prompts, gen.response_ids)
    state = {n: p.detach().numpy() for n, p in new.named_parameters()}
    monkeypatch.setattr(engine, "aliases", {})
    engine.load_weights(state)
    stale = _max_diff(_scores(engine, prompts, gen.response_ids), ref)
    print(f"stale tied head: max |log-prob difference| {stale:.3g}")
    with pytest.raises(SyncCheckError):
        check_synced_logprobs(_scores(engine, prompts, gen.response_ids), ref, *sync_limits("float32"))
    monkeypatch.undo()
    engine.load_weights(state)
    check_synced_logprobs(_scores(engine, prompts, gen.response_ids), ref, *sync_limits("float32"))
    engine.load_model(paths["tied"])


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_bucketed_broadcast_over_gloo_reaches_the_engine(kind, paths, engines, rows):
    """The disaggregated path's receive code (the same as over NCCL) with gloo carrying the buckets; buckets
    of 8 KiB split layers across buckets, which vLLM's session must (and does) put back together."""
    from actors.runtime.dist import free_port
    from eopd_ray.models import load_causal_lm

    engine, (prompts, gen) = engines[kind], rows
    new = perturbed(load_causal_lm(paths[kind]), seed=3)
    ref = float64_logprobs(new, prompts, gen.response_ids)
    metas = param_metas(new, "float32")
    assert engine.weight_mismatches(metas) == []
    bucket_bytes = 8 << 10
    assert len(plan_buckets(metas, bucket_bytes)) > len(metas) // 2  # many buckets, layers split over them
    port, errors = free_port(), []

    def send():
        try:
            comm = GlooComm("127.0.0.1", port, 0, 2)
            params = dict(new.named_parameters())
            for idx in plan_buckets(metas, bucket_bytes):
                comm.broadcast(flatten([params[metas[i].name].detach() for i in idx], torch.float32, "cpu"), 0)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    engine.init_weight_group("127.0.0.1", port, 1, 2)
    engine.weight_sync_begin()
    engine.receive_weights(metas, bucket_bytes)
    engine.weight_sync_end()
    sender.join(timeout=60)
    assert not errors
    print(f"{kind}: broadcast sync {_max_diff(_scores(engine, prompts, gen.response_ids), ref):.2e}")
    check_synced_logprobs(_scores(engine, prompts, gen.response_ids), ref, *sync_limits("float32"))
    engine.load_model(paths[kind])


def test_names_are_checked_and_a_failed_update_leaves_the_engine_unusable(paths, engines, rows):
    from eopd_ray.models import load_causal_lm
    from actors.sync.buckets import ParamMeta

    engine, (prompts, _) = engines["untied"], rows
    model = load_causal_lm(paths["untied"])
    metas = param_metas(model, "float32")
    bad = [ParamMeta(m.name, (3, 3), m.dtype) if i == 1 else m for i, m in enumerate(metas)][:-1]
    problems = engine.weight_mismatches(bad)
    assert any(metas[1].name in p and "(3, 3)" in p for p in problems)
    assert any(metas[-1].name in p and "never sent" in p for p in problems)
    state = {n: p.detach().numpy() for n, p in model.named_parameters()}
    state[metas[-1].name] = np.zeros((3, 3), np.float32)  # fails after earlier layers were loaded
    with pytest.raises(EngineUnusableError, match="marked unusable"):
        engine.load_weights(state)
    with pytest.raises(EngineUnusableError, match="unusable"):
        engine.generate(prompts[:1], SamplingParams(1.0, 1.0, 8, seed=0))
    with pytest.raises(EngineUnusableError):
        engine.score_tokens(prompts[:1], [np.array([5, 6])])


def test_models_vllm_cannot_serve_are_refused_before_any_actor_starts(tmp_path, paths):
    from actors.rollout.vllm_engine import check_servable
    from eopd_ray.config import ConfigError
    from tests.family_models import build_family_model

    check_servable([paths["tied"], paths["untied"]], False, on_cpu=True)  # head_dim 32
    head8 = str(build_family_model(tmp_path / "qwen3", "qwen3"))  # head_dim 8
    with pytest.raises(ConfigError, match=r"head_dim=8.*rollout.engine=transformers"):
        check_servable([paths["tied"], head8], False, on_cpu=True)
