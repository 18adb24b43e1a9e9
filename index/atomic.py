"""Crash-safe file writes: a file is either absent, or complete under its final name.

Every file of an index is written to a temporary name in the same directory, flushed and
fsynced, then renamed over its final name with `os.replace` (atomic on POSIX), and the directory
is fsynced so that the rename itself survives a power cut. A crash at any point leaves either the
old file or the new one, plus at worst a `*.tmp-<pid>` file that the next writer removes.

A file published `exclusive` (segments: their names are never reused) is linked into place
instead, which fails if the name exists: two writers can never publish the same name over each
other. A full disk (or quota) during a write is one IndexWriteError naming the folder and the
space needed; the temporary file is removed and what was published before is intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from features.core import DiskFullError, IndexWriteError

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


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: Path, write: Callable[[Path], object], exclusive: bool = False) -> Path:
    """Call `write(tmp)` to fill a temporary file, then publish it as `path` (fsync + rename;
    `exclusive`: link, failing if `path` exists). On any error the temporary file is removed
    and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    written = 0
    try:
        write(tmp)
        written = tmp.stat().st_size
        fsync_file(tmp)
        if exclusive:
            os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            written = written or tmp.stat().st_size
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, FileExistsError) and exclusive:
            raise IndexWriteError(
                f"{path} already exists: another writer published it; run retr index check "
                f"--index {path.parent.parent}"
            ) from None
        if out_of_space(exc, path.parent):
            raise DiskFullError(disk_full_message(path.parent, written)) from None
        raise
    fsync_dir(path.parent)
    return path


def out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or a library that reports it
    in its own words (FAISS raises a RuntimeError naming the failed fwrite) on a device with
    less than 1 MB left."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    if "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def disk_full_message(folder: Path, written: int = 0) -> str:
    """One line for a write that ran out of space in `folder`: how much is free and about how
    much more the write needed (what it had written when it failed, at least 1 MB)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    need = max(written, 1 << 20)
    return (
        f"no space left on the device of {folder} ({free / 2**20:.0f} MB free; this write "
        f"needs at least {need / 2**20:.0f} MB more): free some space and rerun the command; "
        "what was written before is intact"
    )


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))
