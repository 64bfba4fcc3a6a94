"""TensorBoard and W&B trackers (eopd_ray/tracking.py), read back from their own files and compared with
metrics.jsonl: every metric of every step, after a NaN, a fault replay, a resume and a fresh start over an
old run directory; the config and the evaluation; the exit status of a finished, failed or interrupted job;
the error naming the extra when a package is missing; and the real job with both trackers (e2e)."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from eopd_ray.run_io import MetricsLog, json_safe
from eopd_ray.run_setup import SETUP_ERRORS, resolve_config
from eopd_ray.tracking import EXIT_CODE_TAG, Trackers, TrackerError, check_trackers, exit_status, flat_eval

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


# ---- reading the trackers back from disk ---------------------------------------------------------------
def read_tensorboard(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """({tag: [(step, value), ...]} of every scalar TensorBoard's reader keeps, {tag: [(step, text), ...]} of
    every text: `config`, `status`)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(out / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()  # purge_orphaned_data=True, as in the TensorBoard app
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode())
                                                 for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"] if tag.endswith("/text_summary")}
    return scalars, texts


def tensorboard_exit(out: Path) -> tuple[list[tuple[int, float]], list[tuple[int, str]]]:
    """The exit status TensorBoard holds: the `run/exit_code` scalar's points and the `status` texts."""
    scalars, texts = read_tensorboard(out)
    return scalars.get(EXIT_CODE_TAG, []), texts.get("status", [])


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB-log style 32 KiB blocks of chunks (crc32, length, type: full / first / middle / last), each
    record a protobuf `wandb_internal_pb2.Record`. wandb 0.31 has no Python reader (wandb-core writes it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    assert struct.unpack("<4sHB", data[:header]) == (b":W&B", 0xBEE1, 0)
    pos, pending, records = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if (kind == 0 and length == 0) or pos + header + length > len(data):  # the end, or a chunk being written
            break
        chunk = data[pos + header:pos + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos, pending = pos + header + length, pending + chunk
        if kind in (1, 4):  # full, last
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished run, once its exit record (the last one) is on disk: `run.finish()` returns
    when wandb-core has handled the exit, which may be before its writer has flushed the file."""
    deadline = time.monotonic() + timeout
    while not ((records := wandb_records(path)) and records[-1].WhichOneof("record_type") == "exit"):
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout:.0f} s (run not finished?)"
        time.sleep(0.2)
    return records


def read_wandb_run(run_dir: Path) -> dict:
    """history (user keys only), config, summary (last value of each key), tags, start time and exit code
    (non-zero: the W&B app shows the run as failed) of a run dir."""
    (log,) = glob.glob(str(run_dir / "run-*.wandb"))
    run = {"history": [], "config": {}, "summary": {}, "tags": (), "start": 0.0}
    records = finished_records(Path(log))
    run["exit_code"] = records[-1].exit.exit_code
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
            run["tags"] = tuple(rec.run.tags)
            run["start"] = rec.run.start_time.seconds + rec.run.start_time.nanos / 1e9
        elif kind == "history":
            run["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item
                                   if not key(i).startswith("_")})
        elif kind == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
    run["config"].pop("_wandb", None)
    return run


def wandb_runs(out: Path) -> list[dict]:
    """Every W&B run of a run directory, oldest first; asserts `latest-run` is the newest."""
    dirs = [Path(d) for d in glob.glob(str(out / "wandb" / "*-run-*"))]
    runs = sorted((dict(read_wandb_run(d), dir=d) for d in dirs), key=lambda r: r["start"])
    assert (out / "wandb" / "latest-run").resolve() == runs[-1]["dir"].resolve()
    return runs


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def assert_tensorboard_matches(out: Path, rows: list[dict]) -> dict:
    """Every (metric, step) of metrics.jsonl once in TensorBoard, equal after float32 rounding (null: a
    non-finite value), and nothing else besides eval/* and the exit code. Returns the scalars."""
    scalars, _ = read_tensorboard(out)
    expected = {(k, r["step"]): v for r in rows for k, v in r.items() if k != "step"}
    metrics = {tag: points for tag, points in scalars.items() if not tag.startswith("eval/") and tag != EXIT_CODE_TAG}
    seen = {(tag, step): value for tag, points in metrics.items() for step, value in points}
    assert sum(len(p) for p in metrics.values()) == len(seen), "a step twice"
    assert seen.keys() == expected.keys()
    for (tag, step), value in expected.items():
        got = seen[(tag, step)]
        assert (not math.isfinite(got)) if value is None else got == np.float32(value), (tag, step, got, value)
    return scalars


def assert_wandb_matches(run: dict, rows: list[dict]) -> None:
    """The run's history is metrics.jsonl row by row, exactly (NaN / inf in W&B = null in metrics.jsonl)."""
    assert [{k: finite_or_none(v) for k, v in h.items()} for h in run["history"]] == rows


# ---- unit tier: no Ray ---------------------------------------------------------------------------------
def tracker_cfg(out: Path, trackers="tensorboard,wandb"):
    return resolve_config(None, [f"logging.trackers={trackers}", "loss.tau=inf", "logging.run_name=unit"],
                          out=str(out))


def row(step: int, salt: float) -> dict:
    return {"step": step, "loss/fkl": 0.1 * step + salt, "teacher/entropy": NAN if step == 2 else 1.0 / step,
            "time/rollout": np.float32(0.5 + salt), "data/position": np.int64(8 * step), "rollout/workers": 2,
            "sync/ok": np.bool_(True)}


def open_log(cfg, out: Path, resume_step=None) -> MetricsLog:
    log = MetricsLog(out / "metrics.jsonl", resume_step=resume_step)
    log.trackers = Trackers(cfg, out, log.rows)  # what actors/driver/prepare.py's open_run does
    return log


EVAL = {"student": {"avg_at_k": 0.5, "pass_at_k": 0.75, "k": 2, "num_problems": 6, "high_entropy_fraction": NAN,
                    "entropy_hist": [1, 2], "entropy_edges": [0.0, 1.0, 2.0], "correct": [[True, False]]},
        "student_initial": {"avg_at_k": 0.25, "pass_at_k": 0.5, "k": 2, "num_problems": 6,
                            "high_entropy_fraction": 0.125, "samples": ["a"],
                            "fidelity": {"reverse_kl": 1.5, "forward_kl": None, "teacher_nll": 2.25}}}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline


def test_fault_replay_nan_config_and_eval_reach_both_trackers(tmp_path, offline):
    cfg = tracker_cfg(tmp_path)
    log = open_log(cfg, tmp_path)
    for step in range(1, 5):
        log.append(row(step, 0.0))
    log.truncate(2)  # a fault: back to the checkpoint of step 2, steps 3.. run again with other values
    for step in range(3, 6):
        log.append(row(step, 0.5))
    log.trackers.log_eval(EVAL)
    log.trackers.close()
    log.trackers.close()  # twice is harmless (the recipe's finally may follow an earlier close)

    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[1]["teacher/entropy"] is None
    assert rows[3]["loss/fkl"] == pytest.approx(0.9)  # the replayed value, not 0.4
    scalars = assert_tensorboard_matches(tmp_path, rows)
    flat = flat_eval(EVAL)
    assert set(flat) == {f"eval/{m}/{k}" for m in EVAL for k in ("avg_at_k", "pass_at_k", "k", "num_problems",
                                                                  "high_entropy_fraction")} | {
        "eval/student_initial/fidelity/reverse_kl", "eval/student_initial/fidelity/teacher_nll"}  # None: not logged
    assert flat["eval/student_initial/fidelity/teacher_nll"] == 2.25
    for key, value in flat.items():  # TensorBoard: at the last step
        assert len(scalars[key]) == 1 and scalars[key][0][0] == 5
        got = scalars[key][0][1]
        assert (math.isnan(got) and math.isnan(value)) or got == np.float32(value), key
    _, texts = read_tensorboard(tmp_path)
    assert json.loads(texts["config"][-1][1].strip("`\n")) == json_safe(cfg.to_dict(), inf_as_string=True)
    assert tensorboard_exit(tmp_path) == ([(5, 0.0)], [(5, "finished (exit code 0)")])  # one close wrote it

    superseded, latest = wandb_runs(tmp_path)
    assert latest["dir"].name.startswith("offline-run-") and superseded["dir"].name.startswith("offline-run-")
    assert_wandb_matches(latest, rows)
    assert [h["step"] for h in superseded["history"]] == [1, 2, 3, 4] and "superseded" in superseded["tags"]
    assert "superseded" not in latest["tags"]
    assert (superseded["exit_code"], latest["exit_code"]) == (1, 0)  # ended by the fault; the job succeeded
    config = json_safe(cfg.to_dict(), inf_as_string=True)
    assert latest["config"] == config == superseded["config"] and latest["config"]["loss"]["tau"] == "inf"
    for key, value in flat.items():
        assert finite_or_none(latest["summary"][key]) == finite_or_none(value), key
    assert not any(k.startswith("eval/") for k in superseded["summary"])


def test_resume_and_fresh_start_keep_trackers_equal_to_metrics_jsonl(tmp_path, offline):
    cfg = tracker_cfg(tmp_path)
    log = open_log(cfg, tmp_path)
    for step in range(1, 6):
        log.append(row(step, 0.0))
    log.trackers.close()  # the process ends (interrupted after step 5; the checkpoint is at step 3)
    # a resumed run is a later process: its event file's name (seconds first) sorts after the first one
    time.sleep(1.1)
    log = open_log(cfg, tmp_path, resume_step=3)
    for step in range(4, 7):
        log.append(row(step, 0.25))
    log.trackers.close()
    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[4]["loss/fkl"] == pytest.approx(0.75)
    assert_tensorboard_matches(tmp_path, rows)
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and [h["step"] for h in runs[0]["history"]] == [1, 2, 3, 4, 5]
    assert_wandb_matches(runs[-1], rows)  # the resumed run holds the kept rows too

    time.sleep(1.1)
    log = open_log(cfg, tmp_path)  # a fresh start in the same directory: metrics.jsonl is rewritten
    for step in (1, 2):
        log.append(row(step, 2.0))
    log.trackers.close()
    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert_tensorboard_matches(tmp_path, rows)  # the old run's steps 1..6 are purged
    assert_wandb_matches(wandb_runs(tmp_path)[-1], rows)


def test_no_trackers_write_nothing(tmp_path):
    log = open_log(tracker_cfg(tmp_path, trackers=""), tmp_path)
    log.append(row(1, 0.0))
    log.truncate(0)
    log.trackers.log_eval(EVAL)
    log.trackers.close()
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("tracker,blocked", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_package_names_the_extra(tmp_path, monkeypatch, tracker, blocked):
    cfg = tracker_cfg(tmp_path, trackers=tracker)
    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed
    with pytest.raises(TrackerError, match=rf'pip install -e "\.\[{tracker}\]"'):
        check_trackers(cfg)
    assert issubclass(TrackerError, SETUP_ERRORS)
    with pytest.raises(TrackerError):  # opening the trackers checks too
        Trackers(cfg, tmp_path)


def test_recipe_exits_2_naming_the_extra_before_building_models(tmp_path):
    """The check runs first in `prepare`: the (absent) models are never looked at, no Ray starts. The job runs
    as users run it; a `wandb` package that fails to import, first on PYTHONPATH, stands for one not installed."""
    hidden = tmp_path / "hidden" / "wandb"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("No module named \'wandb\'")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_eopd.py"), "--out", str(tmp_path / "run"),
                           "logging.trackers=tensorboard,wandb", f"model.teacher={tmp_path / 'no-such-model'}",
                           f"model.student={tmp_path / 'no-such-model'}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2 and "error: " in proc.stderr and 'pip install -e ".[wandb]"' in proc.stderr, proc.stderr
    assert "no-such-model" not in proc.stderr and "Started a local Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_that_cannot_start_is_a_setup_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")  # rejected by wandb.init, before any network
    with pytest.raises(TrackerError, match="WANDB_MODE=no-such-mode"):
        Trackers(tracker_cfg(tmp_path), tmp_path)
    # TensorBoard, opened first, is closed with the job's setup-error status (exit 2), not left open
    assert tensorboard_exit(tmp_path) == ([(0, 2.0)], [(0, "failed (exit code 2)")])


def _job(log: MetricsLog, ending: str) -> None:
    """Two steps, then the job ends as `ending` says, closing the trackers as the recipe's `finally` does."""
    code = 0
    try:
        for step in (1, 2):
            log.append(row(step, 0.0))
        if ending == "raises":
            raise RuntimeError("a step failed")
        if ending == "interrupted":
            raise KeyboardInterrupt
        if ending == "exits 3":
            code = 3  # e.g. NonFiniteLossError: the recipe prints it and returns 3
    finally:
        log.trackers.close(code)


@pytest.mark.parametrize("ending, code", [("succeeds", 0), ("raises", 1), ("interrupted", 130), ("exits 3", 3)])
def test_failed_or_interrupted_job_shows_as_failed_with_its_exit_code(tmp_path, offline, ending, code):
    log = open_log(tracker_cfg(tmp_path), tmp_path)
    if code in (1, 130):
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            _job(log, ending)
    else:
        _job(log, ending)
    (run,) = wandb_runs(tmp_path)
    assert run["exit_code"] == code  # the W&B app shows the run as failed when it is not 0
    assert_wandb_matches(run, jsonl(tmp_path))
    status = "finished" if code == 0 else "failed"
    assert tensorboard_exit(tmp_path) == ([(2, float(code))], [(2, f"{status} (exit code {code})")])
    assert_tensorboard_matches(tmp_path, jsonl(tmp_path))


def test_exit_status_is_the_one_python_exits_with(tmp_path):
    codes = {}
    for name, body in [("ok", "pass"), ("raises", "raise RuntimeError"), ("interrupted", "raise KeyboardInterrupt"),
                       ("exit5", "raise SystemExit(5)"), ("exit_msg", "raise SystemExit('bye')"),
                       ("exit_none", "raise SystemExit")]:
        proc = subprocess.run([sys.executable, "-c", body], capture_output=True, timeout=60)
        codes[name] = proc.returncode
        try:
            exec(body)
            exc = None
        except BaseException as e:  # noqa: BLE001 (every ending is the point)
            exc = e
        assert exit_status(exc) == (130 if proc.returncode == -2 else proc.returncode), name
    assert codes["raises"] == 1 and codes["exit5"] == 5 and codes["ok"] == codes["exit_none"] == 0


# ---- e2e: the real job ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_job_logs_every_step_to_both_trackers(tmp_path, tiny_models, offline):
    from test_e2e_ray import run_job

    out = tmp_path / "run"
    run_job(out, tiny_models, "trainer.max_steps=2", "eval.enabled=false", "logging.trackers=tensorboard,wandb",
            timeout=300)
    rows = jsonl(out)
    assert [r["step"] for r in rows] == [1, 2] and len(rows[0]) > 10  # loss/*, teacher/*, time/* ...
    assert_tensorboard_matches(out, rows)
    (run,) = wandb_runs(out)
    assert run["dir"].name.startswith("offline-run-")  # WANDB_MODE unset: nothing leaves the machine
    assert_wandb_matches(run, rows)
    assert run["config"] == json.loads((out / "config.json").read_text())
    assert run["config"]["logging"]["trackers"] == "tensorboard,wandb"
    assert run["exit_code"] == 0 and tensorboard_exit(out) == ([(2, 0.0)], [(2, "finished (exit code 0)")])


@pytest.mark.e2e
def test_failed_job_shows_as_failed_with_its_exit_code(tmp_path, tiny_models, offline, monkeypatch):
    """The teacher dies in step 2 with no restart allowed: the job exits 1 (TooManyRestarts), and both trackers
    say so, holding step 1 as metrics.jsonl does."""
    from test_e2e_ray import run_job

    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"role": "teacher", "call": 2}]))
    monkeypatch.setenv("EOPD_FAULT_INJECT", str(faults))
    out = tmp_path / "run"
    proc = run_job(out, tiny_models, "trainer.max_steps=3", "trainer.max_restarts=0", "eval.enabled=false",
                   "logging.trackers=tensorboard,wandb", check=False, timeout=300)
    assert proc.returncode == 1 and "1 actor failures (trainer.max_restarts=0)" in proc.stderr, proc.stderr[-3000:]
    rows = jsonl(out)
    assert [r["step"] for r in rows] == [1]
    (run,) = wandb_runs(out)
    assert run["exit_code"] == 1
    assert_wandb_matches(run, rows)
    assert tensorboard_exit(out) == ([(1, 1.0)], [(1, "failed (exit code 1)")])
    assert_tensorboard_matches(out, rows)
