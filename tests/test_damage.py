"""Damaged index files and bad catalogs: every case gives one line naming the file and the
command that fixes it (never a traceback, never a silent empty answer), `retr index check`
finds it, and `retr index repair` (with `retr index update` for features that are truly lost)
brings back the answers of the undamaged index."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.core import ImageReadError, IndexError_
from features.image import load_image
from index.manifest import Manifest
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.cli import app
from tests.corpus import MINI, tiny

SACRE = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))
BRIDGE = sorted((MINI / "images/tower_bridge").glob("*.jpg"))
QUERIES = (SACRE[0], BRIDGE[1])


def _answers(idx: Path) -> list[list[tuple[str, int]]]:
    r = Retriever.open(idx)
    return [[(m.path, m.inliers) for m in r.search(q, k=4).matches] for q in QUERIES]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("damage")
    corpus = root / "corpus"
    for group, files in (("sacre_coeur", SACRE[:3]), ("tower_bridge", BRIDGE[:3])):
        (corpus / group).mkdir(parents=True)
        for p in files:
            shutil.copy(p, corpus / group / p.name)
    build_index(corpus, root / "idx", tiny())
    return root / "idx", _answers(root / "idx")


@pytest.fixture
def idx(pristine: tuple[Path, list], tmp_path: Path) -> Path:
    target = tmp_path / "idx"
    shutil.copytree(pristine[0], target)
    return target


def _run(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(app, list(args))
    return out.exit_code, out.output


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def _segment(idx: Path) -> Path:
    return idx / "segments" / Manifest.load(idx).segments[0].name


def _manifest_file(kind: str) -> Callable[[Path], Path]:
    def pick(idx: Path) -> Path:
        entry = getattr(Manifest.load(idx), kind)
        return idx / entry.name

    return pick


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _zero(path: Path) -> None:
    """Zeros over the whole file, size unchanged (a block the file system lost)."""
    path.write_bytes(bytes(path.stat().st_size))


def _scribble(path: Path) -> None:
    """Random bytes in the middle of the file, size unchanged."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = os.urandom(min(4096, len(data) - mid))
    path.write_bytes(bytes(data))


# (case, file, damage, does a query fail, words naming the file)
CASES = [
    ("whitening deleted", _manifest_file("whitening"), Path.unlink, True, "whitening"),
    ("whitening truncated", _manifest_file("whitening"), _truncate, True, "whitening"),
    ("whitening emptied", _manifest_file("whitening"), _empty, True, "whitening"),
    ("whitening zeroed", _manifest_file("whitening"), _zero, True, "whitening"),
    ("vectors truncated", _manifest_file("vectors"), _truncate, True, "vector index"),
    ("vectors deleted", _manifest_file("vectors"), Path.unlink, True, "vector index"),
    ("manifest truncated", lambda i: i / "manifest.json", _truncate, True, "manifest.json"),
    ("manifest deleted", lambda i: i / "manifest.json", Path.unlink, True, "manifest.json"),
    ("catalog deleted", lambda i: i / "catalog.sqlite", Path.unlink, True, "catalog"),
    ("catalog truncated", lambda i: i / "catalog.sqlite", _truncate, True, "catalog"),
    ("segment truncated", _segment, _truncate, True, "segment"),
    ("segment deleted", _segment, Path.unlink, True, "segment"),
    ("config truncated", lambda i: i / "retr.json", _truncate, False, "retr.json"),
    ("config emptied", lambda i: i / "retr.json", _empty, False, "retr.json"),
]


@pytest.mark.parametrize(
    ("case", "target", "damage", "fails", "words"), CASES, ids=[c[0] for c in CASES]
)
def test_damage_is_named_checked_and_repaired(
    pristine: tuple[Path, list],
    idx: Path,
    case,
    target,
    damage,
    fails: bool,
    words: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = target(idx)
    damage(path)
    code, output = _run("query", str(QUERIES[0]), "--index", str(idx), "-k", "3")
    if fails:  # one line naming the file and the command that fixes it
        line = _one_line(output)
        assert code == 1 and words in line and "retr index repair" in line, output
        assert "pickle" not in line and "unsafe" not in line  # never suggest an unsafe load
    else:  # the manifest's copy of the config keeps queries working
        assert code == 0, output
    code, output = _run("index", "check", "--index", str(idx))
    assert code == 1 and words.split()[0] in output and "repair" in output, output
    code, output = _run("index", "repair", "--index", str(idx))
    assert code == 0 and "repaired:" in output, output
    if "segment" in case:  # its features are lost: listed, then extracted again
        assert "retr index update" in output
        caplog.clear()
        code, output = _run("query", str(QUERIES[0]), "--index", str(idx), "-k", "3")
        said = [r for r in caplog.records if "lost their features in a repair" in r.getMessage()]
        assert code == 0 and len(said) == 1 and "retr index update" in said[0].getMessage()
        code, output = _run("index", "update", "--index", str(idx), "-q")
        assert code == 0 and "updated" in output, output
    code, output = _run("index", "check", "--index", str(idx), "--deep")
    assert code == 0, output
    assert _answers(idx) == pristine[1]


@pytest.mark.parametrize("target", ["catalog", "segment"])
def test_random_bytes_are_found_by_a_deep_check_and_repaired(
    pristine: tuple[Path, list], idx: Path, target: str
) -> None:
    path = idx / "catalog.sqlite" if target == "catalog" else _segment(idx)
    if target == "catalog":  # rows rewritten behind SQLite's back: its pages disagree
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA writable_schema=ON")
            db.execute("UPDATE sqlite_master SET rootpage=9999 WHERE name='ix_images_status'")
    else:
        _scribble(path)
    code, output = _run("index", "check", "--index", str(idx), "--deep")
    assert code == 1 and "problem:" in output, output
    code, output = _run("index", "repair", "--index", str(idx))
    assert code == 0, output
    if target == "segment":
        _run("index", "update", "--index", str(idx), "-q")
    code, output = _run("index", "check", "--index", str(idx), "--deep")
    assert code == 0, output
    assert _answers(idx) == pristine[1]


def test_a_wrong_or_empty_catalog_is_an_error_not_an_empty_answer(idx: Path, tmp_path: Path):
    elsewhere = tmp_path / "some" / "empty.sqlite"
    code, output = _run(
        "query", str(QUERIES[0]), "--index", str(idx), "--db", f"sqlite:///{elsewhere}"
    )
    assert code == 1 and "empty.sqlite" in _one_line(output) and not elsewhere.exists()
    elsewhere.parent.mkdir(parents=True)
    sqlite3.connect(elsewhere).close()  # exists, but holds no catalog
    code, output = _run(
        "query", str(QUERIES[0]), "--index", str(idx), "--db", f"sqlite:///{elsewhere}"
    )
    assert code == 1 and "no retr catalog" in _one_line(output)
    with sqlite3.connect(idx / "catalog.sqlite") as db:
        db.execute("DELETE FROM images")
    code, output = _run("query", str(QUERIES[0]), "--index", str(idx))
    line = _one_line(output)
    assert code == 1 and "is empty" in line and "holds 6 images" in line


def test_passwords_never_appear_in_messages(idx: Path) -> None:
    url = "postgresql+psycopg://alice:S3cretPW@127.0.0.1:1/retr"
    for args in (
        ["query", str(QUERIES[0]), "--index", str(idx), "--db", url],
        ["index", "info", "--index", str(idx), "--db", url],
    ):
        code, output = _run(*args)
        assert code == 1 and "S3cretPW" not in output and "alice:***@" in output, output


def test_unreadable_query_file_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    image = tmp_path / "q.jpg"
    shutil.copy(QUERIES[0], image)

    def eio(self: Path) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", eio)
    with pytest.raises(ImageReadError, match=r"q.jpg: unreadable file \(Input/output error\)"):
        load_image(image)


def test_an_index_of_the_old_layout_says_to_rebuild(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "retr.json").write_text("{}")
    (tmp_path / "old" / "global.h5").write_bytes(b"")
    with pytest.raises(IndexError_, match="older retr .* build it again"):
        Retriever.open(tmp_path / "old")
