"""The index's write lock: one writer at a time, readers never take it.

An exclusive `fcntl.flock` on the index directory itself, and one on `<index>/write.lock`. The
kernel drops both when the holder dies, however it dies, so a lock left by a killed process is
taken over by the next writer without any cleanup (the stale holder's details in the file are
simply overwritten). The directory's lock is what excludes a second writer: an operator who
deletes `write.lock` while a writer holds it ("clearing a stale lock") cannot let a second one
in, because the directory cannot be unlinked under the holder. The file's lock is kept for
writers of older retr versions, which lock only the file. The file's content (pid, host, start
time, command with its secrets masked; mode 0600) only feeds the message a second writer gets.
Written by hand
rather than with the `filelock` package because that package does not record who holds the lock,
which is what the message needs. POSIX only, like the rest of the write path; on network file
systems without working flock, run one writer at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from features.core import ConfigError, IndexLockedError, mask_secrets

LOCK_NAME = "write.lock"


class WriteLock:
    """Hold with `with WriteLock(root, wait):`. wait: seconds to wait for the lock (None: fail at
    once, math.inf: forever)."""

    def __init__(self, root: Path, wait: float | None = None) -> None:
        self.path = Path(root) / LOCK_NAME
        self.wait = wait
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> WriteLock:
        root = self.path.parent
        if root.exists() and not root.is_dir():
            raise ConfigError(f"index {root} is a file, not an index folder; pass a folder path")
        root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + (self.wait or 0.0)
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._take(dir_fd, deadline)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            self._take(fd, deadline)
            os.fchmod(fd, 0o600)  # a lock file made by an older version was 0644
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        except BaseException:
            os.close(fd)
            os.close(dir_fd)
            raise
        self._fd, self._dir_fd = fd, dir_fd
        return self

    def _take(self, fd: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexLockedError(self._held_message()) from None
                time.sleep(0.2)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
            os.close(self._dir_fd)
            self._dir_fd = None

    def _held_message(self) -> str:
        holder = read_holder(self.path)
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
            f"({mask_secrets(str(holder.get('command')))})"
            if holder
            else "another process"
        )
        return (
            f"index {self.path.parent} is being written by {who}; wait for it to finish, or pass "
            "--wait SECONDS to wait for the lock"
        )

    def __enter__(self) -> WriteLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> dict[str, Any]:
    """What the current holder wrote into the lock file ({} when unknown)."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": mask_secrets(
            " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        )[:200],
    }
