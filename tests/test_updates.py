"""Incremental updates: add, remove and refresh images without a rebuild, keeping the catalog,
both feature stores and the FAISS index consistent, ids stable and the whitening fixed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from index.catalog import Catalog
from index.layout import IndexPaths
from index.store import FeatureStore
from index.vectors import VectorIndex
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.cli import app
from retrieval.updating import add_images, remove_images, update_images
from tests.corpus import MINI

TINY_OPTIONS = {
    "local_conf": {"resize_max": 256, "max_keypoints": 128},
    "global_conf": {"resize_max": 256, "scales": [1.0]},
}
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
    build_index(root / "corpus", root / "idx", TINY_OPTIONS)
    return root


@pytest.fixture
def fresh(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the corpus and index, the index pointing at the copied corpus."""
    shutil.copytree(built / "corpus", tmp_path / "corpus")
    shutil.copytree(built / "idx", tmp_path / "idx")
    paths = IndexPaths(tmp_path / "idx")
    config = paths.read_config().model_copy(update={"corpus": str(tmp_path / "corpus")})
    paths.write_config(config)
    return tmp_path / "corpus", tmp_path / "idx"


def _consistent(idx: Path) -> dict[int, str]:
    """Indexed id -> path, after checking catalog, both stores and FAISS hold the same ids."""
    paths = IndexPaths(idx)
    records = Catalog(paths.db_url(paths.read_config())).all()
    indexed = {r.id: r.path for r in records if r.status == "indexed"}
    with FeatureStore.open_existing(paths.global_store, "global", readonly=True) as g:
        assert set(g.ids()) == set(indexed)
    with FeatureStore.open_existing(paths.local_store, "local", readonly=True) as loc:
        assert set(loc.ids()) == set(indexed)
    assert set(VectorIndex.load(paths.vectors).ids().tolist()) == set(indexed)
    return indexed


def _top(idx: Path, image: Path) -> str:
    return Retriever.open(idx).search(image, k=1, rerank=False)[0].path


def test_cli_add_folder_and_outside_file(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    whitening = (idx / "whitening.npz").read_bytes()
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
    assert (idx / "whitening.npz").read_bytes() == whitening  # refit only on build
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
    hits = Retriever.open(idx).search(SACRE[0], k=10, rerank=False)
    assert {m.path for m in hits} == set(after.values())


def test_changed_file_keeps_its_id_and_missing_file_is_dropped(fresh: tuple[Path, Path]) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    by_path = {p: i for i, p in before.items()}
    changed = f"sacre_coeur/{SACRE[0].name}"
    gone = f"tower_bridge/{BRIDGE[1].name}"
    shutil.copy(SAN_MARCO[0], corpus / changed)  # new content under the same name
    (corpus / gone).unlink()
    with FeatureStore.open_existing(idx / "global.h5", "global", readonly=True) as g:
        old = g.get(by_path[changed])["descriptor"]
    report = update_images(idx)
    assert report.updated == [changed] and report.removed == [by_path[gone]]
    assert report.unchanged == 2
    after = _consistent(idx)
    assert after == {i: p for i, p in before.items() if p != gone}  # same id for `changed`
    with FeatureStore.open_existing(idx / "global.h5", "global", readonly=True) as g:
        assert not np.allclose(g.get(by_path[changed])["descriptor"], old)
    assert _top(idx, SAN_MARCO[0]) == changed


def test_forced_tombstones_are_hidden_then_purged_by_a_build(fresh: tuple[Path, Path]) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    victim = next(i for i, p in before.items() if p.startswith("tower_bridge/"))
    report = remove_images(idx, [victim], tombstone=True)
    assert report.removed == [victim] and report.tombstones == 1
    vectors = VectorIndex.load(idx / "vectors.faiss")
    assert vectors.tombstones == 1 and len(vectors) == len(before) - 1
    _consistent(idx)  # the tombstone is not a live id
    shutil.copy(SAN_MARCO[1], corpus / "sacre_coeur" / SACRE[1].name)
    updated = update_images(idx, [corpus / "sacre_coeur" / SACRE[1].name], tombstone=True)
    assert updated.updated == [f"sacre_coeur/{SACRE[1].name}"] and updated.tombstones == 1
    retriever = Retriever.open(idx)
    hits = retriever.search(SAN_MARCO[1], k=10)
    assert hits[0].path == f"sacre_coeur/{SACRE[1].name}" and victim not in {m.id for m in hits}
    assert len(hits) == len(before) - 1 and retriever.vectors.tombstones == 2
    retriever.local_store.close()  # HDF5 allows no writer while a reader holds the file
    build_index(corpus, idx)  # the victim's file is back in the corpus: re-indexed
    assert VectorIndex.load(idx / "vectors.faiss").tombstones == 0
    assert len(_consistent(idx)) == len(before)


def test_index_type_switch_on_build_and_hnsw_removal_uses_tombstones(
    fresh: tuple[Path, Path],
) -> None:
    corpus, idx = fresh
    before = _consistent(idx)
    report = build_index(corpus, idx, {"index_type": "HNSW32"})  # no extraction: FAISS only
    assert report.unchanged == len(before) and report.indexed == 0
    assert IndexPaths(idx).read_config().index_type == "HNSW32"
    victim = min(before)
    removed = remove_images(idx, [victim])  # HNSW cannot remove: the fallback, unforced
    assert removed.tombstones == 1 and VectorIndex.load(idx / "vectors.faiss").tombstones == 1
    assert set(_consistent(idx)) == set(before) - {victim}
    hits = Retriever.open(idx).search(SACRE[0], k=10, rerank=False)
    assert victim not in {m.id for m in hits} and len(hits) == len(before) - 1
