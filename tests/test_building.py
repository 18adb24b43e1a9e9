"""Building on a messy corpus: bad files are skipped with a reason, nothing indexed is lost, and a
re-run processes only new or changed files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from features.core import ConfigError
from index.catalog import Catalog, Status
from index.layout import IndexConfig, IndexPaths
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.cli import app
from tests.corpus import MINI, tiny

GOOD = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))


def _bad_files(root: Path) -> dict[str, str]:
    """Write one file of each bad kind; returns name -> expected words in the reason."""
    src = GOOD[0].read_bytes()
    (root / "bad").mkdir(parents=True)
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/notes.txt").write_text("not an image")
    (root / "bad/truncated.jpg").write_bytes(src[: len(src) // 4])
    (root / "bad/corrupt.jpg").write_bytes(src[:200] + bytes(5000) + src[-100:])
    Image.new("RGB", (16, 300)).save(root / "bad/tiny.png")
    return {
        "bad/empty.jpg": "empty",
        "bad/notes.txt": "not an image",
        "bad/truncated.jpg": "truncated",
        "bad/corrupt.jpg": "corrupt",
        "bad/tiny.png": "too small",
    }


def _odd_but_fine(root: Path) -> list[str]:
    """Images in unusual modes that must be indexed, not skipped."""
    rgb = np.asarray(Image.open(GOOD[1]).convert("RGB"))
    (root / "odd").mkdir(parents=True)
    Image.fromarray(rgb).convert("L").save(root / "odd/gray.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(root / "odd/sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "odd/cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(root / "odd/alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(rgb).save(root / "odd/rotated.jpg", exif=exif)
    return ["odd/gray.png", "odd/sixteen.png", "odd/cmyk.jpg", "odd/alpha.png", "odd/rotated.jpg"]


def test_bad_inputs_are_skipped_with_reasons_and_resume_adds_only_new(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sacre_coeur").mkdir(parents=True)
    for p in GOOD[:3]:
        shutil.copy(p, corpus / "sacre_coeur" / p.name)
    bad = _bad_files(corpus)
    odd = _odd_but_fine(corpus)
    shutil.copy(GOOD[0], corpus / "sacre_coeur" / "copy_of_first.jpg")

    report = build_index(corpus, tmp_path / "idx", tiny())
    failed = dict(report.failed)
    assert set(failed) == set(bad)
    for name, words in bad.items():
        assert words in failed[name], (name, failed[name])
    # Same bytes under two names: the first in corpus order is indexed, the other reported.
    pair = {"sacre_coeur/copy_of_first.jpg", "sacre_coeur/" + GOOD[0].name}
    assert len(report.duplicates) == 1 and report.duplicates[0][0] in pair
    other = (pair - {report.duplicates[0][0]}).pop()
    assert report.duplicates[0][1] == f"same content as {other}"
    assert report.indexed == 3 + len(odd)

    catalog = Catalog(f"sqlite:///{tmp_path / 'idx/catalog.sqlite'}")
    records = catalog.by_path()
    assert records["bad/empty.jpg"].status == Status.FAILED.value
    assert records["odd/rotated.jpg"].label == "odd"
    assert records["sacre_coeur/" + GOOD[1].name].label == "sacre_coeur"
    assert records["odd/rotated.jpg"].width < records["odd/rotated.jpg"].height  # EXIF applied
    first_ids = set(catalog.indexed_ids())

    # Resume: two new images and one changed file; everything else is left alone.
    for p in GOOD[3:5]:
        shutil.copy(p, corpus / "sacre_coeur" / p.name)
    Image.open(GOOD[6]).save(corpus / "odd/gray.png")
    again = build_index(corpus, tmp_path / "idx")
    assert again.indexed == 3 and again.unchanged == 3 + len(odd) - 1
    ids = set(catalog.indexed_ids())
    assert first_ids < ids and len(ids) == len(first_ids) + 2
    assert catalog.by_path()["odd/gray.png"].id == records["odd/gray.png"].id

    r = Retriever.open(tmp_path / "idx")
    assert len(r.snapshot().vectors) == len(ids)
    top = r.search(GOOD[3], k=1, rerank=False).matches[0]
    assert top.path == "sacre_coeur/" + GOOD[3].name


def test_labels_csv_overrides_folder_names(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    for p in GOOD[:2]:
        shutil.copy(p, corpus / p.name)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], [GOOD[0].name, "basilica"]])
    build_index(corpus, tmp_path / "idx", tiny(), labels_csv=labels)
    records = Catalog(f"sqlite:///{tmp_path / 'idx/catalog.sqlite'}").by_path()
    assert records[GOOD[0].name].label == "basilica" and records[GOOD[1].name].label is None


def test_contradicting_options_on_an_existing_index_are_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    shutil.copy(GOOD[0], corpus / GOOD[0].name)
    build_index(corpus, tmp_path / "idx", tiny())
    with pytest.raises(ConfigError, match="local_conf"):
        build_index(corpus, tmp_path / "idx", tiny(local_conf={"max_keypoints": 64}))
    with pytest.raises(ConfigError, match="valid options"):
        IndexConfig.parse({"lokal_method": "disk"})
    with pytest.raises(ConfigError, match="max_keypoint: Extra inputs"):
        IndexConfig.parse({"local_conf": {"max_keypoint": 3}})  # checked before any network


def test_odd_entries_are_recorded_and_a_labelled_copy_keeps_its_label(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    (corpus / "sacre_coeur").mkdir(parents=True)
    shutil.copy(GOOD[0], corpus / "aaa_unlabelled_copy.jpg")  # sorts before the labelled one
    shutil.copy(GOOD[0], corpus / "sacre_coeur" / GOOD[0].name)
    (corpus / "loop.jpg").symlink_to(corpus / "loop.jpg")
    (corpus / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (corpus / "folder.jpg").mkdir()
    labels = tmp_path / "labels.csv"
    rows = [["path", "label"], [f"sacre_coeur/{GOOD[0].name}", "sacre_coeur"]]
    rows += [["/elsewhere/x.jpg", "x"], ["missing.jpg", "y"]]
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    report = build_index(corpus, tmp_path / "idx", tiny(), labels_csv=labels)
    failed = dict(report.failed)
    assert "loop" in failed["loop.jpg"] and "dangling" in failed["dangling.jpg"]
    assert "directory" in failed["folder.jpg"]
    assert report.duplicates == [
        ("aaa_unlabelled_copy.jpg", f"same content as sacre_coeur/{GOOD[0].name}")
    ]
    assert any("/elsewhere/x.jpg" in r for r in report.ignored_labels)
    assert any("missing.jpg" in r for r in report.ignored_labels)
    records = Catalog(f"sqlite:///{tmp_path / 'idx/catalog.sqlite'}").by_path()
    assert records["loop.jpg"].status == Status.FAILED.value

    # A labelled copy arriving later takes over from an unlabelled original.
    corpus2 = tmp_path / "c2"
    corpus2.mkdir()
    shutil.copy(GOOD[1], corpus2 / GOOD[1].name)
    build_index(corpus2, tmp_path / "idx2", tiny())
    (corpus2 / "tower").mkdir()
    shutil.copy(GOOD[1], corpus2 / "tower" / "copy.jpg")
    again = build_index(corpus2, tmp_path / "idx2")
    assert again.indexed == 1
    top = Retriever.open(tmp_path / "idx2").search(GOOD[1], k=1, rerank=False).matches[0]
    assert top.path == "tower/copy.jpg" and top.label == "tower"
    demoted = Catalog(f"sqlite:///{tmp_path / 'idx2/catalog.sqlite'}").by_path()[GOOD[1].name]
    assert demoted.status == Status.DUPLICATE.value and "tower/copy.jpg" in (demoted.reason or "")


def test_cli_build_reports_and_unknown_method_is_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    (corpus / "sacre_coeur").mkdir(parents=True)
    shutil.copy(GOOD[0], corpus / "sacre_coeur" / GOOD[0].name)
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    runner = CliRunner()
    out = runner.invoke(
        app,
        ["index", "build", str(corpus), "--index", str(tmp_path / "x"), "--local", "nosuch", "-q"],
    )
    assert out.exit_code == 1 and "unknown local method 'nosuch'" in out.output
    assert "disk" in out.output and len(out.output.strip().splitlines()) == 1
    assert not IndexPaths(tmp_path / "x").exists()


def test_index_info_on_a_missing_index_says_how_to_build(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["index", "info", "--index", str(tmp_path / "none")])
    assert out.exit_code == 1 and "retr index build" in out.output
