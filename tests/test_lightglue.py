"""LightGlue parity with the official cvg/LightGlue network (../shared/fixtures/lightglue), and
the batched plug-in against one pair at a time.

Tolerances are the fixture README's: full mode match by match (at most 1% of rows differ, only
where the score is under 0.2, and scores within 1e-4 elsewhere); adaptive mode loosely (the
stop layer within one, at least 95% of the matches in common).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.core import CheckpointError, ConfigError, WeightsNotFoundError
from features.types import LocalFeatures
from features.weights import resolve_weights
from retrieval.matchers.lightglue import (
    WEIGHTS,
    LightGlue,
    LightGlueConf,
    LightGlueNet,
    load_network,
)
from tests.conftest import fixture_dir

FIX = fixture_dir("lightglue")
PAIRS = ("planar_churchill_1_3", "wxbs_kremlin", "evd_cafe", "negative")
MODES = {"full": (-1.0, -1.0), "adaptive": (0.95, 0.99)}


@pytest.fixture(scope="module")
def net() -> LightGlueNet:
    return load_network(resolve_weights(WEIGHTS["disk"], what="lightglue"))


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIX / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _features(ref: dict[str, np.ndarray], side: int, n: int | None = None) -> LocalFeatures:
    kpts = ref[f"keypoints{side}"][:n]
    w, h = (int(v) for v in ref[f"image_size{side}"])
    scores = np.linspace(1, 0, len(ref[f"keypoints{side}"]), dtype=np.float32)[:n]
    return LocalFeatures(kpts, scores, ref[f"descriptors{side}"][:n], (w, h))


def _official_layout(net: LightGlueNet, ref: dict[str, np.ndarray], mode: str):
    """matches0 (M,), matching_scores0 (M,) and stop, as the official forward returns them."""
    t = {k: torch.from_numpy(ref[k])[None] for k in ref if not k.startswith(("image0", "image1"))}
    depth, width = MODES[mode]
    with torch.inference_mode():
        ((scores, index, stop),) = net(
            t["keypoints0"],
            t["descriptors0"],
            t["image_size0"],
            t["keypoints1"],
            t["descriptors1"],
            t["image_size1"],
            depth_confidence=depth,
            width_confidence=width,
        )
    m, rows, cols = len(ref["keypoints0"]), index[: scores.shape[0]], index[scores.shape[0] :]
    best, m0 = scores.max(1)
    mutual = torch.arange(len(m0)) == scores.max(0).indices[m0]
    conf = torch.where(mutual, best.exp(), torch.zeros(()))
    matches0, scores0 = np.full(m, -1), np.zeros(m, np.float32)
    keep = (mutual & (conf > 0.1)).numpy()
    matches0[rows.numpy()[keep]] = cols.numpy()[m0.numpy()[keep]]
    scores0[rows.numpy()] = conf.numpy()
    return matches0, scores0, stop


@pytest.mark.parametrize("name", PAIRS)
def test_full_mode_matches_official_match_by_match(net: LightGlueNet, name: str) -> None:
    ref = _fixture(name)
    matches0, scores0, stop = _official_layout(net, ref, "full")
    want, want_scores = ref["full_matches0"], ref["full_matching_scores0"]
    assert stop == int(ref["full_stop"]) == 9
    # a row differs when its match or its mutual status (score zero or not) differs
    differ = (matches0 != want) | ((scores0 > 0) != (want_scores > 0))
    assert differ.sum() <= 0.01 * len(want), f"{differ.sum()} rows differ"
    assert (want_scores[differ] < 0.2).all() and (scores0[differ] < 0.2).all()
    assert np.abs(scores0 - want_scores)[~differ].max() <= 1e-4
    assert (matches0 > -1).sum() == pytest.approx((want > -1).sum(), abs=0.01 * len(want))


@pytest.mark.parametrize("name", PAIRS)
def test_adaptive_mode_matches_official_loosely(net: LightGlueNet, name: str) -> None:
    ref = _fixture(name)
    matches0, _, stop = _official_layout(net, ref, "adaptive")
    want = ref["adaptive_matches0"]
    assert abs(stop - int(ref["adaptive_stop"])) <= 1
    ours = {(i, j) for i, j in enumerate(matches0) if j > -1}
    theirs = {(i, j) for i, j in enumerate(want) if j > -1}
    assert len(ours & theirs) >= 0.95 * len(theirs)
    assert len(ours) <= 1.05 * len(theirs) + 2


def _as_sets(found) -> list[dict[tuple[int, int], float]]:
    return [
        dict(zip(map(tuple, m.pairs.tolist()), m.confidence.tolist(), strict=True)) for m in found
    ]


@pytest.mark.parametrize("mode", MODES)
def test_batched_candidates_equal_one_pair_at_a_time(mode: str) -> None:
    """Different keypoint counts and image sizes in one batch, a 3-keypoint and an empty
    candidate: one forward pass gives what each pair gives alone."""
    depth, width = MODES[mode]
    kremlin, cafe, church = (
        _fixture(n) for n in ("wxbs_kremlin", "evd_cafe", "planar_churchill_1_3")
    )
    query = _features(kremlin, 0)
    cands = [
        _features(kremlin, 1),
        _features(kremlin, 1, 150),
        _features(cafe, 1),
        _features(church, 1, 3),
        LocalFeatures.empty(128, (640, 480)),
        _features(church, 1),
    ]
    conf = LightGlueConf(
        max_keypoints=256, depth_confidence=depth, width_confidence=width, batch_size=8
    )
    matcher = LightGlue(conf)
    batched = _as_sets(matcher.match_many(query, cands))
    single = _as_sets([matcher.match(query, c) for c in cands])
    assert len(batched[0]) > 30 and batched[4] == {} and single[4] == {}
    for b, s in zip(batched, single, strict=True):
        common = b.keys() & s.keys()
        assert len(common) >= 0.98 * max(len(b), len(s)) - 1
        assert all(abs(b[k] - s[k]) <= 1e-3 for k in common)


def test_matches_index_the_callers_rows() -> None:
    """Keypoints fed in any order, and more than max_keypoints of them: matches still name the
    caller's rows, and only the best-scoring keypoints take part."""
    ref = _fixture("wxbs_kremlin")
    query, cand = _features(ref, 0), _features(ref, 1)
    matcher = LightGlue(LightGlueConf(max_keypoints=300))
    want = matcher.match(query, cand)
    perm = np.random.default_rng(0).permutation(len(cand))
    shuffled = LocalFeatures(
        cand.keypoints[perm], cand.scores[perm], cand.descriptors[perm], cand.image_size
    )
    got = matcher.match(query, shuffled)
    assert {tuple(p) for p in want.pairs.tolist()} == {
        (i, int(perm[j])) for i, j in got.pairs.tolist()
    }
    assert want.pairs[:, 0].max() < 300 and want.pairs[:, 1].max() < 300
    assert (want.confidence > 0.1).all() and len(want) > 20


def test_bad_input_gives_clear_errors_or_no_matches(tmp_path) -> None:
    ref = _fixture("negative")
    matcher = LightGlue(LightGlueConf(max_keypoints=64))
    query = _features(ref, 0, 64)
    empty = LocalFeatures.empty(128, (100, 100))
    assert len(matcher.match(empty, query)) == 0 and len(matcher.match(query, empty)) == 0
    one = _features(ref, 1, 1)
    assert len(matcher.match(one, one)) <= 1
    other = LocalFeatures(query.keypoints, query.scores, np.ones((64, 256), np.float32), (9, 9))
    with pytest.raises(ConfigError, match="128-D descriptors, got 256-D"):
        matcher.match(query, other)
    with pytest.raises(ConfigError, match="no weights for local method 'r2d2'"):
        LightGlue(local_method="r2d2")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        LightGlue({"weights": str(tmp_path / "none.pth")})
    state = torch.load(resolve_weights(WEIGHTS["disk"], what="lg"), weights_only=True)
    state.pop("posenc.Wr.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_network(tmp_path / "broken.pth")
