"""Hardening of the write path (issue 24): the write lock survives its file being deleted,
records no secret, segment names are published once, and a full disk is one line that loses
nothing. The whole-process versions (kill -9, a second `retr` process) are in
tests/test_crash_safety.py."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from features.core import ConfigError, IndexLockedError, IndexWriteError, mask_secrets
from index.atomic import write_atomic, write_bytes_atomic
from index.lock import LOCK_NAME, WriteLock, read_holder

SECRET_ARGV = [
    "/usr/bin/retr", "serve", "--index", "I", "--token", "tok-SECRET-1",
    "--db", "postgresql+psycopg://alice:PASSWORD-2@db.example:5432/retr", "--api-key=KEY-3",
]  # fmt: skip


def test_a_deleted_lock_file_does_not_let_a_second_writer_in(tmp_path: Path) -> None:
    first = WriteLock(tmp_path).acquire()
    try:
        (tmp_path / LOCK_NAME).unlink()  # an operator "clears a stale lock"
        with pytest.raises(IndexLockedError, match="being written"):
            WriteLock(tmp_path).acquire()
        assert not (tmp_path / LOCK_NAME).exists() or read_holder(tmp_path / LOCK_NAME) == {}
    finally:
        first.release()
    with WriteLock(tmp_path):  # released: the next writer gets it
        pass


def test_the_lock_file_and_its_message_carry_no_secret(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", SECRET_ARGV)
    monkeypatch.setenv("RETR_TOKEN", "env-SECRET-4")
    lock = WriteLock(tmp_path).acquire()
    try:
        path = tmp_path / LOCK_NAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        recorded = path.read_text()
        with pytest.raises(IndexLockedError) as err:
            WriteLock(tmp_path).acquire()
    finally:
        lock.release()
    for text in (recorded, str(err.value)):
        assert "serve --index I --token ***" in text and "alice:***@db.example" in text
        for secret in ("tok-SECRET-1", "PASSWORD-2", "KEY-3"):
            assert secret not in text


def test_an_old_lock_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text("{}")
    os.chmod(path, 0o644)
    with WriteLock(tmp_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_mask_secrets_masks_env_token_and_url_passwords(monkeypatch) -> None:
    monkeypatch.setenv("RETR_TOKEN", "abcd1234")
    assert mask_secrets("curl -H 'Authorization: Bearer abcd1234'").endswith("Bearer ***'")
    assert mask_secrets("milvus://h:19530/c http://u@h/x") == "milvus://h:19530/c http://u@h/x"
    assert mask_secrets("--token=x1 --token  y2") == "--token=*** --token  ***"


def test_an_index_path_that_is_a_file_is_one_config_error(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg")
    with pytest.raises(ConfigError, match="is a file, not an index folder"):
        WriteLock(photo).acquire()


def test_an_exclusive_name_is_never_published_twice(tmp_path: Path) -> None:
    path = tmp_path / "segments" / "seg-00000002.h5"
    write_atomic(path, lambda tmp: tmp.write_bytes(b"first writer"), exclusive=True)
    with pytest.raises(IndexWriteError, match="already exists: another writer"):
        write_atomic(path, lambda tmp: tmp.write_bytes(b"second writer"), exclusive=True)
    assert path.read_bytes() == b"first writer"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "whitening.npz"
    write_bytes_atomic(path, b"old")

    def fill(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 3_000_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(IndexWriteError) as err:
        write_atomic(path, fill)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(tmp_path) in message
    assert "MB free" in message and "needs at least 3 MB more" in message
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whitening.npz"]


def test_a_full_disk_during_a_segment_write(tmp_path: Path, monkeypatch) -> None:
    """h5py reports ENOSPC as an OSError with errno 28, like the issue's traceback."""
    from index import segments

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Can't synchronously write data")

    monkeypatch.setattr(segments.h5py, "File", no_space)
    data = segments.SegmentData.from_images([], "float16", None)
    meta = segments.SegmentMeta("g", "l", "float16", "")
    target = tmp_path / "segments" / segments.segment_name(3)
    with pytest.raises(IndexWriteError, match="no space left"):
        segments.write_segment(target, data, meta)
    assert not target.exists() and list(target.parent.iterdir()) == []


# --- a full disk in whole operations (synthetic features: no network runs) --------------------


def _synthetic_index(root: Path, segments: int = 10) -> None:
    """An index of `segments` one-image segments, published without compaction."""
    import numpy as np

    from features.types import LocalFeatures
    from index.layout import IndexConfig, IndexPaths
    from index.writer import Extracted, IndexWriter

    rng = np.random.default_rng(0)
    with IndexWriter.open(IndexPaths(root), IndexConfig()) as writer:
        writer.bind_extractors("g", "l", 8)
        for k in range(segments):
            d = rng.normal(size=(30, 16)).astype(np.float32)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            kpts = rng.uniform(0, 99, (30, 2)).astype(np.float32)
            local = LocalFeatures(kpts, np.ones(30, np.float32), d, (100, 100))
            g = rng.normal(size=8).astype(np.float32)
            writer.commit_batch([Extracted(f"{k}.jpg", f"sha{k}", None, g, local)])
        writer.publish(refit=True, compact=False)


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every later fsync of a file being published fails as a full disk does."""
    from index import atomic

    def no_space(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_file", no_space)


def _state(root: Path) -> tuple[int, list[int], list[str]]:
    from index.check import check_index
    from index.manifest import Manifest

    assert check_index(root, deep=True).ok
    m = Manifest.load(root)
    return m.generation, m.live_ids().tolist(), m.files()


@pytest.mark.parametrize("operation", ["compact", "whitening"])
def test_a_full_disk_in_compaction_or_whitening_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    from index.layout import IndexPaths
    from index.whitening import Whitening
    from index.writer import IndexWriter

    root = tmp_path / "idx"
    _synthetic_index(root)
    before = _state(root)

    def run() -> None:
        with IndexWriter.open(IndexPaths(root)) as writer:
            if operation == "compact":
                writer.compact(full=True)
            else:  # what `retr train whitening` stores
                pca = Whitening.load(root / writer.manifest.whitening.name)
                writer.set_whitening("learned", pca)

    with monkeypatch.context() as patch:
        _disk_full(patch)
        with pytest.raises(IndexWriteError) as err:
            run()
    assert len(str(err.value).splitlines()) == 1 and "no space left" in str(err.value)
    assert _state(root) == before
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # no temporary left
    run()  # space is back: the rerun completes
    generation, live, _ = _state(root)
    assert generation > before[0] and live == before[1]


def test_a_library_error_on_a_full_device_is_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    """FAISS reports a failed fwrite as a RuntimeError of its own; on a full device it is the
    same one line as ENOSPC."""
    from collections import namedtuple

    from index import atomic

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: usage(10, 10, 0))

    def faiss_like(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        raise RuntimeError("Error in faiss::FileIOWriter::operator(): fwrite failed")

    with pytest.raises(IndexWriteError, match="no space left"):
        write_atomic(tmp_path / "vectors-2.faiss", faiss_like)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="fwrite failed"):  # with space left: the real error
        write_atomic(tmp_path / "vectors-2.faiss", faiss_like)


# --- repair derives the whitening and vectors the way a build does (issue 26, point 2) --------


def _top10(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the 10 nearest vectors to 5 fixed queries (raw global descriptors of
    the index's own images, whitened with its active whitening)."""
    from index.layout import IndexPaths
    from index.snapshot import IndexSnapshot

    snap = IndexSnapshot.open(IndexPaths(root))
    raw = snap.store.global_descriptors(snap.store.ids()[:5])
    return snap.vectors.search(snap.whitening.apply(raw), 10)


@pytest.mark.parametrize("kind", ["pca", "learned"])
def test_repair_of_lost_whitening_and_vectors_gives_the_same_answers(
    tmp_path: Path, kind: str
) -> None:
    from index.layout import IndexPaths
    from index.manifest import Manifest
    from index.repair import repair_index
    from index.whitening import Whitening
    from index.writer import IndexWriter

    root = tmp_path / "idx"
    _synthetic_index(root, segments=12)
    if kind == "learned":  # a whitening of its own (here: a rotation of the PCA one)
        with IndexWriter.open(IndexPaths(root)) as writer:
            pca = Whitening.load(root / writer.manifest.whitening.name)
            q = np.linalg.qr(np.random.default_rng(1).normal(size=(pca.dim, pca.dim)))[0]
            rotated = Whitening(pca.mean, (q @ pca.projection).astype(np.float32), 0.5)
            writer.set_whitening("learned", rotated)
    pca_answers = None
    if kind == "learned":
        with IndexWriter.open(IndexPaths(root)) as writer:
            writer.set_whitening("pca")
        pca_answers = _top10(root)
        with IndexWriter.open(IndexPaths(root)) as writer:
            writer.set_whitening("learned")
    scores, ids = _top10(root)
    m = Manifest.load(root)
    assert m.whitening_kind == kind and m.vectors is not None
    (root / m.whitening.name).unlink()
    (root / m.vectors.name).unlink()
    report = repair_index(root)
    assert any("rebuilt the vectors" in a for a in report.actions), report.actions
    after_scores, after_ids = _top10(root)
    if kind == "pca":  # refitted on the same descriptors: the same answers
        assert np.array_equal(after_ids, ids)
        np.testing.assert_allclose(after_scores, scores, atol=1e-5)
    else:  # a lost learned whitening falls back to the PCA one it kept (documented)
        assert any("learned whitening was lost" in a for a in report.actions)
        assert Manifest.load(root).whitening_kind == "pca"
        assert pca_answers is not None
        assert np.array_equal(after_ids, pca_answers[1])
        np.testing.assert_allclose(after_scores, pca_answers[0], atol=1e-5)
