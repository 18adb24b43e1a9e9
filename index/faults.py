"""Named crash points, for testing that an index survives `kill -9` anywhere.

Writers call `checkpoint("name")` between the steps of an operation. Normally it does nothing.
With `RETR_FAULT=name` (or `name:N` for its N-th passage, counted from 1) in the environment,
reaching it either kills the process with SIGKILL (`RETR_FAULT_ACTION=kill`, the default), exactly
as `kill -9` would, or (`RETR_FAULT_ACTION=pause`) writes the file `RETR_FAULT_READY` and sleeps
until something else kills the process. Kill points are therefore exact, never timed.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

_passages: Counter[str] = Counter()


def checkpoint(name: str) -> None:
    """Mark the point `name` of a write; see the module docstring."""
    wanted = os.environ.get("RETR_FAULT")
    if not wanted:
        return
    target, _, nth = wanted.rpartition(":")
    if not nth.isdigit():
        target, nth = wanted, "1"
    if target != name:
        return
    _passages[name] += 1
    if _passages[name] != int(nth):
        return
    if os.environ.get("RETR_FAULT_ACTION", "kill") == "pause":
        ready = os.environ.get("RETR_FAULT_READY")
        if ready:
            Path(ready).write_text(str(os.getpid()))
        while True:
            time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)
