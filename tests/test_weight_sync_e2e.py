"""The disaggregated weight sync (`NcclWeightSync`) through Ray on CPU: the same actors, bucket plan,
ZeRO-3 gather and group (re)building as on GPUs, with gloo carrying the buckets instead of NCCL, into the
transformers engine instead of vLLM; and the post-sync check that compares engine and student log-probs."""

from __future__ import annotations

import json
import time

import pytest
import ray

from tests.test_e2e_ray import run_job

pytestmark = pytest.mark.e2e


@pytest.fixture
def driver_actors(tiny_models):
    """The main job's actors (2 rollout workers, 2 ZeRO-3 student ranks, broadcast sync), built by the
    driver's own functions in this process, and rows the rollout sampled."""
    from actors.driver.build import init_ray
    from actors.driver.session import Session
    from eopd_ray.config import load_config
    from eopd_ray.run_setup import load_data, resolve_models

    teacher, student = tiny_models
    cfg = load_config(None, [f"model.teacher={teacher}", f"model.student={student}", "rollout.num_workers=2",
                             "trainer.num_ranks=2", "trainer.zero_stage=3", "placement.weight_sync=broadcast",
                             "placement.sync_bucket_mb=1", "trainer.batch_size=8", "trainer.mini_batch_size=8",
                             "rollout.max_new_tokens=24", "data.num_train_problems=16"])
    models, tok = resolve_models(cfg)
    sampler, _ = load_data(cfg, tok)
    init_ray()
    actors = Session.build(cfg, models)
    try:
        yield cfg, actors, sampler
    finally:
        actors.shutdown()
        ray.shutdown()


def _rows(actors, prompts):
    from actors.rollout.engine import SamplingParams
    from eopd_ray.batch import list_rows

    recs = prompts[:4]
    table, _ = ray.get(actors.rollouts.actors[0].rollout.remote(
        [r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs],
        SamplingParams(1.0, 1.0, 16, seed=1)))
    pairs = [(p, r) for p, r in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids")))
             if len(r)]
    return [p for p, _ in pairs], [r for _, r in pairs]


def test_broadcast_sync_reaches_every_engine_and_stale_engines_are_caught(driver_actors, tiny_models):
    from actors.sync.broadcast import NcclWeightSync
    from actors.sync.check import SyncCheckError

    from actors.driver.phases import iteration

    cfg, actors, sampler = driver_actors
    assert isinstance(actors.sync, NcclWeightSync)
    row = iteration(actors, 0, sampler.next_batch())  # generate, score, train (ZeRO-3), sync, check
    assert row["sync/check_max_abs"] < 1e-5 and row["time/sync_send"] > 0
    prompts, responses = _rows(actors, sampler.next_batch())

    # Engines holding the initial weights again differ from the trained student: the check must say so.
    _, student = tiny_models
    ray.get(actors.rollouts.call("load_model", student))
    with pytest.raises(SyncCheckError, match="differ after the weight sync"):
        actors.sync.verify(prompts, responses, dtype="float32")
    actors.sync.sync()  # every ZeRO-3 rank joins the gathers; rank 0 broadcasts bucket by bucket
    assert actors.sync.verify(prompts, responses, dtype="float32")["sync/check_max_abs"] < 1e-5

    # An engine leaves and a new one joins (elastic): the group is rebuilt over the new members.
    ray.kill(actors.rollouts.actors[1], no_restart=True)
    time.sleep(1.0)
    assert actors.rollouts.drop_dead() == 1
    joined = actors.rollouts.grow(2, wait_s=120.0)
    assert len(joined) == 1 and len(actors.rollouts) == 2
    with pytest.raises(SyncCheckError):  # the newcomer loaded the initial student from disk
        actors.sync.verify(prompts, responses, dtype="float32")
    actors.sync.sync()
    assert actors.sync.verify(prompts, responses, dtype="float32")["sync/check_max_abs"] < 1e-5


def test_job_with_broadcast_sync_equals_the_object_store_sync(tmp_path, tiny_models):
    """Two steps of the main job with each sync: the engines hold the same weights, so every metric agrees."""
    common = ["trainer.max_steps=2", "eval.enabled=false", "rollout.num_workers=2", "trainer.num_ranks=2",
              "trainer.zero_stage=3"]
    runs = {}
    for sync in ("object_store", "broadcast"):
        out = tmp_path / sync
        run_job(out, tiny_models, *common, f"placement.weight_sync={sync}")
        runs[sync] = json.loads((out / "results.json").read_text())["train"]["metrics"]
    assert len(runs["object_store"]) == len(runs["broadcast"]) == 2
    for a, b in zip(runs["object_store"], runs["broadcast"]):
        for key in ("loss/total", "loss/fkl", "pg/ratio_mean", "rollout/accuracy", "teacher/entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert runs["broadcast"][0]["sync/check_max_abs"] < 1e-5 and "time/sync_send" in runs["broadcast"][0]
