"""The catalog on SQLite and on a real PostgreSQL server (tests/postgres.py): the catalog's own
operations, a whole build / add / update / remove / query cycle, and what PostgreSQL changes:
writers in separate processes, two indexes on one database, a server lost mid-build, bad
credentials."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.core import IndexError_
from index.catalog import LOOKUP_BATCH, Catalog, RowChange, Status
from index.check import check_index
from index.info import index_info
from index.layout import IndexPaths
from index.repair import repair_index
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.cli import app
from retrieval.updating import add_images, remove_images, update_images
from tests import synthetic
from tests.conftest import ROOT
from tests.corpus import MINI, tiny

SACRE = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))
BRIDGE = sorted((MINI / "images/tower_bridge").glob("*.jpg"))


def _url(catalog_url: str | None, tmp_path: Path) -> str:
    return catalog_url or f"sqlite:///{tmp_path / 'catalog.sqlite'}"


def _row(path: str, status: Status = Status.PENDING, id: int | None = None) -> RowChange:
    return RowChange(path, f"sha-{path}", "a", status, None, id, (640, 480))


# --- the catalog itself --------------------------------------------------------------------------


def test_catalog_rows_counts_and_lookups(catalog_url: str | None, tmp_path: Path) -> None:
    url = _url(catalog_url, tmp_path)
    with pytest.raises(IndexError_, match="no `images` table|is missing"):
        Catalog(url)  # only a build creates a catalog
    catalog = Catalog(url, create=True)
    n = 2 * LOOKUP_BATCH + 7
    ids = catalog.upsert([_row(f"p{k}") for k in range(n)])
    assert ids == list(range(1, n + 1))
    # an update keeps the id and the size when none is given; a new row mixed in gets the next id
    again = catalog.upsert(
        [RowChange("p3", "sha-new", "b", Status.INDEXED, None, 4), _row("q", Status.FAILED)]
    )
    assert again == [4, n + 1]
    got = catalog.get([4, 1, n + 1, 10**6])
    assert set(got) == {1, 4, n + 1}  # batched lookups across LOOKUP_BATCH, unknown ids left out
    assert (got[4].sha256, got[4].label, got[4].width) == ("sha-new", "b", 640)
    assert catalog.status_counts() == {"pending": n - 1, "indexed": 1, "failed": 1}
    assert catalog.pending_hashes()[5] == "sha-p4" and 4 not in catalog.pending_hashes()
    assert [r.id for r in catalog.find_by_hash("sha-new", [Status.INDEXED])] == [4]
    catalog.set_status(range(1, n + 1), Status.INDEXED)
    assert catalog.status_counts() == {"indexed": n, "failed": 1}
    catalog.remove([n + 1, n])
    assert catalog.upsert([_row("r")]) == [n + 2]  # ids are never reused
    assert catalog.count() == n
    catalog.dispose()


def test_explicit_ids_move_the_sequence(catalog_url: str | None, tmp_path: Path) -> None:
    """A repair inserts rows with their ids; the next new row must not collide with them."""
    catalog = Catalog(_url(catalog_url, tmp_path), create=True)
    catalog.upsert([_row("a")])
    catalog.upsert([_row("restored", id=50)])  # an id given that no row has: inserted as such
    assert catalog.upsert([_row("b")]) == [51]
    assert sorted(catalog.get([1, 50, 51])) == [1, 50, 51]
    catalog.dispose()


def test_a_catalog_belongs_to_one_index(catalog_url: str | None, tmp_path: Path) -> None:
    url = _url(catalog_url, tmp_path)
    synthetic.run(str(tmp_path / "one"), "build", ["a/x", "a/y"], db_url=url)
    with pytest.raises(IndexError_, match="belongs to another index") as err:
        synthetic.run(str(tmp_path / "two"), "build", ["b/z"], db_url=url)
    assert "\n" not in str(err.value) and "retr-test" not in str(err.value)
    assert check_index(tmp_path / "one", deep=True).ok  # the first index is untouched
    assert Catalog(url).status_counts() == {"indexed": 2}


# --- the whole cycle on both databases ----------------------------------------------------------


@pytest.mark.parametrize(
    "catalog_url",
    [pytest.param("sqlite", marks=pytest.mark.slow), "postgresql"],  # SQLite: test_updates.py
    indirect=True,
)
def test_build_add_update_remove_query(catalog_url: str | None, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for group, files in (("sacre_coeur", SACRE[:2]), ("tower_bridge", BRIDGE[:2])):
        (corpus / group).mkdir(parents=True)
        for p in files:
            shutil.copy(p, corpus / group / p.name)
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    idx = tmp_path / "idx"
    report = build_index(corpus, idx, tiny(db_url=catalog_url) if catalog_url else tiny())
    assert report.indexed == 4 and [f for f, _ in report.failed] == ["broken.jpg"]
    assert not (idx / "catalog.sqlite").exists() if catalog_url else True
    shutil.copy(SACRE[2], corpus / "sacre_coeur" / SACRE[2].name)
    assert add_images(idx, [corpus / "sacre_coeur" / SACRE[2].name]).added
    shutil.copy(BRIDGE[2], corpus / "tower_bridge" / BRIDGE[0].name)  # new content, same name
    assert update_images(idx).updated == [f"tower_bridge/{BRIDGE[0].name}"]
    removed = remove_images(idx, [f"sacre_coeur/{SACRE[0].name}"]).removed
    assert len(removed) == 1
    assert check_index(idx, deep=True).ok
    info = index_info(idx)
    assert info["images"] == {"indexed": 4, "failed": 1} and info["vectors"] == 4
    retriever = Retriever.open(idx)
    hits = retriever.search(BRIDGE[2], k=2, rerank=False).matches
    assert hits[0].path == f"tower_bridge/{BRIDGE[0].name}" and hits[0].label == "tower_bridge"
    assert removed[0] not in {m.id for m in retriever.search(SACRE[0], k=5).matches}


# --- what PostgreSQL changes --------------------------------------------------------------------


def _writer_process(root: Path, specs: list[str], db: str | None) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.synthetic", str(root), "add", ",".join(specs)]
    args += ["--wait", "120"] + (["--db", db] if db else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_two_processes_adding_at_once(postgres, tmp_path: Path) -> None:
    """Two writer processes on one index take turns (the index's write lock) and share one id
    sequence: no id or path collides."""
    url = postgres.create_database()
    idx = tmp_path / "idx"
    synthetic.run(str(idx), "build", ["base/a"], db_url=url)
    first = [f"one/{k}" for k in range(20)]
    second = [f"two/{k}" for k in range(20)]
    procs = [_writer_process(idx, first, None), _writer_process(idx, second, None)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [int(i) for out in outs for i in out.split()]
    assert len(ids) == 40 and len(set(ids)) == 40 and 1 not in ids
    records = Catalog(url).all()
    assert {r.path for r in records} == {"base/a", *first, *second}
    assert check_index(idx, deep=True).ok


def test_two_indexes_in_one_database_use_their_own_schemas(postgres, tmp_path: Path) -> None:
    """Two index directories on one PostgreSQL database, each in its own schema, written by two
    processes at once: each keeps its own rows and id sequence."""
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    for schema in ("shard_a", "shard_b"):
        postgres.execute(f"CREATE SCHEMA {schema}", database)
    urls = [f"{url}?options=-csearch_path%3D{schema}" for schema in ("shard_a", "shard_b")]
    for name, shard_url in zip("ab", urls, strict=True):
        synthetic.run(str(tmp_path / name), "build", [f"{name}/0"], db_url=shard_url)
    procs = [
        _writer_process(tmp_path / name, [f"{name}/{k}" for k in range(1, 16)], None)
        for name in "ab"
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [sorted(int(i) for i in out.split()) for out in outs] == [list(range(2, 17))] * 2
    for name, shard_url in zip("ab", urls, strict=True):
        assert {r.path[0] for r in Catalog(shard_url).all()} == {name}
        assert check_index(tmp_path / name, deep=True).ok


def test_lost_server_mid_build_is_one_line_and_the_rerun_resumes(
    postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import index.writer
    import retrieval.ingest

    url = postgres.create_database()
    corpus = tmp_path / "corpus"
    (corpus / "sacre_coeur").mkdir(parents=True)
    for p in SACRE[:6]:
        shutil.copy(p, corpus / "sacre_coeur" / p.name)
    monkeypatch.setattr(retrieval.ingest, "BATCH_IMAGES", 2)
    stopped: list[str] = []

    def lose_server(name: str) -> None:  # the server goes away after the first committed batch
        if name == "batch:manifest" and not stopped:
            postgres.stop()
            stopped.append(name)

    monkeypatch.setattr(index.writer, "checkpoint", lose_server)
    args = ["index", "build", str(corpus), "-i", str(tmp_path / "idx"), "--db", url, "-q",
            "--local-conf", '{"resize_max": 256, "max_keypoints": 128}',
            "--global-conf", '{"resize_max": 256, "scales": [1.0]}']  # fmt: skip
    try:
        out = CliRunner().invoke(app, args)
    finally:
        if stopped:
            postgres.start()
    assert stopped and out.exit_code == 1, out.output
    line = out.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: catalog "), line
    assert "postgresql+psycopg://retr:***@127.0.0.1" in line and "retr-test" not in line
    monkeypatch.setattr(index.writer, "checkpoint", lambda name: None)
    report = build_index(corpus, tmp_path / "idx")  # the rerun keeps the committed batch
    assert report.indexed == 4 and report.total_indexed == 6
    assert check_index(tmp_path / "idx", deep=True).ok


def test_wrong_credentials_and_unreachable_server_are_one_line(postgres, tmp_path: Path) -> None:
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    with pytest.raises(IndexError_, match="password authentication failed") as err:
        Catalog(postgres.url(database, password="wrong"), create=True)
    assert "wrong" not in str(err.value) and "\n" not in str(err.value)
    refused = r"catalog .*127.0.0.1:1/x: open failed: .*refused"
    with pytest.raises(IndexError_, match=refused) as err:
        Catalog("postgresql+psycopg://retr:pw@127.0.0.1:1/x")
    assert ":pw@" not in str(err.value) and "server is unreachable" in str(err.value)
    assert "repair" not in str(err.value)  # a server that is down is not a damaged catalog
    paths = IndexPaths(tmp_path / "idx")
    synthetic.run(str(paths.root), "build", ["a/x"], db_url=url)
    out = CliRunner().invoke(
        app, ["index", "info", "-i", str(paths.root), "--db", postgres.url(database, "wrong")]
    )
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    with pytest.raises(IndexError_, match="server is unreachable") as err:
        repair_index(paths.root, db="postgresql+psycopg://retr:pw@127.0.0.1:1/x")
    assert "damaged" not in str(err.value) and "backup" not in str(err.value)
    assert check_index(paths.root, deep=True).ok  # nothing was lost
