"""Incremental updates: add, remove and refresh images without a rebuild, keeping the catalog,
both feature stores and the FAISS index consistent, ids stable and the whitening fixed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from index.catalog import Catalog
from index.check import check_index
from index.layout import IndexPaths
from index.manifest import Manifest
from index.store import FeatureStore
from index.vectors import VectorIndex
from index.writer import IndexWriter
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.cli import app
from retrieval.updating import add_images, remove_images, update_images
from tests.corpus import MINI, tiny

SACRE = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))
BRIDGE = sorted((MINI / "images/tower_bridge").glob("*.jpg"))
SAN_MARCO = sorted((MINI / "images/piazza_san_marco").glob("*.jpg"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("updates")
    for group, files in (("sacre_coeur", SACRE[:2]), ("tower_bridge", BRIDGE[:2])):
        (root / "corpus" / group).mkdir(parents=True)
        for p in files:
            shutil.copy(p, root / "corpus" / group / p.name)
    build_index(root / "corpus", root / "idx", tiny())
    return root


@pytest.fixture
def fresh(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the corpus and index, the index pointing at the copied corpus."""
    shutil.copytree(built / "corpus", tmp_path / "corpus")
    shutil.copytree(built / "idx", tmp_path / "idx")
    with IndexWriter.open(IndexPaths(tmp_path / "idx")) as writer:
        writer.set_config(writer.config.model_copy(update={"corpus": str(tmp_path / "corpus")}))
    return tmp_path / "corpus", tmp_path / "idx"


def _consistent(idx: Path) -> dict[int, str]:
    """Indexed id -> path, after checking catalog, features and FAISS hold the same ids."""
    report = check_index(idx, deep=True)
    assert report.ok, report.problems
    paths = IndexPaths(idx)
    records = Catalog(paths.db_url(paths.read_config())).all()
    indexed = {r.id: r.path for r in records if r.status == "indexed"}
    assert set(Manifest.load(idx).live_ids().tolist()) == set(indexed)
    assert set(_vectors(idx).ids().tolist()) == set(indexed)
    return indexed


def _vectors(idx: Path) -> VectorIndex:
    vectors = Manifest.load(idx).vectors
    assert vectors is not None
    return VectorIndex.load(idx / vectors.name)


def _descriptor(idx: Path, image_id: int) -> np.ndarray:
    with FeatureStore(idx, Manifest.load(idx)) as store:
        return store.global_descriptors([image_id])[0]


def _top(idx: Path, image: Path) -> str:
    return Retriever.open(idx).search(image, k=1, rerank=False).matches[0].path


def test_cli_add_folder_and_outside_file(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    whitening = Manifest.load(idx).whitening
    (corpus / "piazza_san_marco").mkdir()
    for p in SAN_MARCO[:2]:
        shutil.copy(p, corpus / "piazza_san_marco" / p.name)
    outside = tmp_path / "elsewhere" / "x.jpg"
    outside.parent.mkdir()
    shutil.copy(BRIDGE[2], outside)
    runner = CliRunner()
    out = runner.invoke(app, ["index", "add", str(corpus / "piazza_san_marco"), "-i", str(idx)])
    assert out.exit_code == 0 and "2 added" in out.stdout, out.output
    out = runner.invoke(app, ["index", "add", str(outside), "-i", str(idx), "--label", "bridge"])
    assert out.exit_code == 0 and "1 added" in out.stdout, out.output

    after = _consistent(idx)
    assert set(before.items()) < set(after.items()) and len(after) == len(before) + 3
    records = Catalog(f"sqlite:///{idx / 'catalog.sqlite'}").by_path()
    assert records[f"piazza_san_marco/{SAN_MARCO[0].name}"].label == "piazza_san_marco"
    assert records[outside.as_posix()].label == "bridge"
    assert Manifest.load(idx).whitening == whitening  # refit only on build
    assert _top(idx, SAN_MARCO[1]) == f"piazza_san_marco/{SAN_MARCO[1].name}"
    again = add_images(idx, [corpus / "piazza_san_marco"])
    assert again.unchanged == 2 and not again.added and _consistent(idx) == after


def test_cli_remove_by_id_and_folder(fresh: tuple[Path, Path]) -> None:
    _, idx = fresh
    before = _consistent(idx)
    by_path = {p: i for i, p in before.items()}
    sacre = [by_path[f"sacre_coeur/{p.name}"] for p in SACRE[:2]]
    bridge0 = by_path[f"tower_bridge/{BRIDGE[0].name}"]
    runner = CliRunner()
    out = runner.invoke(
        app, ["index", "remove", str(bridge0), "sacre_coeur", "nope", "-i", str(idx)]
    )
    assert (
        out.exit_code == 0 and "3 removed" in out.stdout and "not in the index: nope" in out.stdout
    )
    after = _consistent(idx)
    assert after == {i: p for i, p in before.items() if i not in {bridge0, *sacre}}
    hits = Retriever.open(idx).search(SACRE[0], k=10, rerank=False).matches
    assert {m.path for m in hits} == set(after.values())


def test_changed_file_keeps_its_id_and_missing_file_is_dropped(fresh: tuple[Path, Path]) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    by_path = {p: i for i, p in before.items()}
    changed = f"sacre_coeur/{SACRE[0].name}"
    gone = f"tower_bridge/{BRIDGE[1].name}"
    shutil.copy(SAN_MARCO[0], corpus / changed)  # new content under the same name
    (corpus / gone).unlink()
    old = _descriptor(idx, by_path[changed])
    report = update_images(idx)
    assert report.updated == [changed] and report.removed == [by_path[gone]]
    assert report.unchanged == 2
    after = _consistent(idx)
    assert after == {i: p for i, p in before.items() if p != gone}  # same id for `changed`
    assert not np.allclose(_descriptor(idx, by_path[changed]), old)
    assert _top(idx, SAN_MARCO[0]) == changed


def test_forced_tombstones_are_hidden_then_purged_by_a_build(fresh: tuple[Path, Path]) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    victim = next(i for i, p in before.items() if p.startswith("tower_bridge/"))
    report = remove_images(idx, [victim], tombstone=True)
    assert report.removed == [victim] and report.tombstones == 1
    vectors = _vectors(idx)
    assert vectors.tombstones == 1 and len(vectors) == len(before) - 1
    _consistent(idx)  # the tombstone is not a live id
    shutil.copy(SAN_MARCO[1], corpus / "sacre_coeur" / SACRE[1].name)
    updated = update_images(idx, [corpus / "sacre_coeur" / SACRE[1].name], tombstone=True)
    assert updated.updated == [f"sacre_coeur/{SACRE[1].name}"] and updated.tombstones == 1
    retriever = Retriever.open(idx)
    hits = retriever.search(SAN_MARCO[1], k=10).matches
    assert hits[0].path == f"sacre_coeur/{SACRE[1].name}" and victim not in {m.id for m in hits}
    assert len(hits) == len(before) - 1 and retriever.snapshot().vectors.tombstones == 2
    build_index(corpus, idx)  # the open reader does not block it; the victim is re-indexed
    assert _vectors(idx).tombstones == 0
    assert len(_consistent(idx)) == len(before)
    assert retriever.snapshot().vectors.tombstones == 0  # the reader moved to the new generation


def test_index_type_switch_on_build_and_hnsw_removal_uses_tombstones(
    fresh: tuple[Path, Path],
) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    report = build_index(corpus, idx, tiny(index_type="HNSW32"))  # no extraction: FAISS only
    assert report.unchanged == len(before) and report.indexed == 0
    assert IndexPaths(idx).read_config().index_type == "HNSW32"
    victim = min(before)
    removed = remove_images(idx, [victim])  # HNSW cannot remove: the fallback, unforced
    assert removed.tombstones == 1 and _vectors(idx).tombstones == 1
    assert set(_consistent(idx)) == set(before) - {victim}
    hits = Retriever.open(idx).search(SACRE[0], k=10, rerank=False).matches
    assert victim not in {m.id for m in hits} and len(hits) == len(before) - 1


def test_add_reads_only_the_rows_it_needs(
    fresh: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An add looks up its own files' rows and its contents' hashes, never the whole catalog,
    and still finds a copy of an image indexed earlier."""
    corpus, idx = fresh
    before = _consistent(idx)

    def whole_table(self: Catalog) -> None:
        raise AssertionError("an add read the whole catalog")

    monkeypatch.setattr(Catalog, "all", whole_table)
    copy = tmp_path / "copies" / "copy.jpg"
    copy.parent.mkdir()
    shutil.copy(SACRE[0], copy)
    report = add_images(idx, [copy, corpus / "sacre_coeur" / SACRE[1].name])
    assert not report.added and report.unchanged == 1
    assert report.duplicates == [(copy.as_posix(), f"same content as sacre_coeur/{SACRE[0].name}")]
    monkeypatch.undo()
    assert _consistent(idx) == before


def test_an_add_that_ran_out_of_disk_loses_nothing_and_its_rerun_adds(
    fresh: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: after a full disk, the rerun reported its new images as "updated"."""
    import errno

    from features.core import IndexWriteError
    from index import atomic, writer

    corpus, idx = fresh
    before = _consistent(idx)
    extra = corpus / "piazza_san_marco"
    extra.mkdir()
    for p in SAN_MARCO[:2]:
        shutil.copy(p, extra / p.name)

    def full(path, data, meta):  # the segment write hits a full disk
        def fill(tmp: Path) -> None:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        return atomic.write_atomic(path, fill, exclusive=True)

    with monkeypatch.context() as patch:
        patch.setattr(writer, "write_segment", full)
        with pytest.raises(IndexWriteError, match="no space left on the device of"):
            add_images(idx, [extra])
    assert _consistent(idx) == before  # nothing published, nothing lost
    report = add_images(idx, [extra])
    assert sorted(report.added) == sorted(f"piazza_san_marco/{p.name}" for p in SAN_MARCO[:2])
    assert report.updated == []
    assert len(_consistent(idx)) == len(before) + 2


def test_a_build_that_runs_out_of_disk_loses_nothing_and_its_rerun_completes(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: a full disk during `build` was a raw OSError traceback."""
    import errno

    from features.core import DiskFullError
    from index import atomic

    calls = {"n": 0}
    real_fsync = atomic.fsync_file

    def full_after_first(path: Path) -> None:  # the batch's segment lands, then the disk is full
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(path)

    idx = tmp_path / "idx"
    with monkeypatch.context() as patch:
        patch.setattr(atomic, "fsync_file", full_after_first)
        with pytest.raises(DiskFullError, match="no space left on the device of"):
            build_index(built / "corpus", idx, tiny())
    report = build_index(built / "corpus", idx, tiny())
    assert report.indexed + report.unchanged == 4 and not report.failed
    assert len(_consistent(idx)) == 4
