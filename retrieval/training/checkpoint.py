"""Checkpoint files that survive a crash or a full disk.

A checkpoint is written to a temporary name beside its final one, fsynced and renamed over it
(index.atomic.write_atomic): a kill or an OSError (no space left, quota) while saving leaves the
previous checkpoint as it was, and the error names the file and says it was kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from features.core import CheckpointError, DiskFullError
from features.weights import load_checkpoint
from index.atomic import write_atomic

TRAIN_SUFFIX = ".train"
"""The resumable training state of CKPT lives in CKPT.train (model, optimiser, step)."""


def train_state_path(out: Path) -> Path:
    return out.with_name(out.name + TRAIN_SUFFIX)


def save(obj: dict[str, Any], path: Path) -> Path:
    """torch.save `obj` to `path` atomically; CheckpointError (one line) when it cannot."""
    try:
        return write_atomic(Path(path), lambda tmp: torch.save(obj, tmp))
    except (OSError, DiskFullError) as exc:
        kept = "the previous one is kept" if Path(path).exists() else "nothing was written"
        full = isinstance(exc, DiskFullError)
        reason = "No space left on device" if full else (getattr(exc, "strerror", "") or str(exc))
        raise CheckpointError(
            f"cannot save checkpoint {path} ({reason}); {kept}; free space or choose another --out"
        ) from None


def load(path: Path, what: str) -> dict[str, Any]:
    """A checkpoint dict, read with weights_only=True; errors name the file."""
    obj = load_checkpoint(Path(path), what)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path} does not hold a checkpoint dict")
    return obj
