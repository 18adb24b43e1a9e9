"""Match pictures (retrieval.pictures): the pair side by side with what the rerank verified, and
`retr match A B --out pair.png`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from features.base import LocalExtractor
from features.image import load_image
from features.registry import load_local
from features.types import LocalFeatures
from retrieval.cli import app
from retrieval.pictures import CAPTION, GAP, INLIER, KEYPOINT, match_picture
from retrieval.rerank import RerankConf, verify_pair
from tests.corpus import MINI, TINY_OPTIONS

SACRE = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))


@pytest.fixture(scope="module")
def disk() -> LocalExtractor:
    return load_local("disk", TINY_OPTIONS["local_conf"])


@pytest.fixture(scope="module")
def pair(disk: LocalExtractor) -> tuple[np.ndarray, np.ndarray, LocalFeatures, LocalFeatures]:
    a, b = load_image(SACRE[1]), load_image(SACRE[2])
    return a, b, disk.extract(a), disk.extract(b)


def _pixels(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image == np.array(colour, np.uint8), axis=2).sum())


def test_picture_shows_the_pair_and_the_inliers_the_rerank_counts(pair: tuple) -> None:
    a, b, fa, fb = pair
    picture = match_picture(a, b, fa, fb, height=300)
    expected = verify_pair(fa, fb, RerankConf())
    assert picture.inliers == expected.inliers > 0
    assert picture.matches == len(expected.matches)
    assert np.array_equal(picture.pair.matches, expected.matches)
    width = round(a.shape[1] * 300 / a.shape[0]) + GAP + round(b.shape[1] * 300 / b.shape[0])
    assert picture.image.shape == (CAPTION + 300, width, 3)
    assert _pixels(picture.image, INLIER) > 0  # the inliers' end points, drawn solid


def test_rejected_matches_and_keypoints_are_optional(pair: tuple) -> None:
    a, b, fa, fb = pair
    plain = match_picture(a, b, fa, fb, rejected=False).image
    assert picture_differs(match_picture(a, b, fa, fb, rejected=True).image, plain)
    with_points = match_picture(a, b, fa, fb, rejected=False, keypoints=True).image
    assert _pixels(with_points, KEYPOINT) > _pixels(plain, KEYPOINT)


def picture_differs(one: np.ndarray, other: np.ndarray) -> bool:
    return one.shape == other.shape and bool((one != other).any())


def test_a_pair_without_matches_is_drawn_unverified(pair: tuple) -> None:
    a, b, fa, _ = pair
    empty = LocalFeatures.empty(fa.descriptors.shape[1], (b.shape[1], b.shape[0]))
    picture = match_picture(a, b, fa, empty)
    assert picture.matches == 0 and picture.inliers == 0 and not picture.pair.verified
    assert _pixels(picture.image, INLIER) == 0


def test_png_round_trip(pair: tuple, tmp_path: Path) -> None:
    a, b, fa, fb = pair
    picture = match_picture(a, b, fa, fb, height=120)
    path = picture.save(tmp_path / "deep" / "pair.png")
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, picture.image)


@pytest.mark.parametrize("matcher", ["mnn", "auto"])
def test_retr_match_prints_the_counts_and_writes_the_picture(matcher: str, tmp_path: Path) -> None:
    out = tmp_path / "pair.png"
    args = ["match", str(SACRE[1]), str(SACRE[2]), "--out", str(out), "--max-keypoints", "128"]
    result = CliRunner().invoke(app, [*args, "--matcher", matcher])
    assert result.exit_code == 0, result.output
    assert " matches, " in result.output and " inliers " in result.output
    assert f"wrote {out}" in result.output
    if matcher == "mnn":
        assert result.output.startswith("mnn: ")
    assert cv2.imread(str(out)).shape[0] == CAPTION + 480


def test_retr_match_bad_image_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image")
    result = CliRunner().invoke(app, ["match", str(bad), str(SACRE[1])])
    assert result.exit_code == 1
    assert "bad.jpg: not an image" in result.output
