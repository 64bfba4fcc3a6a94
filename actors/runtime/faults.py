"""Fault injection for the fault-tolerance tests: kill this worker process at a chosen call, or make one
call misbehave in a named way.

EOPD_FAULT_INJECT names a JSON file holding a list of faults such as [{"role": "rollout", "call": 2}]. The
entries of one role fire in order: a worker of that role reaching the `call`-th call (1-based, counted per
process) of the role's first remaining entry removes that entry from the file (under a file lock), so each
entry fires exactly once. `maybe_fail(role)` then kills the process with SIGKILL (roles: rollout,
rollout_eval (evaluation calls), teacher, student, student_load (a checkpoint load: the rebuild after a
fault)); `injected(role)` returns True instead and the caller
misbehaves (role stale_tied_head: a vLLM weight update leaves the tied output head out, the bug the post-sync
check must catch). Without the variable both are no-ops costing one dict lookup.

EOPD_HOLD_FILE (`hold_after`) pauses the driver between steps, so a test can change the cluster under a
running job at a known point.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

_calls: Counter = Counter()


def maybe_fail(role: str) -> None:
    if injected(role):
        os.kill(os.getpid(), signal.SIGKILL)


def injected(role: str) -> bool:
    """True when a fault of `role` fires at this call (and removes it from the file)."""
    path = os.environ.get("EOPD_FAULT_INJECT")
    if not path:
        return False
    _calls[role] += 1
    try:
        fh = open(path, "r+", encoding="utf-8")
    except OSError:
        return False
    with fh:
        # Workers of one role reach their call at the same moment: the lock makes exactly one of them fire.
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            faults = json.load(fh)
        except ValueError:
            return False
        i = next((i for i, fault in enumerate(faults) if fault.get("role") == role), None)
        if i is None or _calls[role] < int(faults[i].get("call", 1)):
            return False
        fh.seek(0)
        json.dump(faults[:i] + faults[i + 1:], fh)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())
    return True


HOLD_FILE_ENV = "EOPD_HOLD_FILE"


def hold_after(step: int) -> None:
    """For tests that change the cluster under a running job (tests/test_multinode_e2e.py takes a node away):
    when the file named by EOPD_HOLD_FILE holds the number of the step just done, say so and wait until the
    file is removed. The test then acts at a known point of the run (the step logged and checkpointed, no call
    in flight), however fast the steps are. Unset, as outside those tests: a no-op."""
    path = Path(os.environ.get(HOLD_FILE_ENV) or "")
    try:
        held = int(path.read_text().strip()) if path.name else None
    except (OSError, ValueError):
        return
    if held != step:
        return
    tqdm.write(f"[hold] after step {step}: waiting while {path} exists")
    while path.exists():
        time.sleep(0.2)
