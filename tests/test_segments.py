"""The segmented store on synthetic features: segment files read back exactly (memory-mapped or
not, every encoding), manifests pack ids, the writer's batches, publishes, removals, compaction
and garbage collection keep one consistent view, and readers on a snapshot are never disturbed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from features.core import IndexLockedError, StoreMismatchError
from features.types import LocalFeatures
from index.catalog import Status
from index.check import check_index
from index.encoding import ProductQuantizer
from index.layout import IndexConfig, IndexPaths
from index.manifest import Manifest, pack_ids, unpack_ids
from index.segments import ImageFeatures, SegmentData, SegmentMeta, SegmentReader, write_segment
from index.snapshot import IndexSnapshot
from index.store import FeatureStore
from index.writer import MERGE_FANOUT, Extracted, IndexWriter

DIM = 32
GDIM = 16


def _local(rng: np.random.Generator, n: int) -> LocalFeatures:
    desc = rng.normal(size=(n, DIM))
    desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    return LocalFeatures(
        rng.uniform(0, 500, (n, 2)).astype(np.float32),
        np.sort(rng.uniform(0, 1, n)).astype(np.float32)[::-1].copy(),
        desc.astype(np.float32),
        (500, 400 + n),
    )


def _image(rng: np.random.Generator, i: int, n: int) -> ImageFeatures:
    g = rng.normal(size=GDIM).astype(np.float32)
    return ImageFeatures(i, f"{i:064x}", f"img/{i}.jpg", "a" if i % 2 else None, g, _local(rng, n))


def _same(a: LocalFeatures, b: LocalFeatures, exact: bool = True) -> bool:
    close = np.array_equal if exact else lambda x, y: np.allclose(x, y, atol=2e-3)
    return (
        np.array_equal(a.keypoints, b.keypoints)
        and np.array_equal(a.scores, b.scores)
        and bool(close(a.descriptors, b.descriptors))
        and a.image_size == b.image_size
    )


def test_ids_pack_into_runs() -> None:
    ids = np.array([5, 1, 2, 3, 9, 10, 4, 20])
    runs = pack_ids(ids)
    assert runs == [[1, 5], [9, 2], [20, 1]]
    assert unpack_ids(runs).tolist() == [1, 2, 3, 4, 5, 9, 10, 20]
    assert pack_ids([]) == [] and unpack_ids([]).shape == (0,)


@pytest.mark.parametrize("encoding", ["float16", "float32", "int8", "pq"])
def test_segment_round_trip_mapped_and_not(tmp_path: Path, encoding: str) -> None:
    rng = np.random.default_rng(0)
    images = [_image(rng, i, n) for i, n in zip([7, 3, 11, 12], [0, 1, 40, 300], strict=True)]
    pq = None
    if encoding == "pq":
        pq = ProductQuantizer.train(_local(rng, 2000).descriptors, 8)
    data = SegmentData.from_images(images, encoding, pq)
    assert data.ids.tolist() == [3, 7, 11, 12]  # sorted by id
    path = tmp_path / "seg-00000001.h5"
    size, sha = write_segment(path, data, SegmentMeta("g", "l", encoding))
    assert size == path.stat().st_size and len(sha) == 64
    mapped, plain = SegmentReader(path), SegmentReader(path, mapped=False)
    want = {im.id: im.local for im in images}
    for reader in (mapped, plain):
        got = reader.local(reader.rows(np.array([12, 3, 7])), pq)
        for i, f in zip([12, 3, 7], got, strict=True):
            w = want[i]
            assert np.array_equal(f.keypoints, w.keypoints) and f.image_size == w.image_size
            assert f.descriptors.shape == (len(w), DIM) and f.descriptors.dtype == np.float32
            if encoding in ("float16", "float32"):
                assert _same(f, w, exact=encoding == "float32")
            elif len(w):
                assert (f.descriptors * w.descriptors).sum(1).mean() > 0.8
    a = mapped.local(mapped.rows(np.array([11])), pq)[0]
    b = plain.local(plain.rows(np.array([11])), pq)[0]
    assert _same(a, b)  # the memory map reads exactly what HDF5 reads
    a.keypoints[0] = -1  # arrays are private copies: the file is never written through them
    assert mapped.local(mapped.rows(np.array([11])), pq)[0].keypoints[0, 0] >= 0
    back = mapped.data()
    assert back.paths[1] == "img/7.jpg" and back.labels[1] == "a" and back.labels[3] == ""
    assert back.sha256[0] == f"{3:064x}"
    mapped.close()
    plain.close()


def test_take_and_concat_keep_each_images_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first = SegmentData.from_images([_image(rng, i, 5 + i) for i in (1, 4, 6)], "float32", None)
    second = SegmentData.from_images([_image(rng, i, 3) for i in (2, 5)], "float32", None)
    merged = SegmentData.concat([first.take(np.array([0, 2])), second])
    assert merged.ids.tolist() == [1, 2, 5, 6]
    assert np.diff(merged.offsets).tolist() == [6, 3, 3, 11]
    row6 = merged.offsets[3]
    assert np.array_equal(merged.keypoints[row6 : row6 + 11], first.keypoints[first.offsets[2] :])


# --- the writer on synthetic features ------------------------------------------------------------


def _writer(root: Path, **config: object) -> IndexWriter:
    writer = IndexWriter.open(IndexPaths(root), IndexConfig.parse(dict(config)))
    writer.bind_extractors("gfp", "lfp", GDIM)
    return writer


def _extracted(rng: np.random.Generator, names: list[str]) -> list[Extracted]:
    out = []
    for name in names:
        im = _image(rng, 0, 20)
        out.append(Extracted(name, f"sha-{name}", None, im.descriptor, im.local))
    return out


def test_batches_are_invisible_until_published(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    writer = _writer(tmp_path / "idx")
    ids = writer.commit_batch(_extracted(rng, ["a", "b"]))
    assert ids == [1, 2]
    assert writer.catalog.status_counts() == {"pending": 2}
    with pytest.raises(Exception, match="no finished build yet .2 images already extracted"):
        IndexSnapshot.open(IndexPaths(tmp_path / "idx"))
    writer.commit_batch(_extracted(rng, ["c"]))
    report = writer.publish(refit=True)
    assert report.generation == 1 and report.images == 3
    assert writer.catalog.status_counts() == {"indexed": 3}
    snap = IndexSnapshot.open(IndexPaths(tmp_path / "idx"))
    assert snap.vectors.ids().tolist() == [1, 2, 3] and len(snap.store) == 3
    assert not snap.changed()
    writer.close()
    assert check_index(tmp_path / "idx", deep=True).ok


def test_one_writer_at_a_time_and_readers_keep_their_generation(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    writer = _writer(tmp_path / "idx")
    writer.commit_batch(_extracted(rng, ["a", "b", "c"]))
    writer.publish(refit=True)
    with pytest.raises(IndexLockedError, match=r"being written by pid \d+"):
        IndexWriter.open(IndexPaths(tmp_path / "idx"))
    reader = IndexSnapshot.open(IndexPaths(tmp_path / "idx"))
    before = reader.store.local_features([2])[0]
    writer.remove([2])
    writer.commit_batch(_extracted(rng, ["d"]))
    writer.publish()
    assert reader.changed()  # a new generation exists
    assert _same(reader.store.local_features([2])[0], before)  # the old one still reads
    fresh = IndexSnapshot.open(IndexPaths(tmp_path / "idx"))
    assert fresh.vectors.ids().tolist() == [1, 3, 4] and 2 not in fresh.store
    writer.close()
    IndexWriter.open(IndexPaths(tmp_path / "idx")).close()  # released: the next one gets it


def test_replaced_and_removed_ids_are_dead_and_compaction_merges_tiers(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    writer = _writer(tmp_path / "idx")
    for k in range(MERGE_FANOUT + 1):  # one small segment per batch
        writer.commit_batch(_extracted(rng, [f"f{k}"]))
    report = writer.publish(refit=True)
    assert report.merged >= MERGE_FANOUT - 1
    assert len(writer.manifest.segments) <= 2
    assert writer.manifest.live_ids().tolist() == list(range(1, MERGE_FANOUT + 2))
    # a changed file keeps its id: its new copy wins, the old one is dead
    changed = Extracted(
        "f1", "sha-new", "x", rng.normal(size=GDIM).astype(np.float32), _local(rng, 9), id=2
    )
    writer.commit_batch([changed])
    writer.publish()
    with FeatureStore(tmp_path / "idx", writer.manifest) as store:
        assert len(store.local_features([2])[0]) == 9
        assert store.sha256([2]) == {2: "sha-new"}
    writer.remove([1, 3])
    assert sorted(writer.manifest.live_ids().tolist()) == [2, *range(4, MERGE_FANOUT + 2)]
    assert writer.catalog.get([1, 3]) == {}
    # files of generations before the previous one are gone
    keep = set(writer.manifest.files()) | set(writer.manifest.previous_files)
    on_disk = {
        p.relative_to(tmp_path / "idx").as_posix()
        for p in (tmp_path / "idx").rglob("*")
        if p.is_file() and p.suffix in (".h5", ".faiss")
    }
    assert on_disk <= keep
    writer.close()
    assert check_index(tmp_path / "idx", deep=True).ok


def test_store_refuses_segments_of_other_extractors(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    writer = _writer(tmp_path / "idx")
    writer.commit_batch(_extracted(rng, ["a"]))
    writer.publish(refit=True)
    manifest = writer.manifest
    writer.close()
    with pytest.raises(StoreMismatchError, match="gfp"):
        FeatureStore(tmp_path / "idx", manifest, ("other", "lfp")).local_features([1])
    with pytest.raises(StoreMismatchError, match="not .other"):
        IndexWriter.open(IndexPaths(tmp_path / "idx")).bind_extractors("other", "lfp", GDIM)


def test_pq_store_trains_at_publish_and_recode_moves_between_encodings(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    writer = _writer(tmp_path / "idx", local_dtype="pq8")
    batch = []
    for k in range(4):
        im = _image(rng, 0, 200)
        batch.append(Extracted(f"p{k}", f"s{k}", None, im.descriptor, im.local))
    writer.commit_batch(batch)
    assert writer.manifest.pending[0].encoding == "float16"  # no quantiser yet
    writer.publish(refit=True)
    assert writer.manifest.codec is not None
    assert {s.encoding for s in writer.manifest.segments} == {"pq"}
    with FeatureStore(tmp_path / "idx", writer.manifest) as store:
        got = store.local_features([1])[0]
        cosine = (got.descriptors * batch[0].local.descriptors).sum(1)
        assert cosine.mean() > 0.8 and np.array_equal(got.keypoints, batch[0].local.keypoints)
    pq_bytes = sum(s.bytes for s in writer.manifest.segments)
    writer.recode("float32")
    assert writer.manifest.codec is None and writer.config.local_dtype == "float32"
    assert IndexPaths(tmp_path / "idx").read_config().local_dtype == "float32"
    assert sum(s.bytes for s in writer.manifest.segments) > 3 * pq_bytes
    writer.recode("int8")
    with FeatureStore(tmp_path / "idx", writer.manifest) as store:
        assert np.array_equal(store.local_features([2])[0].keypoints, batch[1].local.keypoints)
    writer.close()
    assert check_index(tmp_path / "idx", deep=True).ok


def test_catalog_statuses_follow_the_manifest(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    writer = _writer(tmp_path / "idx")
    writer.commit_batch(_extracted(rng, ["a", "b"]))
    writer.publish(refit=True)
    # a file that had features and now fails loses them at the next publish
    from index.catalog import RowChange

    writer.commit_batch([], [RowChange("a", "sha-x", None, Status.FAILED, "broken", 1)])
    assert writer.manifest.pending_dead == [[1, 1]]
    writer.publish()
    assert writer.manifest.live_ids().tolist() == [2]
    assert writer.catalog.get([1])[1].status == Status.FAILED.value
    writer.close()
    assert Manifest.load(tmp_path / "idx").vector_count == 1


def test_every_switch_raises_the_generation_and_compactions_reclaim_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: four compactions left every segment file on disk and kept the generation."""
    root = tmp_path / "idx"
    saved: list[tuple[int, str]] = []
    real_save = Manifest.save

    def recording_save(self: Manifest, where: Path) -> None:
        published = self.model_dump(
            include={"segments", "whitening", "whitening_other", "vectors", "collection", "codec"}
        )
        saved.append((self.generation, json.dumps(published, sort_keys=True)))
        real_save(self, where)

    monkeypatch.setattr(Manifest, "save", recording_save)
    rng = np.random.default_rng(6)
    first_session: set[str] = set()
    for session in range(5):
        if session == 0:
            writer = _writer(root)
        else:
            writer = IndexWriter.open(IndexPaths(root))
            writer.bind_extractors("gfp", "lfp", GDIM)
        for k in range(3):
            writer.commit_batch(_extracted(rng, [f"s{session}-{k}"]))
        writer.publish(refit=session == 0)
        writer.compact(full=True)
        writer.collect_garbage()
        if session == 0:
            first_session = {f for f in writer.manifest.files() if f.startswith("segments/")}
        writer.close()
    for (gen_a, pub_a), (gen_b, pub_b) in zip(saved, saved[1:], strict=False):
        assert gen_b >= gen_a
        if pub_b != pub_a:
            assert gen_b > gen_a, "a manifest switch kept its generation"
    m = Manifest.load(root)
    on_disk = {p.relative_to(root).as_posix() for p in (root / "segments").glob("*.h5")}
    assert on_disk <= set(m.files()) | set(m.previous_files)
    assert not on_disk & first_session  # an earlier session's segments are reclaimed
    assert len(on_disk) <= 2 + 3  # the merged one, and what the last session replaced
    assert len(m.live_ids()) == 15
    assert check_index(root, deep=True).ok
