"""The main job on vLLM rollout engines (vLLM's CPU build) through Ray: 2 engines for 3 steps with the
bucketed broadcast sync (gloo into vLLM's workers), checkpoints and the final evaluation (which rebuilds the
engines on the teacher); resume equals the uninterrupted run; a SIGKILLed vLLM worker is replaced; a stale
tied head stops the run with exit code 4; the HF checkpoint a run writes loads in vLLM and transformers alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_e2e_ray import final_weights, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
# One optimizer update per step (B_mini = B): the PPO ratio pi / pi_old is then exactly 1 on every token of
# every step only if the engines sampled with the student's current weights, which makes it a check of every
# sync of the run, not only of the first.
VLLM = ["rollout.engine=vllm", "rollout.num_workers=2", "rollout.kv_cache_gib=0.25", "trainer.max_steps=3",
        "trainer.mini_batch_size=8"]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("vllm") / "run"
    proc = run_job(out, tiny_models, *VLLM)
    return out, proc


def test_job_on_two_vllm_engines_trains_syncs_checkpoints_and_evaluates(vllm_run):
    out, proc = vllm_run
    results = json.loads((out / "results.json").read_text())
    rows = results["train"]["metrics"]
    assert [r["step"] for r in rows] == [1, 2, 3] and results["config"]["rollout"]["engine"] == "vllm"
    assert all(r["rollout/workers"] == 2 and np.isfinite(r["loss/total"]) for r in rows)
    # the first sync of the run was checked with the float32 limits: vLLM holds the student's weights
    assert rows[0]["sync/check_max_abs"] < 1e-4 and rows[0]["time/sync_send"] > 0
    # pi_old from vLLM equals the student's own log-probs at every step (see VLLM)
    assert all(r["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-4) for r in rows), [r["pg/ratio_mean"] for r in rows]
    for name in ("teacher", "student_initial", "student"):
        ev = results["eval"][name]
        assert ev["k"] == 2 and 0 <= ev["avg_at_k"] <= ev["pass_at_k"] <= 1
        assert ev["high_entropy_fraction"] is None  # vLLM's sampler gives no full-vocabulary entropy
    # same seeds, three models: the engines were rebuilt on the teacher and reloaded with each student
    samples = [results["eval"][name]["samples"] for name in ("teacher", "student_initial", "student")]
    assert samples[0] != samples[1] != samples[2]
    assert [c.name for c in sorted((out / "checkpoints").glob("step_*"))] == ["step_000003"]
    assert "tokens with entropy >= 1: n/a (the engine gives no entropies)" in proc.stdout
    assert not (out / "entropy_hist.png").exists() and (out / "training_curves.png").exists()


def test_resume_on_vllm_equals_the_uninterrupted_run(vllm_run, tmp_path, tiny_models):
    """vLLM's per-request seeds make its CPU sampling reproducible, so a stopped and resumed run samples the
    same tokens as the uninterrupted one and ends with the same weights."""
    full, _ = vllm_run
    part = tmp_path / "part"
    run_job(part, tiny_models, *VLLM, "eval.enabled=false", "--stop-after", "2")
    proc = run_job(part, tiny_models, *VLLM, "eval.enabled=false", "--resume", str(part))  # run_job's own args too
    assert "resuming from" in proc.stdout
    a = json.loads((full / "results.json").read_text())["train"]["metrics"]
    b = json.loads((part / "results.json").read_text())["train"]["metrics"]
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/fkl", "rollout/response_length", "rollout/tokens", "gate/fraction"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = final_weights(full), final_weights(part)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_a_killed_vllm_worker_is_replaced(tmp_path, tiny_models, monkeypatch):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"role": "rollout", "call": 2}]))
    monkeypatch.setenv("EOPD_FAULT_INJECT", str(faults))
    out = tmp_path / "killed"
    proc = run_job(out, tiny_models, *VLLM, "eval.enabled=false", "rollout.join_wait_s=300")
    assert json.loads(faults.read_text()) == []
    log = proc.stdout + proc.stderr
    assert "[elastic] 1 rollout worker(s) left" in log and "[elastic] 1 rollout worker(s) joined; 2 working" in log
    rows = json.loads((out / "results.json").read_text())["train"]["metrics"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the replacement joined with the current weights: its samples' pi_old is the student's (ratio 1)
    assert [r["rollout/workers"] for r in rows] == [2, 1, 2]
    assert all(r["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-4) for r in rows)


def test_a_stale_tied_head_stops_the_run_with_exit_code_4(tmp_path, tiny_models, monkeypatch):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"role": "stale_tied_head", "call": 1}]))  # the first sync of one engine
    monkeypatch.setenv("EOPD_FAULT_INJECT", str(faults))
    proc = run_job(tmp_path / "stale", tiny_models, *VLLM, "eval.enabled=false", check=False)
    assert json.loads(faults.read_text()) == []
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "differ after the weight sync" in proc.stderr


def test_the_runs_hf_checkpoint_loads_in_vllm_and_transformers_alike(vllm_run, tiny_models):
    from actors.rollout.engine import SamplingParams
    from actors.rollout.vllm_engine import VLLMEngine
    from eopd_ray.data import synthetic_rows, tokenize_rows
    from eopd_ray.models import load_causal_lm, load_tokenizer
    from test_vllm import float64_logprobs
    from tests.isolation import reset_distributed

    out, _ = vllm_run
    hf = str(sorted((out / "checkpoints").glob("step_*"))[-1] / "hf")
    recs = tokenize_rows(synthetic_rows(4, 5, "test"), load_tokenizer(hf), 64, "synthetic")
    prompts = [np.asarray(r.prompt_ids) for r in recs]
    reset_distributed()
    engine = VLLMEngine(hf, dtype="float32", max_model_len=128, kv_cache_gib=0.25, cpu_ids=[0])
    try:
        gen = engine.generate(prompts, SamplingParams(1.0, 1.0, 16, seed=0))
        scored = engine.score_tokens(prompts, gen.response_ids)
    finally:
        engine.shutdown()
        reset_distributed()
    ref = float64_logprobs(load_causal_lm(hf), prompts, gen.response_ids)
    _, student = tiny_models
    initial = float64_logprobs(load_causal_lm(student), prompts, gen.response_ids)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(scored, ref))
    assert diff < 1e-4 and max(float(np.abs(a - b).max()) for a, b in zip(gen.logprobs, ref)) < 1e-4
    assert max(float(np.abs(a - b).max()) for a, b in zip(initial, ref)) > 1e-3  # trained: not the initial model
