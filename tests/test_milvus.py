"""Milvus (Lite) as the vector backend of a whole index: build, add, update and remove keep the
collection, the manifest and the catalog in step; readers stay on their generation; a writer
killed at every step of a Milvus edit leaves an index that recovers to the state before or
after; bad targets and damaged collections give one line naming what and where."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from features.core import ConfigError, IndexError_
from index.check import check_index
from index.layout import IndexConfig, IndexPaths
from index.manifest import Manifest
from index.repair import repair_index
from index.snapshot import IndexSnapshot
from index.store import FeatureStore
from index.vector_backends.milvus import MilvusTarget, connect
from index.whitening import Whitening
from index.writer import IndexWriter
from retrieval.cli import app
from tests import synthetic
from tests.conftest import ROOT
from tests.corpus import MINI, TINY_OPTIONS
from tests.vector_stores import release_lite

STORE = "milvus-lite://vectors.db/retr"
"""Inside the index directory: a copied index carries its own collection."""
BASE = [f"place{k % 3}/img{k}" for k in range(8)]
QUERIES = np.random.default_rng(5).normal(size=(6, synthetic.GDIM)).astype(np.float32)


def _store(root: Path) -> str:
    return str(MilvusTarget.parse(STORE, root).uri)


def _release(root: Path) -> None:
    release_lite(f"milvus-lite://{_store(root)}/retr")


def _run(root: Path, op: str, specs: list[str]) -> None:
    """The write in this process, then the Lite file freed for other processes."""
    try:
        synthetic.run(str(root), op, specs, vector_store=STORE, index_type="FLAT")
    finally:
        _release(root)


def _state(root: Path) -> set[int]:
    """Live ids of the index after checking that it is sound and that its Milvus FLAT search
    returns exactly the brute-force answers over the stored, whitened descriptors."""
    try:
        report = check_index(root, deep=True)
        assert report.ok, report.problems
        snap = IndexSnapshot.open(IndexPaths(root))
        live = snap.manifest.live_ids()
        x = snap.whitening.apply(snap.store.global_descriptors(live))
        q = snap.whitening.apply(QUERIES)
        k = min(5, len(live))
        want = live[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]]
        assert np.array_equal(snap.vectors.search(q, k)[1], want)
        snap.close()
        return set(live.tolist())
    finally:
        _release(root)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("milvus") / "idx"
    _run(root, "build", BASE)
    return root


@pytest.fixture
def fresh(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "idx")
    return tmp_path / "idx"


def test_generations_on_one_collection(fresh: Path) -> None:
    before = _state(fresh)
    old = IndexSnapshot.open(IndexPaths(fresh))  # a reader on generation 1
    synthetic.run(str(fresh), "add", ["place0/new1", "place1/new2"])
    synthetic.run(str(fresh), "update", ["place1/img1@1"])
    assert old.changed()
    got = old.vectors.search(old.whitening.apply(QUERIES), 8)[1]
    # the old generation never sees the added images, nor the updated one's new vector
    assert set(got[got >= 0].ravel()) == before - {2}
    manifest = Manifest.load(fresh)
    assert manifest.collection is not None and manifest.collection.name == "retr_g1"
    assert manifest.vectors is None and not manifest.vector_intent and not manifest.vector_hidden
    old.close()
    _release(fresh)
    after = _state(fresh)
    assert after == before | {9, 10}
    _run(fresh, "remove", ["place0/img0", "place0/new1"])
    assert _state(fresh) == after - {1, 9}
    rebuilt = f"retr_g{Manifest.load(fresh).generation + 1}"  # named by the next generation
    _run(fresh, "build", BASE[:4])  # a rebuild: a new collection, the old one kept for readers
    manifest = Manifest.load(fresh)
    assert manifest.collection is not None and manifest.collection.name == rebuilt
    client = connect(MilvusTarget.parse(STORE, fresh))
    assert {"retr_g1", rebuilt} <= set(client.list_collections())
    assert client.list_aliases(rebuilt)["aliases"] == ["retr"]
    _release(fresh)
    _run(fresh, "add", ["place2/late"])  # the next publish drops collections two generations old
    client = connect(MilvusTarget.parse(STORE, fresh))
    assert "retr_g1" not in client.list_collections()
    _release(fresh)


# Kills during Milvus edits: (operation, specs, kill point, state the kill may leave).
EDITS = {
    "add": ["place0/new1", "place2/new2"],
    "update": ["place1/img1@1", "place2/img2@1"],
    "remove": ["place0/img0", "place1/img4"],
}
KILLS = [
    ("add", "publish:intent"),
    ("add", "publish:vectors"),
    ("add", "publish:manifest"),
    ("update", "publish:intent"),
    ("update", "publish:vectors"),
    ("update", "publish:manifest"),
    ("remove", "remove:vectors"),
    ("remove", "remove:manifest"),
    ("remove", "finish:vectors"),
    ("build", "publish:vectors"),
]
QUICK = {("add", "publish:vectors"), ("update", "publish:vectors"), ("remove", "finish:vectors")}
"""Kill points the default suite runs (one per operation, each after Milvus was written); the
others are marked slow (each kill costs a process and a Milvus Lite start, ~5 s)."""


def _killed(root: Path, op: str, specs: list[str], point: str) -> None:
    env = {**os.environ, "RETR_FAULT": point, "PYTHONPATH": str(ROOT), "RETR_OFFLINE": "1"}
    args = [sys.executable, "-m", "tests.synthetic", str(root), op, ",".join(specs)]
    args += ["--store", STORE]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize(
    ("op", "point"),
    [kill if kill in QUICK else pytest.param(*kill, marks=pytest.mark.slow) for kill in KILLS],
)
def test_a_killed_milvus_edit_recovers_before_or_after(
    base: Path, tmp_path: Path, op: str, point: str
) -> None:
    specs = EDITS.get(op, BASE[2:])
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    before = _state(reference)
    _run(reference, op, specs)
    after = _state(reference)
    idx = tmp_path / "idx"
    shutil.copytree(base, idx)
    _killed(idx, op, specs, point)
    try:
        IndexWriter.open(IndexPaths(idx)).close()  # the next writer recovers
    finally:
        _release(idx)
    assert _state(idx) in (before, after), point
    manifest = Manifest.load(idx)
    assert not manifest.vector_intent and not manifest.vector_hidden
    _run(idx, op, specs)  # the rerun completes it
    assert _state(idx) == after


def test_updated_vector_restored_after_a_kill_before_the_commit(fresh: Path) -> None:
    """A changed image's row is overwritten ahead of the commit; the next writer puts the
    published one back (checked by _state's brute force over the stored descriptors)."""
    manifest = Manifest.load(fresh)
    _killed(fresh, "update", ["place1/img1@1"], "publish:vectors")
    assert Manifest.load(fresh).vector_intent == [[2, 1]]
    notes = check_index(fresh).notes
    assert any("ahead of its commit" in n for n in notes), notes
    _release(fresh)
    IndexWriter.open(IndexPaths(fresh)).close()
    _release(fresh)
    assert Manifest.load(fresh).generation == manifest.generation
    assert _state(fresh) == set(range(1, 9))


# --- bad targets and damage ----------------------------------------------------------------------


def test_unreachable_server_and_bad_targets_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(IndexError_, match=r"^Milvus server 127\.0\.0\.1:1: connecting failed"):
        synthetic.open_writer(str(tmp_path / "a"), vector_store="milvus://127.0.0.1:1/retr")
    with pytest.raises(ConfigError, match="expected milvus://HOST:PORT/COLLECTION"):
        IndexConfig.parse({"vector_store": "milvus://u:secret@nohost/retr"})
    with pytest.raises(ConfigError, match="not a usable Milvus collection name"):
        IndexConfig.parse({"vector_store": "milvus://h:1/bad-name"})
    with pytest.raises(ConfigError, match="unknown vector store 'qdrant://h'"):
        IndexConfig.parse({"vector_store": "qdrant://h"})
    out = CliRunner().invoke(
        app,
        ["index", "build", str(tmp_path), "-i", str(tmp_path / "b"), "--vectors",
         "milvus://retr:secret@127.0.0.1:1/retr", "-q"],
    )  # fmt: skip
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert "127.0.0.1:1" in out.output and "secret" not in out.output


def test_a_foreign_collection_named_like_the_alias_is_refused(tmp_path: Path) -> None:
    value = f"milvus-lite://{tmp_path / 'v.db'}/theirs"
    client = connect(MilvusTarget.parse(value))
    try:
        client.create_collection("theirs", dimension=4)
        with pytest.raises(ConfigError, match="already has a collection named theirs"):
            synthetic.run(str(tmp_path / "idx"), "build", BASE[:2], vector_store=value)
    finally:
        release_lite(value)


def test_wrong_dimension_collection_is_named_and_repair_rebuilds(fresh: Path) -> None:
    client = connect(MilvusTarget.parse(STORE, fresh))
    client.drop_alias("retr")
    client.drop_collection("retr_g1")
    client.create_collection("retr_g1", dimension=3)  # someone else's data under our name
    with pytest.raises(IndexError_, match=r"retr_g1 on Milvus Lite file .* of 3 dims"):
        IndexSnapshot.open(IndexPaths(fresh))
    report = check_index(fresh)
    assert not report.ok and any("3 dims" in p for p in report.problems), report.problems
    _release(fresh)
    repaired = repair_index(fresh)
    assert any("rebuilt the vectors" in a for a in repaired.actions), repaired.actions
    assert not repaired.reextract  # nothing indexed was lost
    assert _state(fresh) == set(range(1, 9))


def test_lite_file_held_by_another_process(fresh: Path) -> None:
    code = (
        "import sys, time; from tests import synthetic; "
        "w = synthetic.open_writer(sys.argv[1]); print('holding', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(fresh)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(IndexError_, match="open in another process"):
            IndexSnapshot.open(IndexPaths(fresh.parent / fresh.name))
    finally:
        holder.kill()
        holder.wait()


def test_cli_build_and_query_on_milvus_lite(tmp_path: Path) -> None:
    """The real pipeline (tiny settings) with its vectors in Milvus Lite."""
    corpus = tmp_path / "corpus"
    for group in ("sacre_coeur", "tower_bridge"):
        (corpus / group).mkdir(parents=True)
        for p in sorted((MINI / "images" / group).glob("*.jpg"))[:2]:
            shutil.copy(p, corpus / group / p.name)
    idx = tmp_path / "idx"
    import json

    args = ["index", "build", str(corpus), "-i", str(idx), "-q", "--vectors", STORE,
            "--local-conf", json.dumps(TINY_OPTIONS["local_conf"]),
            "--global-conf", json.dumps(TINY_OPTIONS["global_conf"])]  # fmt: skip
    runner = CliRunner()
    try:
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.output
        query = sorted((MINI / "images/tower_bridge").glob("*.jpg"))[0]
        out = runner.invoke(app, ["query", str(query), "-i", str(idx), "--json", "--no-rerank"])
        assert out.exit_code == 0, out.output
        assert f'"tower_bridge/{query.name}"' in out.stdout
        info = runner.invoke(app, ["index", "info", "-i", str(idx), "--json"])
        assert '"collection": "retr_g1"' in info.stdout, info.stdout
    finally:
        _release(idx)
    with FeatureStore(idx, Manifest.load(idx)) as store:
        assert len(store) == 4
    manifest = Manifest.load(idx)
    assert manifest.whitening is not None
    assert Whitening.load(idx / manifest.whitening.name).dim == manifest.collection.dim  # type: ignore[union-attr]
