"""Fault injection for the fault-tolerance tests: kill this worker process at a chosen call.

EOPD_FAULT_INJECT names a JSON file holding a list of faults such as [{"role": "rollout", "call": 2}]. The
entries of one role fire in order: a worker of that role reaching the `call`-th call (1-based, counted per
process) of the role's first remaining entry removes that entry from the file and kills itself with
SIGKILL, so each entry fires exactly once. Without the variable this is a
no-op costing one dict lookup.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

_calls: Counter = Counter()


def maybe_fail(role: str) -> None:
    path = os.environ.get("EOPD_FAULT_INJECT")
    if not path:
        return
    _calls[role] += 1
    try:
        with open(path, encoding="utf-8") as fh:
            faults = json.load(fh)
    except (OSError, ValueError):
        return
    i = next((i for i, fault in enumerate(faults) if fault.get("role") == role), None)
    if i is not None and _calls[role] >= int(faults[i].get("call", 1)):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(faults[:i] + faults[i + 1:], fh)
        os.replace(tmp, path)
        os.kill(os.getpid(), signal.SIGKILL)
