"""Dataset adapters: published layouts read right, query rules explicit, downloads offline-safe."""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.core import DatasetError, DownloadError
from retrieval.evaluation import downloads as ds
from retrieval.evaluation.datasets import (
    Query,
    gldv2,
    gldv2_path,
    landmarks_mini,
    open_dataset,
    query_image,
    revisited,
)
from tests.conftest import DATA

MINI = DATA / "landmarks-mini"


def _jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path)


def _roxford(root: Path) -> Path:
    """A 5-image, 2-query dataset in the published layout (imlist names have no extension)."""
    imlist = ["all_souls_1", "all_souls_2", "radcliffe_1", "radcliffe_2", "junk_1"]
    for name in [*imlist, "q_all_souls", "q_radcliffe"]:
        _jpeg(root / "jpg" / f"{name}.jpg", (80, 60))
    gnd = {
        "imlist": imlist,
        "qimlist": ["q_all_souls", "q_radcliffe"],
        "gnd": [
            {"bbx": [10.4, 5.6, 50.5, 40.2], "easy": [0], "hard": [1], "junk": [4]},
            {"bbx": np.array([0.0, 0.0, 80.0, 60.0]), "easy": [2, 3], "hard": [], "junk": []},
        ],
    }
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(gnd, f)
    return root


# --- revisited -----------------------------------------------------------------------------------


def test_revisited_reads_the_published_layout(tmp_path) -> None:
    d = revisited("roxford5k", _roxford(tmp_path))
    assert [im.rel for im in d.database] == [
        "jpg/all_souls_1.jpg",
        "jpg/all_souls_2.jpg",
        "jpg/radcliffe_1.jpg",
        "jpg/radcliffe_2.jpg",
        "jpg/junk_1.jpg",
    ]
    q0, q1 = d.queries
    assert q0.easy == {"jpg/all_souls_1.jpg"} and q0.hard == {"jpg/all_souls_2.jpg"}
    assert q0.junk == {"jpg/junk_1.jpg"}
    assert q1.easy == {"jpg/radcliffe_1.jpg", "jpg/radcliffe_2.jpg"} and not q1.hard
    assert q0.bbox == pytest.approx((10.4, 5.6, 50.5, 40.2))
    assert d.protocols == ("easy", "medium", "hard")
    assert not d.has_labels


def test_query_is_cropped_to_its_box_with_pil_rounding(tmp_path) -> None:
    d = revisited("roxford5k", _roxford(tmp_path))
    crop = query_image(d.queries[0])
    full = np.asarray(Image.open(d.queries[0].path).convert("RGB"))
    # round(10.4)=10, round(5.6)=6, round(50.5)=50 (half to even), round(40.2)=40
    assert crop.shape == (34, 40, 3)
    np.testing.assert_array_equal(crop, full[6:40, 10:50])
    assert query_image(d.queries[1]).shape == (60, 80, 3)


def test_box_outside_the_image_is_an_error(tmp_path) -> None:
    _jpeg(tmp_path / "q.jpg")
    with pytest.raises(DatasetError, match="outside"):
        query_image(Query("q", tmp_path / "q.jpg", bbox=(100.0, 100.0, 120.0, 130.0)))


def test_revisited_missing_files_say_how_to_get_them(tmp_path) -> None:
    with pytest.raises(DatasetError, match="missing; fetch it with download_roxford5k"):
        revisited("roxford5k", tmp_path)
    root = _roxford(tmp_path / "ox")
    (root / "jpg" / "radcliffe_2.jpg").unlink()
    with pytest.raises(DatasetError, match="1 of 5 .*download_roxford5k"):
        revisited("roxford5k", root)
    with pytest.raises(DatasetError, match="available: roxford5k, rparis6k"):
        revisited("holidays", root)


def test_revisitop1m_distractors_join_the_database(tmp_path) -> None:
    root = _roxford(tmp_path / "roxford5k")
    r1m = tmp_path / "revisitop1m"
    (r1m / "jpg").mkdir(parents=True)
    (r1m / "revisitop1m.txt").write_text("0/00/aaa.jpg\n0/00/bbb\n")
    for name in ("0/00/aaa.jpg", "0/00/bbb.jpg"):
        _jpeg(r1m / "jpg" / name)
    d = revisited("roxford5k", root, distractors=r1m)
    assert [im.rel for im in d.database[-2:]] == [
        "revisitop1m/0/00/aaa.jpg",
        "revisitop1m/0/00/bbb.jpg",
    ]
    assert len(d.database) == 7


# --- GLDv2 ---------------------------------------------------------------------------------------


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _gldv2(root: Path) -> Path:
    train = [["aaa0000000000001", "http://x", "7"], ["bbb0000000000002", "http://x", "7"]]
    train += [["ccc0000000000003", "http://x", "9"], ["ddd0000000000004", "http://x", "9"]]
    _write_csv(root / "train.csv", ["id", "url", "landmark_id"], train)
    solution = [
        ["eee0000000000005", "7", "Public"],
        ["fff0000000000006", "", "Private"],  # shows no landmark
        ["abc0000000000007", "9 12", "Private"],
        ["0120000000000008", "7", "Public"],  # its image is not downloaded
    ]
    _write_csv(root / "recognition_solution_v2.1.csv", ["id", "landmarks", "Usage"], solution)
    for split, ids in (
        ("train", ["aaa0000000000001", "bbb0000000000002", "ccc0000000000003"]),
        ("test", ["eee0000000000005", "fff0000000000006", "abc0000000000007"]),
    ):
        for i in ids:
            _jpeg(gldv2_path(root, split, i))
    return root


def test_gldv2_uses_the_images_on_disk_and_the_official_csvs(tmp_path) -> None:
    d = gldv2(_gldv2(tmp_path))
    assert [im.rel for im in d.database] == [
        "train/a/a/a/aaa0000000000001.jpg",
        "train/b/b/b/bbb0000000000002.jpg",
        "train/c/c/c/ccc0000000000003.jpg",
    ]
    assert [im.label for im in d.database] == ["7", "7", "9"]
    by_name = {q.name: q for q in d.queries}
    assert set(by_name) == {"eee0000000000005", "fff0000000000006", "abc0000000000007"}
    assert by_name["fff0000000000006"].labels == frozenset()  # non-landmark query
    assert by_name["abc0000000000007"].labels == {"9", "12"}
    assert by_name["abc0000000000007"].easy == {"train/c/c/c/ccc0000000000003.jpg"}
    assert len(by_name["eee0000000000005"].easy) == 2
    assert by_name["eee0000000000005"].path == tmp_path / "test/e/e/e/eee0000000000005.jpg"
    assert "3 of 4 train images" in d.notes[0] and "3 of 4 solution rows" in d.notes[1]
    assert d.has_labels


def test_gldv2_usage_filter_and_train_clean_format(tmp_path) -> None:
    root = _gldv2(tmp_path)
    assert [q.name for q in gldv2(root, usage="Public").queries] == ["eee0000000000005"]
    _write_csv(
        root / "train_clean.csv",
        ["landmark_id", "images"],
        [["7", "aaa0000000000001 bbb0000000000002"], ["9", "ccc0000000000003"]],
    )
    d = gldv2(root, train_csv="train_clean.csv")
    assert sorted(im.label or "" for im in d.database) == ["7", "7", "9"]


def test_gldv2_bad_or_missing_csv(tmp_path) -> None:
    with pytest.raises(DatasetError, match="train.csv is missing"):
        gldv2(tmp_path)
    _write_csv(tmp_path / "train.csv", ["id", "url"], [["a", "b"]])
    with pytest.raises(DatasetError, match="expected columns"):
        gldv2(tmp_path)


# --- landmarks-mini ------------------------------------------------------------------------------


def _manifest() -> list[dict[str, str]]:
    with open(MINI / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_mini_first_mode_holds_out_the_first_image_of_each_landmark_group() -> None:
    rows = _manifest()
    d = landmarks_mini(MINI)
    firsts: dict[str, str] = {}
    for r in rows:
        if r["kind"] == "landmark":
            firsts.setdefault(r["group"], r["path"])
    assert [q.name for q in d.queries] == list(firsts.values())
    assert len(d.queries) == 8
    db = {im.rel for im in d.database}
    assert len(db) == len(rows) - 8 and not db & set(firsts.values())
    for q in d.queries:
        group = next(r["group"] for r in rows if r["path"] == q.name)
        members = {r["path"] for r in rows if r["group"] == group}
        assert q.easy == members - {q.name} and q.easy <= db
        assert q.labels == {group} and not q.junk
    assert sum(im.label is None for im in d.database) == 43  # distractors, unlabelled


def test_mini_leave_one_out_mode_keeps_every_image_and_marks_the_query_junk() -> None:
    d = landmarks_mini(MINI, queries="all", kinds=("landmark", "place", "wxbs"))
    assert len(d.database) == 181
    assert len(d.queries) == 138  # every labelled image, never a distractor
    assert all(q.junk == {q.name} and q.name not in q.easy for q in d.queries)
    assert not any(q.name.startswith("distractors/") for q in d.queries)


def test_mini_subset_and_bad_options() -> None:
    d = landmarks_mini(MINI, groups=["tower_bridge", "united_states_capitol"], max_distractors=2)
    assert len(d.queries) == 2 and len(d.database) == 3 + 1 + 2
    with pytest.raises(DatasetError, match="unknown groups"):
        landmarks_mini(MINI, groups=["atlantis"])
    with pytest.raises(DatasetError, match="first, all"):
        landmarks_mini(MINI, queries="some")


def test_open_dataset_by_name() -> None:
    assert open_dataset("mini", MINI, max_distractors=0).name == "landmarks-mini[first]"
    with pytest.raises(DatasetError, match="available: roxford5k, rparis6k, gldv2, mini"):
        open_dataset("holidays", MINI)
    with pytest.raises(DatasetError, match="unexpected keyword"):
        open_dataset("mini", MINI, colour="red")


# --- downloads -----------------------------------------------------------------------------------


def test_offline_download_fails_in_one_line_without_touching_the_network(
    tmp_path, monkeypatch
) -> None:
    def no_network(url: str):
        raise AssertionError(f"network touched: {url}")

    monkeypatch.setattr(ds, "_open_url", no_network)
    monkeypatch.setenv("RETR_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        ds.download_roxford5k(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "RETR_OFFLINE" in message
    assert "gnd_roxford5k.pkl" in message and str(tmp_path / "roxford5k") in message


def test_unreachable_server_gives_one_clear_line(tmp_path, monkeypatch) -> None:
    def unreachable(url: str):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ds, "_open_url", unreachable)
    monkeypatch.delenv("RETR_OFFLINE", raising=False)
    with pytest.raises(DownloadError, match="cannot download http://cmp.felk.cvut.cz/") as info:
        ds.download_rparis6k(tmp_path)
    assert "\n" not in str(info.value) and "Name or service not known" in str(info.value)
    assert not list((tmp_path / "rparis6k").glob("*.part"))


def test_download_writes_and_extracts_archives_flat(tmp_path, monkeypatch) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in ("oxbuild/a.jpg", "../../evil.jpg"):
            data = b"jpeg-bytes"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    served: list[str] = []

    def fake(url: str):
        served.append(url)
        return io.BytesIO(archive.getvalue() if url.endswith(".tgz") else b"gnd")

    monkeypatch.setattr(ds, "_open_url", fake)
    monkeypatch.delenv("RETR_OFFLINE", raising=False)
    root = ds.download_roxford5k(tmp_path)
    assert sorted(p.name for p in (root / "jpg").iterdir()) == ["a.jpg", "evil.jpg"]
    assert not (tmp_path.parent / "evil.jpg").exists()
    assert (root / "gnd_roxford5k.pkl").read_bytes() == b"gnd"
    assert served == [
        ds.REVISITOP_GND_URL.format(name="roxford5k"),
        *ds.REVISITED_IMAGES["roxford5k"],
    ]
    ds.download_roxford5k(tmp_path)  # everything present: nothing fetched again
    assert len(served) == 2
