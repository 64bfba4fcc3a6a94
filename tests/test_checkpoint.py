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


def test_rollouts_generated_ahead_round_trip_through_arrow_files(tmp_path):
    import numpy as np
    import pyarrow as pa

    from eopd_ray.batch import make_rollout_table, read_rollout_files, write_rollout_files

    rng = np.random.default_rng(0)
    tables = []
    for part in range(3):  # one per rollout worker; a worker may return no rows
        n = [2, 0, 3][part]
        lens = rng.integers(1, 6, n)
        tables.append(make_rollout_table(
            np.arange(n) + 10 * part, [rng.integers(0, 50, 4) for _ in range(n)],
            [rng.integers(0, 50, t) for t in lens], [rng.standard_normal(t).astype(np.float32) for t in lens],
            [rng.random(t).astype(np.float32) for t in lens], rng.random(n) < 0.5))
    write_rollout_files(tmp_path / "ahead", tables)
    back = read_rollout_files(tmp_path / "ahead")
    assert len(back) == 3 and all(a.equals(b) for a, b in zip(tables, back))  # bit for bit, in order
    pa.ipc.new_file(pa.OSFile(str(tmp_path / "ahead" / "rollout_009.arrow"), "wb"),
                    pa.schema([("x", pa.int64())])).close()
    with pytest.raises(ValueError, match="not a rollout table"):
        read_rollout_files(tmp_path / "ahead")
