"""Matchers as plug-ins: the registry, the plans, the rerank's stages, and the search path.

LightGlue runs here on the DISK features stored in ../shared/fixtures/lightglue (real image
pairs) at few keypoints, so the checks stay cheap; its parity is tests/test_lightglue.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from features.core import ConfigError
from features.types import LocalFeatures
from index.layout import IndexConfig
from retrieval.api import Retriever
from retrieval.cli import app
from retrieval.matchers import (
    MATCHERS,
    PLANS,
    check_plan,
    load_matcher,
    matcher_class,
    resolve_plan,
)
from retrieval.matchers.lightglue import LightGlueConf
from retrieval.matchers.mnn import MNN
from retrieval.matchers.rules import RULES, Rule, rule_for
from retrieval.matching import mutual_nn
from retrieval.rerank import (
    Candidate,
    RerankConf,
    count_inliers,
    rerank,
    rerank_sequential,
    run_plan,
    verify_pair,
)
from retrieval.search import SearchConf
from tests.conftest import ROOT, fixture_dir
from tests.corpus import MINI, Row, make_corpus, manifest

FIX = fixture_dir("lightglue")
CHEAP_LG = LightGlueConf(max_keypoints=192, filter_threshold=0.5)
CHEAP_RULES = {"lightglue": Rule(settings={"max_keypoints": 192, "filter_threshold": 0.5})}


def _pair(name: str) -> tuple[LocalFeatures, LocalFeatures]:
    with np.load(FIX / f"{name}.npz") as z:
        return tuple(  # type: ignore[return-value]
            LocalFeatures(
                z[f"keypoints{s}"],
                np.linspace(1, 0, len(z[f"keypoints{s}"]), dtype=np.float32),
                z[f"descriptors{s}"],
                (int(z[f"image_size{s}"][0]), int(z[f"image_size{s}"][1])),
            )
            for s in (0, 1)
        )


@pytest.fixture(scope="module")
def scene() -> tuple[LocalFeatures, dict[int, LocalFeatures]]:
    """The kremlin photo against its wide-baseline partner, a planar pair, EVD and unrelated
    photos (every candidate a real DISK image)."""
    kremlin0, kremlin1 = _pair("wxbs_kremlin")
    church0, church1 = _pair("planar_churchill_1_3")
    cafe0, cafe1 = _pair("evd_cafe")
    graffiti, _ = _pair("negative")
    cands = [kremlin1, church0, cafe0, church1, cafe1, graffiti, kremlin0]
    return kremlin0, {10 + i: f for i, f in enumerate(cands)}


def test_registry_names_every_matcher_and_lists_them_on_errors() -> None:
    assert set(MATCHERS) == {"mnn", "lightglue"}
    assert matcher_class("MNN") is MNN
    with pytest.raises(ConfigError, match="available: lightglue, mnn"):
        matcher_class("superglue")
    with pytest.raises(ConfigError, match="auto, mnn, lightglue, mnn\\+lightglue"):
        check_plan("mnn+superglue")
    assert PLANS == ("auto", "mnn", "lightglue", "mnn+lightglue")


def test_lightglue_without_weights_for_the_method_is_an_error_never_a_fallback() -> None:
    for plan in ("lightglue", "mnn+lightglue"):
        with pytest.raises(ConfigError, match="no weights for local method 'r2d2'"):
            IndexConfig.parse({"local_method": "r2d2", "matcher": plan})
        with pytest.raises(ConfigError, match="use --matcher mnn"):
            resolve_plan(plan, "sekd")
    assert IndexConfig.parse({"local_method": "r2d2", "matcher": "mnn"}).matcher == "mnn"
    # "auto" chooses among what the method allows, and says so in its name
    assert resolve_plan("auto", "r2d2") == "mnn"
    assert resolve_plan("auto", "disk", "cpu") == "mnn+lightglue"
    assert resolve_plan("auto", "disk", "cuda") == "lightglue"
    assert IndexConfig.parse({}).matcher == "auto"
    assert IndexConfig.parse({"matcher": "LightGlue"}).matcher == "lightglue"
    with pytest.raises(ConfigError, match="unknown matcher 'nn'"):
        IndexConfig.parse({"matcher": "nn"})
    assert SearchConf(matcher="MNN+LightGlue").matcher == "mnn+lightglue"
    with pytest.raises(ValueError, match="unknown matcher"):
        SearchConf(matcher="sift")


def test_mnn_plugin_is_mutual_nn_with_cosine_confidence(scene) -> None:
    query, feats = scene
    mnn = load_matcher("mnn")
    for f, found in zip(feats.values(), mnn.match_many(query, list(feats.values())), strict=True):
        assert np.array_equal(found.pairs, mutual_nn(query.descriptors, f.descriptors))
        cos = np.sum(query.descriptors[found.pairs[:, 0]] * f.descriptors[found.pairs[:, 1]], 1)
        np.testing.assert_allclose(found.confidence, cos, atol=1e-5)
    assert load_matcher("mnn") is mnn  # built once per settings


def test_two_stage_plan_lets_the_second_matcher_decide_the_top() -> None:
    cands = [Candidate(i, 1.0 - 0.1 * i) for i in range(6)]
    verdicts = {
        "mnn": {0: 5, 1: 30, 2: 0, 3: 20, 4: 40, 5: 13},
        "lightglue": {0: 90, 1: 10, 2: 0, 3: 60, 4: 200, 5: 200},
    }

    def score(name: str, some: list[Candidate]) -> list[Candidate]:
        least = 12 if name == "mnn" else 15
        n = verdicts[name]
        return [Candidate(c.id, c.global_score, n[c.id], n[c.id] >= least, name) for c in some]

    conf = RerankConf(lightglue_top=3, settled_inliers=None)
    got = run_plan(cands, score, conf, "mnn+lightglue")
    # mnn order: 4 (40), 1 (30), 3 (20), 5 (13), then 0, 2; LightGlue re-scores 4, 1, 3
    assert [(c.id, c.matcher) for c in got] == [
        (4, "lightglue"),
        (3, "lightglue"),
        (5, "mnn"),
        (0, "mnn"),
        (1, "lightglue"),
        (2, "mnn"),
    ]
    assert [c.id for c in run_plan(cands, score, conf, "lightglue")] == [4, 5, 0, 3, 1, 2]


@pytest.mark.parametrize("best", [29, 30, 45])
def test_a_query_the_first_stage_settled_skips_the_second(best: int) -> None:
    cands = [Candidate(i, 1.0 - 0.1 * i) for i in range(6)]
    asked: dict[str, list[int]] = {"mnn": [], "lightglue": []}
    second = {0: 50, 1: 20, 2: 14, 3: 60, 4: 0, 5: 0}

    def score(name: str, some: list[Candidate]) -> list[Candidate]:
        asked[name] += [c.id for c in some]
        n = {0: 5, 1: 12, 2: best, 3: 0, 4: 0, 5: 0} if name == "mnn" else second
        return [Candidate(c.id, c.global_score, n[c.id], n[c.id] >= 12, name) for c in some]

    # mutual NN order: 2 (best), 1 (12), then 0, 3, 4, 5 by global score
    conf = RerankConf(lightglue_top=4, settled_inliers=30, settled_stops_second=False)
    got = run_plan(cands, score, conf, "mnn+lightglue")
    if best >= 30:  # mutual NN verified its best candidate with 30 inliers or more: settled
        assert asked["lightglue"] == [] and [c.id for c in got][:2] == [2, 1]
        return
    assert asked["lightglue"] == [2, 1, 0, 3]  # LightGlue re-scores the best four
    assert [(c.id, c.matcher) for c in got[:4]] == [
        (3, "lightglue"), (0, "lightglue"), (1, "lightglue"), (2, "lightglue")
    ]  # fmt: skip
    # stopping at the first candidate LightGlue settles: 2 (14), 1 (20), 0 (50) and no more
    asked["lightglue"] = []
    stops = run_plan(
        cands, score, conf.model_copy(update={"settled_stops_second": True}), "mnn+lightglue"
    )
    assert asked["lightglue"] == [2, 1, 0]
    assert [(c.id, c.matcher) for c in stops[:4]] == [
        (0, "lightglue"), (1, "lightglue"), (2, "lightglue"), (3, "mnn")
    ]  # fmt: skip
    asked["lightglue"] = []
    always = conf.model_copy(update={"settled_inliers": None})
    assert [c.id for c in run_plan(cands, score, always, "mnn+lightglue")] == [c.id for c in got]
    assert asked["lightglue"] == [2, 1, 0, 3]


@pytest.mark.parametrize("plan", ["lightglue", "mnn+lightglue"])
def test_batched_rerank_equals_sequential_with_lightglue(scene, plan: str) -> None:
    query, feats = scene
    cands = [Candidate(i, 1.0 - 0.01 * n) for n, i in enumerate(feats)]
    conf = RerankConf(rules=CHEAP_RULES, lightglue_top=4, settled_inliers=None)
    got = rerank(query, cands, lambda ids: [feats[i] for i in ids], conf, matcher=plan)
    want = rerank_sequential(query, cands, feats.__getitem__, conf, matcher=plan)
    assert [c.id for c in got if c.verified] == [c.id for c in want if c.verified]
    for g, w in zip(got, want, strict=True):  # float rounding of a batch: a match or two
        assert g.id == w.id and g.matcher == w.matcher and abs(g.inliers - w.inliers) <= 2
    assert got[0].id in (10, 16) and got[0].matcher == "lightglue"  # kremlin itself / its pair
    if plan == "mnn+lightglue":
        assert {c.matcher for c in got} == {"mnn", "lightglue"}


def test_verify_pair_uses_the_matcher_that_ranked_the_result(scene) -> None:
    query, feats = scene
    conf = RerankConf(rules=CHEAP_RULES)
    lg = verify_pair(query, feats[10], conf, "lightglue")
    assert lg.matcher == "lightglue" and lg.confidence is not None
    assert (lg.confidence > 0.5).all() and lg.verified == (
        lg.inliers >= conf.rule("lightglue").min_inliers
    )
    assert lg.inliers == count_inliers(query, [feats[10]], conf, matcher="lightglue")[0]
    mnn = verify_pair(query, feats[10], conf)
    assert mnn.matcher == "mnn" and mnn.inliers == count_inliers(query, [feats[10]], conf)[0]
    assert len(mnn.matches) != len(lg.matches)


def test_degenerate_candidates_verify_nothing(scene) -> None:
    query, feats = scene
    few = LocalFeatures(query.keypoints[:3], query.scores[:3], query.descriptors[:3], (50, 5000))
    cands = [LocalFeatures.empty(128, (640, 480)), few, feats[10]]
    conf = RerankConf(rules=CHEAP_RULES)
    for plan in ("mnn", "lightglue"):
        assert count_inliers(query, cands, conf, matcher=plan)[:2] == [0, 0]
        assert count_inliers(LocalFeatures.empty(128, (9, 9)), cands, conf, matcher=plan) == [
            0,
            0,
            0,
        ]
    assert count_inliers(query, [], conf, matcher="lightglue") == []


# --- through the search path ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> Retriever:
    rows = manifest()
    keep = [r for r in rows if r.group in ("tower_bridge", "united_states_capitol")]
    keep += [r for r in rows if r.kind == "distractor"][:3]
    root = tmp_path_factory.mktemp("matchers")
    corpus = make_corpus(root / "corpus", keep)
    options = {
        "local_conf": {"resize_max": 320, "max_keypoints": 256},
        "global_conf": {"resize_max": 256, "scales": [1.0]},
    }
    return Retriever.build(corpus, root / "idx", **options)


def _query(row_group: str = "tower_bridge") -> Path:
    return sorted((MINI / "images" / row_group).glob("*.jpg"))[0]


def test_search_runs_the_chosen_matcher_and_says_which(retriever: Retriever) -> None:
    image = _query()
    assert retriever.config.matcher == "auto"
    # the query is in the index: mutual NN settles it, and LightGlue does not run by default
    settled = retriever.search(image, rerank_conf=RerankConf(rules=CHEAP_RULES))
    assert settled.matcher == "mnn+lightglue" and {m.matcher for m in settled.matches} == {"mnn"}
    cheap = RerankConf(rules=CHEAP_RULES, lightglue_top=2, settled_inliers=None)
    default = retriever.search(image, rerank_conf=cheap)
    assert default.matcher == "mnn+lightglue"  # auto on a CPU with DISK
    assert [m.matcher for m in default.matches[:2]] == ["lightglue"] * 2
    assert {m.matcher for m in default.matches[2:]} == {"mnn"}
    only = retriever.search(image, matcher="lightglue", rerank_conf=cheap)
    assert only.matcher == "lightglue" and {m.matcher for m in only.matches} == {"lightglue"}
    assert only.matches[0].label == "tower_bridge" and only.matches[0].verified
    mnn = retriever.search(image, matcher="mnn")
    assert mnn.matcher == "mnn" and {m.matcher for m in mnn.matches} == {"mnn"}
    flat = retriever.search(image, rerank=False)
    assert flat.matcher == "" and {m.matcher for m in flat.matches} == {""}
    # the query itself leaves the shortlist (and so the LightGlue stage) when excluded
    path = next(m.path for m in mnn.matches if m.path.endswith(image.name))
    left = retriever.search(image, exclude={path}, rerank_conf=cheap)
    assert path not in {m.path for m in left.matches}
    assert all(m.matcher == "lightglue" for m in left.matches[:2])


def test_expansion_is_on_by_default_and_the_cli_turns_it_off(retriever: Retriever) -> None:
    image = _query()
    default = retriever.search(image, rerank=False, k=5)
    on = retriever.search(image, rerank=False, k=5, qe=5, dba=3)
    off = retriever.search(image, rerank=False, k=5, qe=0, dba=0)
    assert [(m.id, m.global_score) for m in default.matches] == [
        (m.id, m.global_score) for m in on.matches
    ]
    assert [m.global_score for m in default.matches] != [m.global_score for m in off.matches]
    index = str(retriever.paths.root)
    args = ["query", str(image), "--index", index, "--no-rerank", "-k", "5", "--json"]
    plain = CliRunner().invoke(app, [*args, "--qe", "0", "--dba", "0"])
    assert plain.exit_code == 0, plain.output
    got = json.loads(plain.output)[0]["results"]
    assert [r["id"] for r in got] == [m.id for m in off.matches]
    np.testing.assert_allclose(
        [r["global_score"] for r in got], [m.global_score for m in off.matches], atol=1e-6
    )


def test_query_cli_matcher_option(retriever: Retriever) -> None:
    index = str(retriever.paths.root)
    bad = CliRunner().invoke(app, ["query", str(_query()), "--index", index, "--matcher", "x"])
    assert bad.exit_code == 1 and "unknown matcher 'x'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    out = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "query", str(_query()), "--index", index]
        + ["--matcher", "mnn", "--json", "-k", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    results = json.loads(out.stdout)[0]["results"]
    assert len(results) == 3 and {r["matcher"] for r in results} == {"mnn"}


def test_index_matcher_is_stored_and_checked(retriever: Retriever, tmp_path: Path) -> None:
    rows = [Row(r.path, r.group, r.kind) for r in manifest() if r.group == "oxford_all_souls"]
    corpus = make_corpus(tmp_path / "c", rows)
    options = {
        "local_conf": {"resize_max": 256, "max_keypoints": 64},
        "global_conf": {"resize_max": 256, "scales": [1.0]},
    }
    built = Retriever.build(corpus, tmp_path / "idx", matcher="mnn", **options)
    assert built.config.matcher == "mnn"
    assert built.search(_query("oxford_all_souls")).matcher == "mnn"
    with pytest.raises(ConfigError, match="matcher differ"):
        Retriever.build(corpus, tmp_path / "idx", matcher="lightglue", **options)


def test_eval_compares_matchers_side_by_side_per_kind(tmp_path: Path) -> None:
    from retrieval.evaluation import landmarks_mini, run_eval
    from retrieval.evaluation.runner import format_table, summary_rows, to_dict

    groups = ["tower_bridge", "wxbs_kremlin", "lightglue_dsc_building"]
    mini = landmarks_mini(MINI, queries="all", groups=groups, max_distractors=2)
    assert {q.kind for q in mini.queries} == {"landmark", "wxbs", "place"}
    cheap = RerankConf(rules=CHEAP_RULES, lightglue_top=2)
    variants = {
        f"rerank {m}": SearchConf(matcher=m, shortlist=5, rerank_conf=cheap)
        for m in ("mnn", "mnn+lightglue")
    }
    config = IndexConfig.parse(
        {
            "local_conf": {"resize_max": 320, "max_keypoints": 256},
            "global_conf": {"resize_max": 256, "scales": [1.0]},
        }
    )
    result = run_eval(mini, tmp_path / "idx", config, variants=variants)
    assert list(result.modes) == ["global", "rerank mnn", "rerank mnn+lightglue"]
    for mode in result.modes.values():
        assert set(mode.kinds) == {"landmark", "place", "wxbs"}
        assert mode.kinds["wxbs"].n_queries == 2 and mode.kinds["landmark"].n_queries == 4
    names = [name for name, _ in summary_rows(result)]
    assert {"wxbs mAP", "place mP@10", "landmark recall@1"} <= set(names)
    assert "per_query_ap" not in json.dumps(to_dict(result)["modes"])
    assert format_table(result).columns[-1].header == "rerank mnn+lightglue"
    # the global stage and extraction are shared: each mode is charged what it used
    stages = result.modes["rerank mnn+lightglue"].stage_seconds
    assert "lightglue" in stages and "local" in stages
    assert "local" not in result.modes["global"].stage_seconds
    # leave-one-out queries described by their stored features: nothing extracted, the same
    # global rankings (stored float32), the rerank's within the float16 rounding of descriptors
    again = run_eval(
        mini,
        tmp_path / "idx",
        config,
        search=SearchConf(matcher="mnn", shortlist=5),
        stored_queries=True,
    )
    assert again.build.reused and any("stored features" in n for n in again.notes)
    for mode, before in (("global", "global"), ("rerank", "rerank mnn")):
        got, want = again.modes[mode].protocols["all"], result.modes[before].protocols["all"]
        assert got.map == pytest.approx(want.map, abs=0.05 if mode == "rerank" else 1e-6)
    assert {"local", "global"}.isdisjoint(again.modes["rerank"].stage_seconds)


def test_rules_come_from_one_table_with_overrides() -> None:
    """The rerank's rule is the table's, an override changes only what it names, and a method
    without a measured row of its own takes the matcher's first measured one."""
    conf = RerankConf()
    assert conf.rule("lightglue", "disk") == RULES["lightglue", "disk"]
    assert conf.rule("mnn", "r2d2") == RULES["mnn", "*"]
    assert conf.rule("lightglue", "aliked-unmeasured") == RULES["lightglue", "disk"]
    tuned = RerankConf(rules={"lightglue": Rule(min_inliers=20)}).rule("lightglue", "disk")
    assert tuned.min_inliers == 20 and tuned.ransac == RULES["lightglue", "disk"].ransac
    assert tuned.settings == RULES["lightglue", "disk"].settings
    merged = rule_for("lightglue", "disk", Rule(settings={"max_keypoints": 256}))
    assert merged.settings == {"max_keypoints": 256, "filter_threshold": 0.7}
    lg = conf.matcher_conf("lightglue", "disk")
    assert isinstance(lg, LightGlueConf) and lg.filter_threshold == 0.7
    assert LightGlueConf().filter_threshold == 0.1  # the official default, for parity


def test_legacy_rerank_fields_map_onto_rules() -> None:
    """RerankConf's flat fields of earlier versions still parse, as rule overrides."""
    old = RerankConf.model_validate(
        {
            "min_inliers": 5,
            "ratio": 0.9,
            "lightglue": CHEAP_LG.model_dump(),
            "lightglue_min_inliers": 7,
            "lightglue_ransac": {"model": "homography", "threshold": 6.0},
        }
    )
    mnn, lg = old.rule("mnn"), old.rule("lightglue")
    assert (mnn.min_inliers, (mnn.settings or {})["ratio"]) == (5, 0.9)
    assert lg.min_inliers == 7 and lg.ransac is not None and lg.ransac.threshold == 6.0
    assert old.matcher_conf("lightglue") == CHEAP_LG
    with pytest.raises(ConfigError):
        RerankConf(rules={"lightglue": Rule(settings={"bogus": 1})}).matcher_conf("lightglue")
