"""Build-once directories under the model cache (tiny models, converted GGUF files, pruned students).

A build goes to a temporary sibling directory, gets its marker file last and is renamed into place; a lock file
keeps concurrent callers (several actors, two runs) from building twice. An interrupted build never looks
complete, and a directory without its marker is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

MARKER = "BUILD_COMPLETE.json"


def cache_root() -> Path:
    """`$EOPD_RAY_CACHE`, else `$XDG_CACHE_HOME/eopd_ray`, else `~/.cache/eopd_ray`."""
    return Path(os.environ.get("EOPD_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eopd_ray"))


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex), read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_digest(*parts) -> str:
    """Short sha256 of the JSON of `parts`: a cache key for a build's inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_built(path: Path) -> bool:
    return (Path(path) / MARKER).exists()


def build_once(final: Path, build: Callable[[Path], dict], what: str) -> Path:
    """`final`, built by `build(tmp_dir)` (which returns a small dict recorded in the marker) unless a complete
    build is already there."""
    final = Path(final)
    if is_built(final):
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f".{final.name}.lock")):
        if is_built(final):
            return final
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without its marker is not trusted
            shutil.rmtree(final)
        tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        print(f"[eopd_ray] building {what} into {final}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            tmp.mkdir()
            info = build(tmp) or {}
            (tmp / MARKER).write_text(json.dumps({**info, "seconds": round(time.perf_counter() - t0, 1)},
                                                 indent=2, default=str))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"[eopd_ray] {what} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return final


def build_info(path: Path) -> dict:
    """What `build` recorded in the marker of a complete build."""
    return json.loads((Path(path) / MARKER).read_text())
