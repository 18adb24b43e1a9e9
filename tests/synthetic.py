"""Synthetic features for tests of the index machinery: deterministic per (path, version), so
that a writer in a subprocess and the test reproduce the same descriptors."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from features.types import LocalFeatures
from index.layout import IndexConfig, IndexPaths
from index.writer import Extracted, IndexWriter

GDIM = 16
"""Global descriptor dimension of synthetic images."""
LDIM = 8
KEYPOINTS = 6


def image(path: str, version: int = 0) -> tuple[np.ndarray, LocalFeatures]:
    """(global descriptor (GDIM,), local features) of `path` at content version `version`."""
    rng = np.random.default_rng(zlib.crc32(f"{path}@{version}".encode()))
    desc = rng.normal(size=(KEYPOINTS, LDIM))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    local = LocalFeatures(
        rng.uniform(0, 100, (KEYPOINTS, 2)).astype(np.float32),
        np.linspace(1, 0.5, KEYPOINTS, dtype=np.float32),
        desc.astype(np.float32),
        (100, 80),
    )
    return rng.normal(size=GDIM).astype(np.float32), local


def extracted(specs: Sequence[str], known: dict[str, int]) -> list[Extracted]:
    """Extracted images of specs "path" or "path@version"; `known` path -> id keeps the id of a
    changed file."""
    out = []
    for spec in specs:
        path, _, version = spec.partition("@")
        g, local = image(path, int(version or 0))
        sha = f"{zlib.crc32(spec.encode()):08x}" * 8
        label = path.split("/")[0] if "/" in path else None
        out.append(Extracted(path, sha, label, g, local, id=known.get(path)))
    return out


def open_writer(root: str, wait: float | None = None, **config: object) -> IndexWriter:
    """A writer bound to the synthetic extractors (config: IndexConfig fields of a new index)."""
    writer = IndexWriter.open(IndexPaths(root), IndexConfig.parse(dict(config)), wait=wait)
    writer.bind_extractors("synthetic-global", "synthetic-local", GDIM)
    return writer


def run(
    root: str, op: str, specs: Sequence[str], wait: float | None = None, **config: object
) -> list[int]:
    """One write: "build" (commit then publish with a refit), "add" / "update" (commit then
    publish, whitening kept) or "remove" (specs are catalog paths). Returns the ids written."""
    with open_writer(root, wait, **config) as writer:
        known = {r.path: r.id for r in writer.catalog.all()}
        if op == "remove":
            ids = [known[p] for p in specs if p in known]
            writer.remove(ids)
            return ids
        ids = writer.commit_batch(extracted(specs, known))
        writer.publish(refit=op == "build")
        return ids


def main() -> None:
    """python -m tests.synthetic ROOT OP SPEC,SPEC... [--store S] [--db URL] [--wait S]:
    one write in its own process (crash and concurrency tests); prints the ids written."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("op")
    parser.add_argument("specs")
    parser.add_argument("--store")
    parser.add_argument("--db")
    parser.add_argument("--wait", type=float)
    args = parser.parse_args()
    config: dict[str, object] = {}
    if args.store:
        config.update(vector_store=args.store, index_type="FLAT")
    if args.db:
        config["db_url"] = args.db
    ids = run(args.root, args.op, args.specs.split(","), args.wait, **config)
    print(" ".join(map(str, ids)))


if __name__ == "__main__":
    main()
