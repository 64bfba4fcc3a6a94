"""Atomic checkpoints: a partial write is never taken for a complete one."""

import json

import pytest

from eopd_ray import checkpoint


def _write(tmp, step, payload=b"weights"):
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "state.pt").write_bytes(payload)
    (tmp / "driver_state.json").write_text(json.dumps({"step": step}))


def test_commit_then_latest(tmp_path):
    for step in (2, 4):
        tmp = checkpoint.begin(tmp_path, step)
        _write(tmp, step)
        checkpoint.commit(tmp, step)
    assert checkpoint.latest(tmp_path).name == "step_000004"
    manifest = checkpoint.read_manifest(tmp_path / "step_000004")
    assert manifest["files"]["deepspeed/state.pt"] == len(b"weights") and manifest["step"] == 4


def test_interrupted_write_is_ignored(tmp_path):
    tmp = checkpoint.begin(tmp_path, 2)
    _write(tmp, 2)
    checkpoint.commit(tmp, 2)
    tmp = checkpoint.begin(tmp_path, 4)  # a crash before commit leaves only the .tmp directory
    _write(tmp, 4)
    assert checkpoint.latest(tmp_path).name == "step_000002"


def test_truncated_file_makes_checkpoint_incomplete(tmp_path):
    tmp = checkpoint.begin(tmp_path, 3)
    _write(tmp, 3)
    final = checkpoint.commit(tmp, 3)
    (final / "deepspeed" / "state.pt").write_bytes(b"w")
    assert not checkpoint.is_complete(final)
    assert checkpoint.latest(tmp_path) is None


def test_recommit_same_step_replaces_atomically(tmp_path):
    tmp = checkpoint.begin(tmp_path, 1)
    _write(tmp, 1, b"old")
    checkpoint.commit(tmp, 1)
    tmp = checkpoint.begin(tmp_path, 1)
    _write(tmp, 1, b"newer")
    final = checkpoint.commit(tmp, 1)
    assert (final / "deepspeed" / "state.pt").read_bytes() == b"newer"
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_failed_write_aborts(tmp_path):
    tmp = checkpoint.begin(tmp_path, 5)
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("disk full")
        except RuntimeError:
            checkpoint.abort(tmp)
            raise
    assert not tmp.exists() and checkpoint.latest(tmp_path) is None
