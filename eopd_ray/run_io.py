"""Run directory: up-front writability check, resolved config, metrics log and results."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


def save_config(cfg: RunConfig, out_dir: Path) -> None:
    data = cfg.to_dict()
    (out_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    write_json_atomic(out_dir / "config.json", data)


class MetricsLog:
    """One JSON line per training step in `metrics.jsonl`; on resume, lines after the restored step are
    dropped so the log matches an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        if resume_step is not None and path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines()]
            self.truncate(resume_step)
        elif path.exists():
            path.unlink()

    def truncate(self, step: int) -> None:
        """Drop rows after `step` (a fault replays those steps)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def write_results(out_dir: Path, cfg: RunConfig, train_rows: list[dict], eval_results: dict,
                  report: list[str] | None = None) -> Path:
    results = {"config": cfg.to_dict(),
               "train": {"steps_done": train_rows[-1]["step"] if train_rows else 0, "metrics": train_rows},
               "eval": eval_results, "report": report or []}
    write_json_atomic(out_dir / "results.json", results)
    return out_dir / "results.json"
