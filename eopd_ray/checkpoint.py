"""Atomic, self-describing checkpoints.

A checkpoint is a directory `step_000012/` written first as `step_000012.tmp-<pid>/` and renamed only
after every file is on disk and `MANIFEST.json` (file names and sizes) is written last. A reader trusts a
checkpoint only if its manifest exists and every listed file has the listed size, so an interrupted write
never replaces or masquerades as a good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "MANIFEST.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not belong to this run's model."""

FORMAT_VERSION = 1


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON through a temporary file in the same directory and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=float)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def begin(root: str | Path, step: int) -> Path:
    """Create and return the temporary directory a checkpoint for `step` is written into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{step_dir_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, meta: dict | None = None) -> Path:
    """Write the manifest of everything under `tmp` and rename it to its final name."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, "meta": meta or {}}
    write_json_atomic(tmp / MANIFEST, manifest)
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # a re-run of the same step: keep the old one until the new one is complete
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if p.is_dir() and "." not in p.name and is_complete(p)]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)
