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

from features.core import ConfigError, StoreMismatchError
from index.catalog import Catalog, Status
from index.layout import IndexPaths
from index.store import FeatureStore
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.cli import app
from tests.corpus import MINI

TINY_OPTIONS = {
    "local_conf": {"resize_max": 256, "max_keypoints": 128},
    "global_conf": {"resize_max": 256, "scales": [1.0]},
}
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

    report = build_index(corpus, tmp_path / "idx", TINY_OPTIONS)
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
    assert len(r.vectors) == len(ids)
    top = r.search(GOOD[3], k=1, rerank=False)[0]
    assert top.path == "sacre_coeur/" + GOOD[3].name


def test_labels_csv_overrides_folder_names(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    for p in GOOD[:2]:
        shutil.copy(p, corpus / p.name)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], [GOOD[0].name, "basilica"]])
    build_index(corpus, tmp_path / "idx", TINY_OPTIONS, labels_csv=labels)
    records = Catalog(f"sqlite:///{tmp_path / 'idx/catalog.sqlite'}").by_path()
    assert records[GOOD[0].name].label == "basilica" and records[GOOD[1].name].label is None


def test_contradicting_options_on_an_existing_index_are_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    shutil.copy(GOOD[0], corpus / GOOD[0].name)
    build_index(corpus, tmp_path / "idx", TINY_OPTIONS)
    with pytest.raises(ConfigError, match="local_conf"):
        build_index(corpus, tmp_path / "idx", {"local_conf": {"max_keypoints": 64}})
    with pytest.raises(ConfigError, match="valid options"):
        build_index(corpus, tmp_path / "other", {"lokal_method": "disk"})


def test_feature_store_refuses_another_configuration(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with FeatureStore(path, "local", "aaaa", {"x": 1}) as store:
        store.put(1, descriptors=np.ones((2, 3), np.float16))
    with pytest.raises(StoreMismatchError, match="aaaa"):
        FeatureStore(path, "local", "bbbb")
    with FeatureStore(path, "local", "aaaa", readonly=True) as store:
        assert store.ids() == [1] and store.get(1)["descriptors"].dtype == np.float16


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
