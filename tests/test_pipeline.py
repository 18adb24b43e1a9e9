"""End to end on real photos: build on the landmark and place groups plus distractors, hold out
one image per landmark group, and query each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from features.core import ConfigError
from retrieval import Retriever
from retrieval.cli import app
from tests.corpus import FAST_OPTIONS, MINI, heldout_queries, make_corpus, manifest

ROWS = manifest()
QUERIES = heldout_queries(ROWS)
DATABASE = [r for r in ROWS if r.kind in ("landmark", "place", "distractor") and r not in QUERIES]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mini")
    corpus = make_corpus(root / "corpus", DATABASE)
    Retriever.build(corpus, root / "idx", **FAST_OPTIONS)
    return corpus, root / "idx"


@pytest.fixture(scope="session")
def retriever(built: tuple[Path, Path]) -> Retriever:
    return Retriever.open(built[1])


def test_build_indexes_every_database_image(retriever: Retriever) -> None:
    info = retriever.info()
    assert info["images"] == {"indexed": len(DATABASE)}
    assert info["vectors"] == len(DATABASE)


@pytest.mark.parametrize("query", QUERIES, ids=[q.group for q in QUERIES])
def test_heldout_query_is_recognised_and_ranks_its_group_first(retriever: Retriever, query) -> None:
    image = MINI / query.path
    result = retriever.search(image, k=10)
    matches = result.matches
    assert matches[0].label == query.group, [(m.path, m.inliers) for m in matches[:5]]
    assert matches[0].verified
    recognition = result.recognition
    assert recognition.label == query.group
    assert 0 < recognition.confidence <= 1
    assert all(m.label == query.group for m in recognition.evidence)
    # one path: recognize() and a search showing fewer results name the same landmark
    assert retriever.recognize(image) == recognition
    assert retriever.search(image, k=1).recognition == recognition
    assert {"global", "local", "faiss", "matching", "ransac"} <= set(result.timings)


def test_rerank_orders_verified_by_inliers_then_global(retriever: Retriever) -> None:
    matches = retriever.search(MINI / QUERIES[0].path, k=30).matches
    verified = [m for m in matches if m.verified]
    assert verified and matches[: len(verified)] == verified
    assert [m.inliers for m in verified] == sorted((m.inliers for m in verified), reverse=True)
    rest = matches[len(verified) :]
    assert [m.global_score for m in rest] == sorted((m.global_score for m in rest), reverse=True)


def test_no_rerank_is_the_global_order(retriever: Retriever) -> None:
    matches = retriever.search(MINI / QUERIES[1].path, k=20, rerank=False).matches
    scores = [m.global_score for m in matches]
    assert scores == sorted(scores, reverse=True)
    assert not any(m.verified for m in matches) and all(m.inliers == 0 for m in matches)


def test_api_accepts_path_array_and_pil(retriever: Retriever) -> None:
    path = MINI / QUERIES[2].path
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path = retriever.search(path, k=5).matches
    by_array = retriever.search(rgb, k=5).matches
    by_pil = retriever.search(Image.fromarray(rgb), k=5).matches
    assert [m.id for m in by_path] == [m.id for m in by_array] == [m.id for m in by_pil]
    assert [m.inliers for m in by_path] == [m.inliers for m in by_pil]


def test_cli_query_json_and_table(built: tuple[Path, Path]) -> None:
    _, idx = built
    runner = CliRunner()
    image = str(MINI / QUERIES[3].path)
    out = runner.invoke(app, ["query", image, "--index", str(idx), "-k", "3", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)[0]
    assert result["landmark"] == QUERIES[3].group and len(result["results"]) == 3
    assert {"faiss", "catalog"} <= set(result["timings"]) and result["generation"] >= 1
    table = runner.invoke(app, ["query", image, "--index", str(idx), "-k", "3"])
    assert table.exit_code == 0 and f"landmark: {QUERIES[3].group}" in table.stdout
    info = runner.invoke(app, ["index", "info", "--index", str(idx)])
    assert info.exit_code == 0 and "images indexed" in info.stdout


def test_cli_query_on_missing_file_prints_one_line_and_exits_1(built: tuple[Path, Path]) -> None:
    _, idx = built
    out = CliRunner().invoke(app, ["query", "/no/such/image.jpg", "--index", str(idx)])
    assert out.exit_code == 1
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "/no/such/image.jpg" in lines[0] and "no such file" in lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-k", "0"], "k: Input should be greater than or equal to 1"),
        (["-k", "-3"], "k: Input should be greater than or equal to 1"),
        (["--shortlist", "0"], "shortlist: Input should be greater than or equal to 1"),
        (["--shortlist", "-5"], "shortlist: Input should be greater than or equal to 1"),
    ],
)
def test_impossible_query_options_are_one_line_errors(built, args, words) -> None:
    _, idx = built
    image = str(MINI / QUERIES[0].path)
    out = CliRunner().invoke(app, ["query", image, "--index", str(idx), *args])
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert out.exit_code == 1 and len(lines) == 1 and words in lines[0], out.output


def test_impossible_search_options_are_refused_by_the_api(retriever: Retriever) -> None:
    image = MINI / QUERIES[0].path
    for bad in ({"k": 0}, {"k": -1}, {"shortlist": 0}, {"vote_top": 0}, {"kk": 3}):
        with pytest.raises(ConfigError):
            retriever.search(image, **bad)


def test_installed_retr_runs_as_a_subprocess(built: tuple[Path, Path]) -> None:
    _, idx = built
    exe = Path(sys.executable).parent / "retr"
    assert exe.exists(), "the console script `retr` is not installed: run the README setup"
    image = str(MINI / QUERIES[4].path)
    done = subprocess.run(
        [str(exe), "query", image, "--index", str(idx), "-k", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["landmark"] == QUERIES[4].group
