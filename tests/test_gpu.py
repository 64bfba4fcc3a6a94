"""GPU tier: the DeepSpeed student, the teacher scorer, the weight broadcast and the vLLM engine on CUDA.

Every GPU test carries `pytest.mark.gpu` and skips with its reason where CUDA (or a second GPU, or vLLM,
or DeepSpeed) is missing. The first tests check the Ray-free weight-sync primitives on the CPU, so the
bucket arithmetic is covered in CI too.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from actors.sync.buckets import MIB, ParamMeta, flatten, plan_buckets, unflatten
from actors.sync.check import check_synced_logprobs, teacher_forced_logprobs
from tests.isolation import reset_distributed

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU tier: torch.cuda.is_available() is False here")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "the two-process NCCL broadcast needs 2 GPUs: NCCL refuses two ranks on one GPU"))
needs_vllm = pytest.mark.skipif(not HAS_CUDA or importlib.util.find_spec("vllm") is None,
                                reason="vLLM engine tests need CUDA and vLLM (pip install -e '.[gpu]')")
needs_deepspeed = pytest.mark.skipif(not HAS_CUDA or importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed on the GPU (student, ZeRO-3 teacher) needs CUDA and DeepSpeed")
K = 16


# ---- CPU: the primitives ------------------------------------------------------------------------------


def test_buckets_cover_every_parameter_once_within_the_budget():
    metas = [ParamMeta(f"p{i}", (n,), dt) for i, (n, dt) in
             enumerate([(100, "bfloat16"), (300, "bfloat16"), (50, "float32"), (1000, "bfloat16"), (10, "bfloat16")])]
    plan = plan_buckets(metas, bucket_bytes=800)
    assert sorted(i for b in plan for i in b) == list(range(len(metas)))
    for bucket in plan:
        assert len({metas[i].dtype for i in bucket}) == 1  # one flat tensor per bucket needs one dtype
        assert len(bucket) == 1 or sum(metas[i].nbytes for i in bucket) <= 800
    assert plan == [[0, 1], [2], [3], [4]]  # 2,000 B of p3 alone; dtype change starts a bucket


def test_flatten_then_unflatten_is_bit_exact():
    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen), "c": torch.randn(2, 2, 2, generator=gen)}
    metas = [ParamMeta(n, tuple(t.shape), "float32") for n, t in state.items()]
    flat = flatten(list(state.values()), torch.float32, "cpu")
    assert flat.shape == (15 + 7 + 8,)
    for name, t in unflatten(flat, metas):
        assert torch.equal(t, state[name])


def test_sync_check_accepts_bf16_noise_and_rejects_other_weights(tiny_models):
    from eopd_ray.models import load_causal_lm, load_tokenizer

    teacher_dir, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    prompt, response = tok("3+4+5=")["input_ids"], tok("3+4=7;7+5=12;#12")["input_ids"]
    fp32 = load_causal_lm(student_dir).eval()
    ref = teacher_forced_logprobs(fp32, prompt, response, len(tok))
    bf16 = teacher_forced_logprobs(load_causal_lm(student_dir, "bfloat16").eval(), prompt, response, len(tok))
    stats = check_synced_logprobs([bf16], [ref])
    assert stats["max_abs"] > 0  # bf16 really differs, and is accepted
    other = teacher_forced_logprobs(load_causal_lm(teacher_dir).eval(), prompt, response, len(tok))
    with pytest.raises(AssertionError, match="differ after the weight sync"):
        check_synced_logprobs([other], [ref])


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rollout_table(tiny_models):
    from actors.rollout.worker import RolloutWorker
    from actors.rollout.engine import SamplingParams
    from eopd_ray.data import synthetic_rows, tokenize_rows
    from eopd_ray.models import load_tokenizer

    _, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    recs = tokenize_rows(synthetic_rows(16, 5, "train"), tok, 64, "synthetic")
    worker = RolloutWorker(student_dir, vocab_size=len(tok))
    table, _ = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs],
                              SamplingParams(1.0, 1.0, 24, seed=3))
    return table, tok


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-4), ("bfloat16", None)])
def test_teacher_scorer_on_gpu_matches_float64_cpu_reference(tiny_models, rollout_table, dtype, atol):
    from actors.teacher.scorer import TeacherScorer
    from eopd_ray.batch import list_rows
    from eopd_ray.models import load_causal_lm

    teacher_dir, _ = tiny_models
    table, tok = rollout_table
    scorer = TeacherScorer(teacher_dir, top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id, chunk_size=5,
                           dtype=dtype)
    assert next(scorer.model.parameters()).is_cuda
    scored, stats = scorer.score(table)
    n_tok = sum(len(r) for r in list_rows(table.column("response_ids")))
    print(f"\nteacher scorer, {dtype}, on {torch.cuda.get_device_name(0)}: {n_tok} positions in "
          f"{stats['time/teacher']:.3f} s (tiny model, first call)")
    ref_model = load_causal_lm(teacher_dir).to(torch.float64).eval()
    diffs, ent_diffs = [], []
    for p, r, lp, ent, ids_k, tlp_k in zip(*(list_rows(table.column(c)) for c in ("prompt_ids", "response_ids")),
                                           *(list_rows(scored.column(c)) for c in (
                                               "teacher_logprobs", "teacher_entropy", "topk_ids", "topk_logprobs"))):
        ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = ref_model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(r) - 1, :len(tok)]
        logp = torch.log_softmax(logits, -1)
        ref_lp = logp.gather(-1, torch.as_tensor(r, dtype=torch.long)[:, None])[:, 0].numpy()
        ref_ent = -(logp.exp() * logp).sum(-1).numpy()
        assert lp.dtype == np.float32 and ent.dtype == np.float32
        ids_k, tlp_k = ids_k.reshape(-1, K), tlp_k.reshape(-1, K)
        # the top-k log-probs are the reference's at the returned ids, and the k largest in descending order
        at_ids = logp.gather(-1, torch.as_tensor(ids_k, dtype=torch.long)).numpy()
        ref_top = torch.sort(logp, dim=-1, descending=True).values[:, :K].numpy()
        if atol is not None:
            np.testing.assert_allclose(lp, ref_lp, atol=atol)
            np.testing.assert_allclose(ent, ref_ent, atol=atol)
            np.testing.assert_allclose(tlp_k, at_ids, atol=atol)
            np.testing.assert_allclose(tlp_k, ref_top, atol=atol)
        diffs.append(np.abs(lp - ref_lp))
        ent_diffs.append(np.abs(ent - ref_ent))
    if atol is None:  # bf16 weights and activations: close on average, far from a wrong model
        assert float(np.concatenate(diffs).mean()) < 0.05
        assert float(np.concatenate(ent_diffs).mean()) < 0.05


def _gpu_trainer(student_dir, tok, zero_stage: int, dtype: str, lr: float = 1e-3):
    from actors.runtime.dist import free_port
    from actors.student.trainer import StudentTrainer
    from eopd_ray.config import load_config

    cfg = load_config(None, ["trainer.batch_size=16", "trainer.mini_batch_size=16", "trainer.max_steps=3",
                             f"trainer.lr={lr}", f"trainer.zero_stage={zero_stage}"])
    tr = StudentTrainer(student_dir, cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                        pad_id=tok.pad_token_id, dtype=dtype, backend="nccl")
    tr.setup("127.0.0.1", free_port())
    return tr, cfg


@pytest.mark.gpu
@needs_deepspeed
def test_student_trainer_step_on_gpu(tiny_models, rollout_table):
    """One DeepSpeed step on the GPU: fp32 ZeRO-0 equals the float32 CPU loss; bf16 ZeRO-3 trains."""
    from actors.teacher.scorer import TeacherScorer
    from eopd_ray.batch import list_rows, padded_float, padded_topk, sequence_batch
    from eopd_ray.losses import TokenStats, eopd_loss
    from eopd_ray.models import load_causal_lm

    teacher_dir, student_dir = tiny_models
    table, tok = rollout_table
    scored, _ = TeacherScorer(teacher_dir, top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id).score(table)
    tr, cfg = _gpu_trainer(student_dir, tok, 0, "float32")
    assert next(tr.engine.module.parameters()).is_cuda
    batch = sequence_batch(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids")),
                           tok.pad_token_id)
    t_max = batch.response_BT.shape[1]
    teacher = TokenStats(padded_float(list_rows(scored.column("teacher_logprobs")), t_max),
                         padded_float(list_rows(scored.column("teacher_entropy")), t_max),
                         padded_topk(list_rows(scored.column("topk_logprobs")), t_max, K, 0.0),
                         padded_topk(list_rows(scored.column("topk_ids")), t_max, K, 0))
    model = load_causal_lm(student_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    logits = logits.gather(1, batch.logit_index_BT[..., None].expand(-1, -1, logits.shape[-1]))[..., :len(tok)]
    ref, _ = eopd_loss(logits, batch.response_BT, padded_float(list_rows(table.column("logprobs")), t_max), teacher,
                       batch.response_mask_BT, cfg.loss)
    metrics = tr.train_step(0, 1, table, scored)
    assert metrics["loss/total"] == pytest.approx(float(ref), rel=1e-3, abs=1e-5)
    reset_distributed()

    tr3, _ = _gpu_trainer(student_dir, tok, 3, "bfloat16")
    import deepspeed

    params = list(tr3.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        before = [p.detach().float().clone() for p in params]
    m3 = tr3.train_step(0, 1, table, scored)
    assert np.isfinite(m3["loss/total"])
    with deepspeed.zero.GatheredParameters(params):
        assert any(not torch.equal(b, p.detach().float()) for b, p in zip(before, params))
    reset_distributed()


@pytest.mark.gpu
@needs_deepspeed
def test_zero3_buckets_hold_the_full_weights(tiny_models):
    """Under ZeRO-3 each parameter is partitioned; the sender's buckets must hold the gathered full tensors."""
    from actors.sync.buckets import iter_student_buckets, param_metas
    from eopd_ray.models import load_causal_lm, load_tokenizer

    _, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    tr, _ = _gpu_trainer(student_dir, tok, 3, "bfloat16")
    metas = param_metas(tr.engine.module, "bfloat16")
    assert all(m.numel > 0 for m in metas)  # ds_shape, not the empty local shape
    reference = dict(load_causal_lm(student_dir).named_parameters())
    seen = 0
    for bucket, flat in iter_student_buckets(tr.engine.module, metas, 4096, 3, 0, torch.device("cuda")):
        for name, t in unflatten(flat, bucket):
            assert torch.equal(t.cpu(), reference[name].detach().to(torch.bfloat16)), name
            seen += 1
    assert seen == len(reference)
    reset_distributed()


@pytest.mark.gpu
@needs_deepspeed
@pytest.mark.parametrize("world, offload", [
    (1, "none"), (1, "cpu"),
    pytest.param(2, "none", marks=needs_two_gpus),  # partitioned over NCCL, unequal shares in step
])
def test_zero3_teacher_on_gpus_equals_the_whole_teacher(tmp_path, world, offload):
    """The ZeRO-3 teacher's CUDA path (NCCL group, partitions on the GPUs or in pinned host memory) against
    the whole-model teacher on one GPU."""
    import pyarrow as pa

    from actors.teacher.scorer import TeacherScorer
    from eopd_ray.models import load_tokenizer
    from tests.family_models import build_family_model
    from tests.test_families import _table
    from tests.test_teacher_zero3 import assert_tables_close, run_group
    from tests.zero3_worker import CHUNK, K as ZK, MAX_BATCH

    model_dir = str(build_family_model(tmp_path / "qwen3", "qwen3", extra_rows=5, seed=3))
    tok = load_tokenizer(model_dir)
    tables = [_table(tok, n_rows=5, seed=1), _table(tok, n_rows=3, seed=2)]
    shares = [tables] if world == 1 else [tables[:1], tables[1:]]
    metas = run_group(model_dir, shares, offload, tmp_path, backend="nccl")
    whole = TeacherScorer(model_dir, top_k=ZK, vocab_size=len(tok), pad_id=tok.pad_token_id, chunk_size=CHUNK,
                          max_batch=MAX_BATCH)
    for rank, (meta, share) in enumerate(zip(metas, shares)):
        assert meta["device"] == "cuda:0"
        # partitions on the GPU, or offloaded to pinned host pages (asynchronous copies)
        assert meta["partitions"] == ({"devices": ["cuda"], "pinned": False} if offload == "none" else
                                      {"devices": ["cpu"], "pinned": True}), meta["partitions"]
        if world > 1:
            assert meta["local"] <= 0.55 * meta["total"], meta
        for j, table in enumerate(share):
            got = pa.ipc.open_file(str(tmp_path / f"out_{rank}_{j}.arrow")).read_all()
            assert_tables_close(got, whole.score(table)[0], atol=2e-4)
    print(f"\nZeRO-3 teacher, {world} rank(s), offload={offload}, on {torch.cuda.get_device_name(0)}: "
          f"{metas[0]['stats'][0]['time/teacher_shards']:.3f} s for rank 0's share (tiny model)")


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_buckets_reach_another_process_on_the_same_gpu():
    from actors.sync.selftest import run_ipc_roundtrip

    res = run_ipc_roundtrip(total_mb=64, bucket_mb=16)
    assert res["equal"] and res["buckets"] >= 4
    print(f"\nCUDA IPC: {res['bytes'] / MIB:.0f} MiB in {res['buckets']} buckets, {res['seconds']:.3f} s "
          f"on {torch.cuda.get_device_name(0)}")


def test_two_process_bucketed_broadcast_over_gloo_is_bit_exact():
    """The same bucket plan, flatten and receive_buckets as the NCCL broadcast, between two CPU processes."""
    from actors.sync.selftest import run_two_process_broadcast

    res = run_two_process_broadcast(total_mb=24, bucket_mb=4, backend="gloo")
    assert res["equal"] and res["buckets"] >= 4 and res["bytes"] >= 24 * MIB


@pytest.mark.gpu
@needs_two_gpus
def test_two_process_nccl_broadcast_is_bit_exact():
    from actors.sync.selftest import run_two_process_broadcast

    res = run_two_process_broadcast(total_mb=256, bucket_mb=64)
    assert res["equal"] and res["buckets"] >= 4
    print(f"\nNCCL broadcast: {res['bytes'] / MIB:.0f} MiB in {res['seconds']:.3f} s ({res['gbps']:.1f} GB/s) "
          f"on {torch.cuda.get_device_name(0)}")


# ---- vLLM ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> str:
    """A tiny random Qwen3 over the project tokenizer with head_dim 64: vLLM's FlashAttention kernels take
    only some head sizes (multiples of 32 in older releases), and the tiny models' 12 and 16 may be refused."""
    from tests.family_models import build_family_model

    return str(build_family_model(tmp_path_factory.mktemp("vllm") / "qwen3", "qwen3", hidden_size=128,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, init_std=0.05))


@pytest.fixture(scope="module")
def vllm_engine(vllm_model):
    from actors.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(vllm_model, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=256)
    yield engine
    engine.shutdown()


@pytest.mark.gpu
@needs_vllm
def test_vllm_generate_returns_arrays_and_reference_logprobs(vllm_model, vllm_engine):
    from actors.rollout.engine import SamplingParams
    from eopd_ray.models import load_causal_lm, load_tokenizer

    student_dir = vllm_model
    tok = load_tokenizer(student_dir)
    prompts = [np.array(tok(f"{a}+{b}+3=")["input_ids"]) for a, b in [(1, 2), (4, 5), (7, 8), (2, 9)]]
    gen = vllm_engine.generate(prompts, SamplingParams(1.0, 1.0, 24, seed=1))
    again = vllm_engine.generate(prompts, SamplingParams(1.0, 1.0, 24, seed=1))
    assert [r.tolist() for r in gen.response_ids] == [r.tolist() for r in again.response_ids]  # seeded
    for ids, lp, ent in zip(gen.response_ids, gen.logprobs, gen.entropy):
        assert ids.dtype == np.int32 and lp.dtype == np.float32 and lp.shape == ids.shape
        assert np.isnan(ent).all()  # vLLM gives no full-vocabulary entropy
    model = load_causal_lm(student_dir).cuda().eval()
    ref = [teacher_forced_logprobs(model, p.tolist(), r.tolist()) for p, r in zip(prompts, gen.response_ids)]
    check_synced_logprobs(gen.logprobs, ref)


@pytest.mark.gpu
@needs_vllm
def test_vllm_logprobs_follow_weights_loaded_over_cuda_ipc(vllm_model, vllm_engine):
    """The colocated sync path into a real engine: new weights through IPC buckets, then the engine's
    teacher-forced log-probs equal those of a transformers model holding the same weights."""
    from actors.sync.buckets import device_uuid, ipc_handle, param_metas
    from eopd_ray.models import load_causal_lm, load_tokenizer

    student_dir = vllm_model
    tok = load_tokenizer(student_dir)
    model = load_causal_lm(student_dir).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a different policy, same architecture
    prompts = [tok("3+4+5=")["input_ids"], tok("9+1+6+2=")["input_ids"]]
    responses = [tok("3+4=7;7+5=12;#12")["input_ids"], tok("9+1=10;10+6=16;16+2=18;#18")["input_ids"]]
    ref = [teacher_forced_logprobs(model, p, r, len(tok)) for p, r in zip(prompts, responses)]
    before = vllm_engine.score_tokens(prompts, responses)
    with pytest.raises(AssertionError):
        check_synced_logprobs(before, ref)  # the engine does not hold these weights yet
    metas = param_metas(model, "bfloat16")
    tensors = dict(model.named_parameters())
    vllm_engine.weight_sync_begin()  # one weight-update session for all buckets, as IpcWeightSync does
    for idx in plan_buckets(metas, 4 * MIB):
        bucket = [metas[i] for i in idx]
        flat = flatten([tensors[m.name].detach() for m in bucket], torch.bfloat16, "cuda")
        torch.cuda.synchronize()
        vllm_engine.receive_ipc_bucket(bucket, {device_uuid(): ipc_handle(flat)})
    vllm_engine.weight_sync_end()
    check_synced_logprobs(vllm_engine.score_tokens(prompts, responses), ref)
