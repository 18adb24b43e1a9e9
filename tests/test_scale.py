"""What lets the feature store grow to a million images (figures in docs/scaling.md, from
scripts/bench_scale.py): opening a store reads no segment file, a shortlist read opens and reads
each segment it touches once, compaction keeps the segment count bounded as batches keep
coming, and several query processes read one index directory while it is written."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import index.store
import index.writer
from index.check import check_index
from index.layout import IndexPaths
from index.manifest import Manifest
from index.snapshot import IndexSnapshot
from index.store import FeatureStore
from index.writer import MERGE_FANOUT
from tests import synthetic
from tests.conftest import ROOT


class CountingReader(index.store.SegmentReader):
    """SegmentReader that counts opens and row reads per segment file."""

    opened: list[str] = []
    reads: list[str] = []

    def __init__(self, path: Path, mapped: bool = True) -> None:
        CountingReader.opened.append(path.name)
        super().__init__(path, mapped)

    def local(self, rows, pq):  # type: ignore[no-untyped-def]
        CountingReader.reads.append(self.path.name)
        return super().local(rows, pq)


def _many_segments(root: Path, batches: int, per_batch: int = 3) -> None:
    with synthetic.open_writer(str(root), index_type="Flat") as writer:
        for b in range(batches):
            specs = [f"g{b % 7}/{b}-{k}" for k in range(per_batch)]
            writer.commit_batch(synthetic.extracted(specs, {}))
        writer.publish(refit=True, compact=False)


def test_open_reads_no_segment_and_a_shortlist_touches_each_segment_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _many_segments(tmp_path / "idx", batches=40)
    monkeypatch.setattr(index.store, "SegmentReader", CountingReader)
    CountingReader.opened, CountingReader.reads = [], []
    manifest = Manifest.load(tmp_path / "idx")
    assert len(manifest.segments) == 40
    store = FeatureStore(tmp_path / "idx", manifest)
    assert CountingReader.opened == []  # opening costs the manifest only
    ids = np.random.default_rng(0).choice(store.ids(), 60, replace=False)
    feats = store.local_features(ids)
    touched = {manifest.segments[k].name for k in store.segments_of(ids)}
    assert len(feats) == 60
    assert sorted(CountingReader.opened) == sorted(touched)  # each once
    assert sorted(CountingReader.reads) == sorted(touched)  # one row read per segment
    for f, i in zip(feats, ids, strict=True):  # and in the order asked
        path = _record(tmp_path / "idx", int(i)).path
        assert np.array_equal(f.keypoints, synthetic.image(path)[1].keypoints)
    store.local_features(ids)  # a second read reuses the open segments
    assert len(CountingReader.opened) == len(touched)
    store.close()


def _record(root: Path, image_id: int):  # type: ignore[no-untyped-def]
    from index.catalog import Catalog

    catalog = Catalog(f"sqlite:///{root / 'catalog.sqlite'}")
    try:
        return catalog.get([image_id])[image_id]
    finally:
        catalog.dispose()


def test_compaction_keeps_the_segment_count_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments hold at most MAX images; at most 2N/MAX are at least half full and each size
    tier below that keeps fewer than MERGE_FANOUT, however many small batches came."""
    cap = 32
    monkeypatch.setattr(index.writer, "MAX_SEGMENT_IMAGES", cap)
    tiers = math.ceil(math.log(cap / 2, MERGE_FANOUT)) + 1
    with synthetic.open_writer(str(tmp_path / "idx"), index_type="Flat") as writer:
        images = 0
        for round_ in range(25):  # an add of a few images at a time, each published
            for b in range(3):
                specs = [f"g/{round_}-{b}-{k}" for k in range(1 + (round_ + b) % 4)]
                images += len(specs)
                writer.commit_batch(synthetic.extracted(specs, {}))
            writer.publish(refit=round_ == 0)
            sizes = [len(s.live_ids()) for s in writer.manifest.segments]
            assert max(sizes) <= cap
            assert len(sizes) <= 2 * images / cap + (MERGE_FANOUT - 1) * tiers, sizes
        assert sum(sizes) == images and images > 3 * cap
    assert check_index(tmp_path / "idx", deep=True).ok


READER = """
import os, sys, time
import numpy as np
from features.core import IndexError_
from index.layout import IndexPaths
from index.snapshot import IndexSnapshot
root, stop = sys.argv[1], sys.argv[2]
paths = IndexPaths(root)
snap = IndexSnapshot.open(paths)
reads, retries, deadline = 0, 0, time.monotonic() + 60
while time.monotonic() < deadline:
    if snap.changed():
        snap = IndexSnapshot.open(paths)
    ids = snap.store.ids()
    pick = np.random.default_rng(reads).choice(ids, min(20, len(ids)), replace=False)
    try:
        feats = snap.store.local_features(pick)
        raw = snap.store.global_descriptors(pick)
    except IndexError_:  # two commits since this snapshot: move on, as Retriever.search does
        snap, retries = IndexSnapshot.open(paths), retries + 1
        continue
    assert len(feats) == len(pick)
    _, got = snap.vectors.search(snap.whitening.apply(raw), 3)
    assert set(got[:, 0]) <= set(ids.tolist())
    reads += 1
    if reads >= 5 and os.path.exists(stop):
        break
print(retries, reads)
"""


def test_several_query_processes_read_while_one_writes(tmp_path: Path) -> None:
    """The index directory as shared storage: reader processes on snapshots never fail while a
    writer adds, removes and compacts (index.snapshot; NFS caveats in docs/scaling.md)."""
    root = tmp_path / "idx"
    _many_segments(root, batches=12)
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(root), str(stop)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    time.sleep(3)
    with synthetic.open_writer(str(root)) as writer:
        for k in range(6):
            writer.commit_batch(synthetic.extracted([f"new/{k}-{j}" for j in range(4)], {}))
            writer.publish()
            writer.remove(writer.manifest.live_ids()[:2].tolist())
        writer.compact(full=True)
    stop.write_text("")
    for proc in readers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert int(out.split()[-1]) >= 5
    assert check_index(root, deep=True).ok
    assert len(IndexSnapshot.open(IndexPaths(root)).store) == 12 * 3 + 24 - 12
