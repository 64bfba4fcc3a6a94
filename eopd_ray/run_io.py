"""Run directory: up-front writability check, resolved config, metrics log and results."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import yaml

from eopd_ray.checkpoint import write_json_atomic
from eopd_ray.config import RunConfig


class OutputDirError(OSError):
    """The output directory cannot be used for this run."""


def check_out_dir(path: str | Path, min_free_bytes: int = 50 * 2**20) -> Path:
    """Create `path` if needed and prove it is writable and has room, before any actor starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"output directory {str(path)!r} is not writable ({exc.strerror}); "
                             "pass --out with a directory you can write to") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise OutputDirError(f"output directory {str(path)!r} has only {free / 2**20:.0f} MiB free, "
                             f"need at least {min_free_bytes / 2**20:.0f} MiB for checkpoints; free space "
                             "or pass --out on another disk")
    return path


def json_safe(obj, inf_as_string: bool = False):
    """`obj` with every NaN / +-inf float written as None (JSON null), so `json.dumps(..., allow_nan=False)`
    produces strict JSON (NaN and Infinity are not JSON; browsers, jq and most non-Python readers reject
    them). Metrics may be NaN: a vLLM rollout gives no entropy. numpy scalars and arrays become Python
    numbers and lists. inf_as_string: write +-inf as "inf" / "-inf" (config floats such as loss.tau=inf,
    which the config loader reads back from those strings) and NaN still as null."""
    if isinstance(obj, dict):
        return {k: json_safe(v, inf_as_string) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, inf_as_string) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), inf_as_string)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isfinite(value):
            return value
        if inf_as_string and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return None
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """json.dumps of `json_safe(obj)` that refuses NaN/inf (strict JSON)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _nan_for_null(row: dict) -> dict:
    """A metrics row read back from metrics.jsonl: null (a NaN or inf when written) becomes NaN again, so
    code holding rows in memory sees floats whether or not the run resumed."""
    return {k: (float("nan") if v is None else v) for k, v in row.items()}


def save_config(cfg: RunConfig, out_dir: Path) -> None:
    data = cfg.to_dict()
    (out_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    write_json_atomic(out_dir / "config.json", json_safe(data, inf_as_string=True))  # tau=inf -> "inf"


class MetricsLog:
    """One JSON line per training step in `metrics.jsonl`; on resume, lines after the restored step are
    dropped so the log matches an uninterrupted run. Lines are strict JSON: a NaN or infinite metric
    (e.g. rollout/entropy from vLLM) is written as null; `rows` keep NaN in its place."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        self.trackers = None  # eopd_ray.tracking.Trackers (set by open_run): receive every append and truncate
        if resume_step is not None and path.exists():
            self.rows = [_nan_for_null(json.loads(line)) for line in path.read_text().splitlines()]
            self.truncate(resume_step)
        elif path.exists():
            path.unlink()

    def truncate(self, step: int) -> None:
        """Drop rows after `step` (a fault replays those steps)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(dumps_strict(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)
        if self.trackers is not None:
            self.trackers.truncate(step, self.rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(dumps_strict(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)


def write_results(out_dir: Path, cfg: RunConfig, train_rows: list[dict], eval_results: dict,
                  report: list[str] | None = None) -> Path:
    """results.json as strict JSON: NaN / inf results (no entropy from vLLM) are null; config floats
    that are inf (loss.tau) are "inf", which `config_from_dict` reads back."""
    eval_results = {name: {k: v for k, v in r.items() if k not in SAMPLE_KEYS} |
                    ({"samples": r["texts"][0][:4]} if r.get("texts") else {}) for name, r in eval_results.items()}
    results = {"config": json_safe(cfg.to_dict(), inf_as_string=True),
               "train": {"steps_done": train_rows[-1]["step"] if train_rows else 0, "metrics": train_rows},
               "eval": eval_results, "report": report or []}
    results = json_safe(results)
    json.dumps(results, allow_nan=False, default=float)  # fails here, before the file is replaced, if anything slipped through
    write_json_atomic(out_dir / "results.json", results)
    return out_dir / "results.json"


# per-sample lists of an evaluation: samples.jsonl holds them, results.json only the figures
SAMPLE_KEYS = ("texts", "lengths", "response_ids")


def write_samples(out_dir: Path, eval_results: dict, prompts: list[str]) -> Path:
    """samples.jsonl: one row per decoded evaluation response (prompt, model, sample index, response, tokens),
    written whole to a temporary file and renamed."""
    path = out_dir / "samples.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for name, r in eval_results.items():
            for prompt, texts, lengths in zip(prompts, r.get("texts") or [], r.get("lengths") or []):
                for i, (text, n) in enumerate(zip(texts, lengths)):
                    fh.write(json.dumps({"model": name, "prompt": prompt, "sample": i, "response": text,
                                         "tokens": int(n)}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
