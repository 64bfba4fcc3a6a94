"""The post-sync check against stale engines at a realistic learning rate, in bf16.

One DeepSpeed bf16 step at lr 3e-6 (the paper's) moves the tiny student's log-probs far below the bf16 limits
(max 0.3, mean 0.05 nats), so an engine that kept the previous weights passes them; only the movement since
the reference (both sides' log-probs before the step, `actors/sync/check.py`) tells it apart. The worker
classes run in this process without Ray; the last test runs the driver's step through Ray.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray

from actors.rollout.engine import SamplingParams
from actors.rollout.hf_engine import TransformersEngine
from actors.rollout.worker import RolloutWorker
from actors.runtime.dist import free_port
from actors.student.trainer import StudentTrainer
from actors.sync.broadcast import StudentWeightSender
from actors.sync.check import (MAX_UNFOLLOWED, SYNC_MAX_ABS, SYNC_MEAN_ABS, SyncCheckError, check_synced_logprobs,
                               sync_limits)
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows
from eopd_ray.config import load_config
from eopd_ray.data import synthetic_rows, tokenize_rows
from eopd_ray.models import load_tokenizer
from tests.isolation import reset_distributed

LIMITS = sync_limits("bfloat16")


class Student(StudentTrainer, StudentWeightSender):
    """The student rank as its Ray shell composes it (actors/student/actor.py), without Ray."""


@pytest.fixture(scope="module")
def one_step(tiny_models):
    """One bf16 optimizer step at lr 3e-6 (ZeRO-1, no warm-up): 4 sampled rows, the student's log-probs of
    them before and after, and its weights before and after (as the object-store sync exports them)."""
    teacher_dir, student_dir = tiny_models
    tok = load_tokenizer(student_dir)
    recs = tokenize_rows(synthetic_rows(16, 3, "train"), tok, 64, "synthetic")
    worker = RolloutWorker(student_dir, dtype="bfloat16", vocab_size=len(tok), num_threads=2)
    table, _ = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs],
                              SamplingParams(1.0, 1.0, 24, seed=11))
    cfg = load_config(None, ["trainer.batch_size=16", "trainer.mini_batch_size=16", "trainer.max_steps=100",
                             "trainer.lr=3e-6", "trainer.zero_stage=1"])
    reset_distributed()
    student = Student(student_dir, cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=len(tok),
                      pad_id=tok.pad_token_id, dtype="bfloat16")
    student.setup("127.0.0.1", free_port())
    scored, _ = TeacherScorer(teacher_dir, top_k=16, vocab_size=len(tok), pad_id=tok.pad_token_id).score(table)
    prompts, responses = list_rows(table.column("prompt_ids"))[:4], list_rows(table.column("response_ids"))[:4]
    before, weights_before = student.sync_check_logprobs(prompts, responses), student.export_weights()
    student.train_step(0, 1, table, scored)
    out = dict(path=student_dir, vocab=len(tok), prompts=prompts, responses=responses, before=before,
               after=student.sync_check_logprobs(prompts, responses), weights_before=weights_before,
               weights=student.export_weights())
    reset_distributed()  # a vLLM engine or trainer built later in this process starts afresh
    return out


def _moved(s) -> tuple[float, float]:
    d = np.abs(np.concatenate(s["after"]).astype(np.float64) - np.concatenate(s["before"]))
    return float(d.max()), float(d.mean())


def test_a_stale_bf16_engine_is_caught_after_one_step_at_lr_3e_6(one_step):
    s = one_step
    engine = TransformersEngine(s["path"], "bfloat16", vocab_size=s["vocab"])  # the initial weights: the reference
    reference = engine.score_tokens(s["prompts"], s["responses"])
    moved_max, moved_mean = _moved(s)
    print(f"one bf16 step at lr 3e-6 moved the student's log-probs by max {moved_max:.2e}, mean {moved_mean:.2e} "
          f"nats (limits {SYNC_MAX_ABS}, {SYNC_MEAN_ABS})")
    assert 0 < moved_max < SYNC_MAX_ABS / 10 and moved_mean < SYNC_MEAN_ABS / 10
    check_synced_logprobs(reference, s["after"], *LIMITS)  # the limits alone pass the engine that received nothing
    with pytest.raises(SyncCheckError, match="did not change at all"):
        check_synced_logprobs(reference, s["after"], *LIMITS, engine_before=reference, student_before=s["before"])
    engine.load_weights(s["weights"])
    stats = check_synced_logprobs(engine.score_tokens(s["prompts"], s["responses"]), s["after"], *LIMITS,
                                  engine_before=reference, student_before=s["before"])
    print(f"synced: {stats}")
    assert stats["conclusive"] and stats["unfollowed"] < MAX_UNFOLLOWED


def test_an_engine_left_with_previous_tensors_of_one_layer_is_caught(one_step):
    """A sync that moved the engine, but left layer 0's attention with its previous values."""
    s = one_step
    engine = TransformersEngine(s["path"], "bfloat16", vocab_size=s["vocab"])
    reference = engine.score_tokens(s["prompts"], s["responses"])
    engine.load_weights({n: s["weights_before"][n] if "layers.0.self_attn" in n else w for n, w in s["weights"].items()})
    partial = engine.score_tokens(s["prompts"], s["responses"])
    assert any(np.any(a != b) for a, b in zip(partial, reference))  # it did move, just not with the student
    check_synced_logprobs(partial, s["after"], *LIMITS)  # within the limits
    with pytest.raises(SyncCheckError, match="did not move with the student"):
        check_synced_logprobs(partial, s["after"], *LIMITS, engine_before=reference, student_before=s["before"])


@pytest.mark.vllm
def test_a_stale_bf16_vllm_engine_is_caught_and_a_synced_one_is_inconclusive(one_step):
    """vLLM bf16 against the transformers student: kernels differ, and one step at lr 3e-6 moves the student's
    log-probs by less than the gap between the two, so a sound sync cannot yet be told from a partial one:
    reported inconclusive, not passed. An engine that received nothing is caught: its log-probs did not change
    at all."""
    from actors.rollout.vllm_engine import VLLMEngine

    s = one_step
    engine = VLLMEngine(s["path"], dtype="bfloat16", max_model_len=128, seed=0, kv_cache_gib=0.25, cpu_ids=[0])
    try:
        reference = engine.score_tokens(s["prompts"], s["responses"])
        with pytest.raises(SyncCheckError, match="did not change at all"):
            check_synced_logprobs(engine.score_tokens(s["prompts"], s["responses"]), s["after"], *LIMITS,
                                  engine_before=reference, student_before=s["before"])
        engine.load_weights(s["weights"])
        stats = check_synced_logprobs(engine.score_tokens(s["prompts"], s["responses"]), s["after"], *LIMITS,
                                      engine_before=reference, student_before=s["before"])
        print(f"vLLM bf16 synced: {stats}")
        assert not stats["conclusive"] and stats["moved"] < stats["noise"]
    finally:
        engine.shutdown()
        reset_distributed()


@pytest.mark.e2e
def test_the_driver_step_stops_on_a_sync_that_sends_nothing_at_lr_3e_6(tiny_models):
    """The driver's own step through Ray (bf16, lr 3e-6, object-store sync): the reference is taken before
    the update and the check after the sync; a sync that sends nothing stops it at that step."""
    from actors.driver.build import init_ray
    from actors.driver.phases import iteration
    from actors.driver.session import Session
    from eopd_ray.run_setup import load_data, resolve_models

    teacher, student = tiny_models
    cfg = load_config(None, [f"model.teacher={teacher}", f"model.student={student}", "model.dtype=bfloat16",
                             "trainer.zero_stage=1", "trainer.lr=3e-6", "trainer.max_steps=100",
                             "placement.weight_sync=object_store", "trainer.batch_size=8",
                             "trainer.mini_batch_size=8", "rollout.max_new_tokens=24", "data.num_train_problems=16"])
    models, tok = resolve_models(cfg)
    sampler, _ = load_data(cfg, tok)
    init_ray()
    session = Session.build(cfg, models)
    try:
        row = iteration(session, 0, sampler.next_batch())
        print({k: v for k, v in row.items() if k.startswith("sync/check")})
        assert row["sync/check_max_abs"] < SYNC_MAX_ABS / 10 and row["sync/check_conclusive"] == 1.0
        assert session.sync_checked and session.sync.reference is None
        session.sync_checked = False  # as after a rebuild: check the next sync, which sends nothing
        session.sync.sync = lambda: {}
        with pytest.raises(SyncCheckError, match="did not change at all"):
            iteration(session, 1, sampler.next_batch())
    finally:
        session.shutdown()
        ray.shutdown()
