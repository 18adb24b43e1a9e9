"""Crash-safe file writes: a file is either absent, or complete under its final name.

Every file of an index is written to a temporary name in the same directory, flushed and
fsynced, then renamed over its final name with `os.replace` (atomic on POSIX), and the directory
is fsynced so that the rename itself survives a power cut. A crash at any point leaves either the
old file or the new one, plus at worst a `*.tmp-<pid>` file that the next writer removes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".tmp-"
"""Temporary files carry this in their name: `<name>.tmp-<pid>`."""


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def is_tmp(path: Path) -> bool:
    return TMP_MARK in path.name


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (create, rename, delete) in `path`."""
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file, then publish it as `path` (fsync + rename).
    On any error the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))
