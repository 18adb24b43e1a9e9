"""What an index derives from its feature store: the whitening searches apply and the vectors.

`derive` is the one place that fits the PCA whitening, decides which whitening is active (PCA,
or the learned one of `retr train whitening`, with the other kept beside it) and rebuilds the
vectors of a generation. A build's publish, `IndexWriter.set_whitening` and `retr index repair`
all call it, so the identity case, the learned-vs-PCA bookkeeping and the projection are
written once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from features.core import IndexError_
from index.faults import checkpoint
from index.manifest import FileEntry, Manifest
from index.store import FeatureStore
from index.vector_backends import VectorBackend
from index.whitening import Whitening

SaveFile = Callable[[str, Callable[[Path], object]], FileEntry]
"""(file name in the index root, writer of that path) -> its manifest entry."""


def fit_pca(raw: np.ndarray, shrinkage: float, dim: int) -> Whitening:
    """The PCA whitening of (N, D) live global descriptors; the identity of `dim` (or D) with
    fewer than two, where no covariance can be estimated."""
    if len(raw) < 2:
        return Whitening.identity(raw.shape[1] if raw.size else dim)
    return Whitening.fit(raw, shrinkage, dim=None)


def whitenings(manifest: Manifest) -> dict[str, FileEntry]:
    """The whitening files the manifest holds, by kind (the active one and the other)."""
    out: dict[str, FileEntry] = {}
    if manifest.whitening is not None:
        out[manifest.whitening_kind] = manifest.whitening
    if manifest.whitening_other is not None:
        out[_other(manifest.whitening_kind)] = manifest.whitening_other
    return out


def derive(
    root: Path,
    manifest: Manifest,
    store: FeatureStore,
    backend: VectorBackend,
    gen: int,
    save_file: SaveFile,
    *,
    shrinkage: float,
    dim: int,
    refit: bool = False,
    use: str | None = None,
    learned: Whitening | None = None,
    available: dict[str, FileEntry] | None = None,
) -> Whitening:
    """Set `manifest`'s whitening entries and rebuild its vectors as generation `gen` from
    every live image of `store`; returns the active whitening.

    refit: fit the PCA whitening on the live descriptors (a build; a repair whose PCA file is
    lost). learned: a learned whitening to store first. use: the kind that is active
    afterwards (an error when the index has none of it); None keeps the manifest's kind, or
    falls back to PCA when the learned file is gone. available: the whitening files that may be
    used (default: all the manifest names; a repair passes the sound ones).
    """
    entries = dict(whitenings(manifest) if available is None else available)
    ids = store.ids()
    raw = store.global_descriptors() if len(ids) else np.zeros((0, dim), np.float32)
    assert not (refit and learned is not None), "one new whitening file per generation"
    pca: Whitening | None = None
    if learned is not None:
        entries["learned"] = save_file(f"whitening-{gen}.npz", learned.save)
    if refit:
        pca = fit_pca(raw, shrinkage, dim)
        entries["pca"] = save_file(f"whitening-{gen}.npz", pca.save)
    kind = use or manifest.whitening_kind
    if entries.get(kind) is None:
        if use is not None:
            raise IndexError_(
                f"{root} has no {use} whitening; learn one with `retr train whitening --index "
                f"{root}`"
            )
        kind = "pca"  # a learned whitening cannot be derived again without mining
    if entries.get(kind) is None:
        raise IndexError_(f"{root} has no whitening to derive its vectors with")
    checkpoint("publish:whitening")
    active = {"learned": learned, "pca": pca}.get(kind) or Whitening.load(root / entries[kind].name)
    manifest.whitening, manifest.whitening_kind = entries[kind], kind
    manifest.whitening_other = entries.get(_other(kind))
    vectors = active.apply(raw) if len(raw) else np.zeros((0, active.dim), np.float32)
    backend.rebuild(manifest, gen, ids, vectors)
    return active


def _other(kind: str) -> str:
    return "learned" if kind == "pca" else "pca"
