"""Shared fixtures: very small offline-built models (seconds to build), and Ray kept on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tests and CI stay on 127.0.0.1 and need no Ray token.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def test_models_config():
    from eopd_ray.tiny_models import TinyModelSpec, TinyModelsConfig

    return TinyModelsConfig(
        # one head of 32: the smallest head size vLLM's CPU attention takes, so the vLLM tier uses this pair too
        teacher=TinyModelSpec(hidden_size=32, num_layers=2, num_heads=1, steps=40, lr=3e-3, traces="all"),
        student=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, steps=15, lr=3e-3, traces="canonical"),
        batch_size=32)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_models(tiny_cache):
    """(teacher_dir, student_dir) of a deliberately undertrained pair: fast to build, same tokenizer."""
    from eopd_ray.tiny_models import ensure_tiny_models

    teacher, student = ensure_tiny_models(cache_dir=tiny_cache, cfg=test_models_config(), progress=False)
    return str(teacher), str(student)


def pytest_addoption(parser):
    parser.addoption("--e2e", action="store_true", default=False,
                     help="also run the end-to-end tier (Ray, DeepSpeed, tiny models; a few minutes)")


def _vllm_missing() -> str:
    """Why the vLLM tier cannot run here ('' when it can)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (CPU machines: see docs/vllm.md)"
    return ""


def pytest_collection_modifyitems(config, items):
    e2e = config.getoption("--e2e")
    missing = _vllm_missing() if any("vllm" in item.keywords for item in items) else ""
    if missing and e2e and os.environ.get("EOPD_REQUIRE_VLLM") == "1":
        # CI installs vLLM: a tier that silently skipped there would prove nothing
        raise pytest.UsageError(f"EOPD_REQUIRE_VLLM=1 but {missing}")
    skip_e2e = pytest.mark.skip(reason="end-to-end tier: run with `pytest --e2e` (CI does)")
    skip_vllm = pytest.mark.skip(reason=f"vLLM tier: {missing}")
    for item in items:
        if not e2e and ("e2e" in item.keywords or "vllm" in item.keywords):
            item.add_marker(skip_e2e)
        elif missing and "vllm" in item.keywords and "gpu" not in item.keywords:
            item.add_marker(skip_vllm)
