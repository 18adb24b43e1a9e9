"""run_eval end to end on real photos: a landmarks-mini subset, then a synthetic dataset in the
Revisited Oxford layout that shares its index (its files are byte copies, so the build stores
them as duplicates and extracts nothing).

Cheap settings keep this under a minute on a laptop CPU: 320 px, 256 DISK keypoints.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from features.core import ConfigError
from index.layout import IndexConfig
from retrieval.api import Recognition, Retriever, SearchResult
from retrieval.evaluation import (
    PlotError,
    format_table,
    landmarks_mini,
    plot,
    revisited,
    run_eval,
    write_json,
)
from retrieval.evaluation.metrics import (
    Prediction,
    Relevance,
    global_average_precision,
    score_query,
)
from retrieval.evaluation.runner import EvalResult, _predict
from tests.conftest import DATA

MINI = DATA / "landmarks-mini"
CHEAP = {
    "local_conf": {"resize_max": 320, "max_keypoints": 256},
    "global_conf": {"resize_max": 320},
}
TB = "images/tower_bridge/superglue_london_bridge_{}.jpg"
USC = "images/united_states_capitol/superglue_united_states_capitol_{}.jpg"


@pytest.fixture(scope="module")
def mini():
    return landmarks_mini(MINI, groups=["tower_bridge", "united_states_capitol"], max_distractors=2)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval") / "index"


@pytest.fixture(scope="module")
def mini_result(mini, index_dir) -> EvalResult:
    return run_eval(mini, index_dir, IndexConfig.parse(CHEAP))


def _render(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


# --- landmarks-mini subset -----------------------------------------------------------------------


def test_mini_subset_builds_and_scores_both_modes(mini, mini_result) -> None:
    r = mini_result
    assert not r.build.reused and r.build.indexed == 6 and not r.build.failed
    assert (r.n_queries, r.n_database) == (2, 6)
    assert list(r.modes) == ["global", "rerank"]
    assert r.config["local_conf"] == CHEAP["local_conf"]
    for mode in r.modes.values():
        m = mode.protocols["all"]
        assert m.n_queries == 2 and 0.0 <= m.map <= 1.0
        assert mode.gap is not None and mode.seconds_per_query > 0
    # Tower Bridge: the rerank verifies the right images (~90 inliers for the best one) and the
    # vote names the landmark. (The capitol pair is weaker at 320 px, so not asserted here.)
    tb = r.queries[0]
    assert tb.name.startswith("images/tower_bridge/")
    assert tb.top["rerank"][0].startswith("images/tower_bridge/")
    assert tb.ap["rerank"]["all"] == 1.0
    pred = tb.prediction["rerank"]
    assert pred is not None and pred.label == "tower_bridge" and pred.confidence > 0.5


def test_per_query_results_agree_with_the_rankings(mini, mini_result) -> None:
    # The database has 6 images, so `top` holds each full ranking.
    for mode, metrics in mini_result.modes.items():
        for q, r in zip(mini.queries, mini_result.queries, strict=True):
            assert sorted(r.top[mode]) == sorted(im.rel for im in mini.database)
            expected = score_query(r.top[mode], Relevance(q.easy, q.junk)).ap
            assert r.ap[mode]["all"] == pytest.approx(expected)
        aps = [r.ap[mode]["all"] for r in mini_result.queries]
        assert metrics.protocols["all"].map == pytest.approx(sum(aps) / len(aps))
        preds = {r.name: r.prediction[mode] for r in mini_result.queries}
        solution = {q.name: q.labels for q in mini.queries}
        assert metrics.gap == pytest.approx(global_average_precision(preds, solution))


def test_table_json_and_plot(mini_result, tmp_path) -> None:
    text = _render(format_table(mini_result))
    for row in ("mAP", "mP@10", "recall@1", "GAP", "accuracy", "gain"):
        assert row in text
    data = json.loads(write_json(mini_result, tmp_path / "out" / "r.json").read_text())
    assert data["dataset"] == "landmarks-mini[first]"
    assert set(data["modes"]) == {"global", "rerank"}
    assert "per_query_ap" not in data["modes"]["global"]["protocols"]["all"]
    assert data["queries"][0]["ap"]["rerank"]["all"] == mini_result.queries[0].ap["rerank"]["all"]
    png = plot(mini_result, tmp_path / "ap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(mini_result, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotError, match=r"pip install 'retr\[eval\]'"):
        plot(mini_result, tmp_path / "ap.png")


def test_second_run_reuses_the_index(mini, mini_result, index_dir) -> None:
    again = run_eval(mini, index_dir, rerank=False)
    assert again.build.reused
    assert list(again.modes) == ["global"]
    assert again.modes["global"].protocols == mini_result.modes["global"].protocols
    with pytest.raises(PlotError, match="rerank=True"):
        plot(again, index_dir / "never.png")


def test_options_that_contradict_the_index_are_refused(mini, mini_result, index_dir) -> None:
    with pytest.raises(ConfigError, match="local_conf"):
        run_eval(mini, index_dir, IndexConfig.parse({"local_conf": {"max_keypoints": 64}}))


def test_another_index_or_folder_is_refused_and_left_alone(
    mini, mini_result, index_dir, tmp_path: Path
) -> None:
    """Issue 24: a benchmark pointed at another corpus's index added a whole database to it."""
    foreign = tmp_path / "foreign"
    shutil.copytree(index_dir, foreign, symlinks=True)  # its corpus is index_dir/corpus
    shutil.rmtree(foreign / "corpus")
    before = sorted((p.relative_to(foreign), p.stat().st_mtime_ns) for p in foreign.rglob("*"))
    with pytest.raises(ConfigError, match="not by an evaluation: pass a new --index folder"):
        run_eval(mini, foreign)
    assert sorted((p.relative_to(foreign), p.stat().st_mtime_ns) for p in foreign.rglob("*")) == (
        before
    )
    busy = tmp_path / "photos"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="folder with other files and no index"):
        run_eval(mini, busy)
    assert [p.name for p in busy.iterdir()] == ["holiday.jpg"]


def test_recognition_ignores_junk_such_as_the_query_itself(mini_result, index_dir) -> None:
    # Leave-one-out: the query is indexed, would come first with score 1, and is junk.
    retriever = Retriever.open(index_dir)
    own = TB.format("49190386_5209386933")
    with_self = retriever.search(MINI / own, k=3)
    assert with_self.matches[0].path == own and with_self.matches[0].global_score > 0.99
    without = retriever.search(MINI / own, k=3, exclude={own})
    assert own not in {m.path for m in without.matches}
    assert own not in {m.path for m in without.recognition.evidence}
    assert _predict(without, "global") == Prediction(
        without.matches[0].label or "", without.matches[0].global_score
    )
    abstain = SearchResult([], Recognition("unknown", 0.0, []))
    assert _predict(abstain, "rerank") is None and _predict(abstain, "global") is None


# --- Revisited layout ----------------------------------------------------------------------------


def _revisited_copy(root: Path) -> Path:
    """ROxford layout from byte copies of the mini images; queries are cropped at run time."""
    files = {
        "tb_a": TB.format("49190386_5209386933"),
        "tb_b": TB.format("78916675_4568141288"),
        "tb_c": TB.format("94185272_3874562886"),
        "usc_a": USC.format("98169888_3347710852"),
        "street": "distractors/vpr_sf_d_db1.jpg",
        "q_tb": TB.format("19481797_2295892421"),
        "q_usc": USC.format("26757027_6717084061"),
    }
    (root / "jpg").mkdir(parents=True)
    for name, rel in files.items():
        shutil.copyfile(MINI / rel, root / "jpg" / f"{name}.jpg")
    w, h = Image.open(root / "jpg" / "q_tb.jpg").size
    gnd = {
        "imlist": ["tb_a", "tb_b", "tb_c", "usc_a", "street"],
        "qimlist": ["q_tb", "q_usc"],
        "gnd": [
            {"bbx": [0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h], "easy": [0, 1], "hard": [2], "junk": []},
            {"bbx": [-10, -10, 5000, 5000], "easy": [3], "hard": [], "junk": [4]},  # clipped
        ],
    }
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(gnd, f)
    return root


def test_revisited_layout_end_to_end(mini_result, index_dir, tmp_path) -> None:
    dataset = revisited("roxford5k", _revisited_copy(tmp_path / "roxford5k"))
    r = run_eval(dataset, index_dir)
    # Same bytes as indexed mini images: recorded as duplicates, nothing extracted.
    assert not r.build.reused and r.build.indexed == 0 and r.build.duplicates == 5
    assert r.protocols == ("easy", "medium", "hard")
    wanted = {im.rel for im in dataset.database}
    for q in r.queries:
        for mode in ("global", "rerank"):
            assert set(q.top[mode]) == wanted  # duplicates ranked, other index images dropped
    assert any("not in this dataset's database" in n for n in r.notes)
    q_tb, q_usc = r.queries
    assert q_usc.ap["rerank"]["hard"] is None  # no hard positive: skipped
    assert r.modes["rerank"].protocols["hard"].n_queries == 1
    assert r.modes["rerank"].protocols["medium"].n_queries == 2
    assert q_tb.top["rerank"][0].startswith("jpg/tb_")
    assert r.modes["rerank"].gap is None  # no recognition ground truth
    text = _render(format_table(r))
    assert "E mAP" in text and "H mP@5" in text and "GAP" not in text


# --- whole landmarks-mini set (minutes on a CPU) -------------------------------------------------


@pytest.mark.slow
def test_whole_mini_set(tmp_path) -> None:
    r = run_eval(landmarks_mini(MINI), tmp_path / "index", IndexConfig.parse(CHEAP))
    assert (r.n_queries, r.n_database) == (8, 173)
    assert r.build.indexed == 173 and not r.build.failed and not r.notes
    before, after = r.modes["global"], r.modes["rerank"]
    # Measured with these settings (EfficientNet-Lite2 global): mAP 87.8 -> 91.8, recall@1 100
    # -> 100 (with Lite0: mAP 65.4 -> 84.9, recall@1 75 -> 100, GAP 73.2 -> 100).
    assert before.protocols["all"].map > 0.5
    assert after.protocols["all"].map >= before.protocols["all"].map
    assert after.protocols["all"].recall[1] >= 0.875
    assert after.gap is not None and after.gap >= 0.85, after.gap
