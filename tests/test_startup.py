"""Start-up is part of the interface: `retr --help` and the commands that run no network import
neither torch nor a plug-in, and nothing but the entry point imports the CLI.

Each command runs in a fresh interpreter (this one has torch loaded already), and the test
asserts which modules that interpreter loaded, never how long it took.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic import run

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from typer.testing import CliRunner
from retrieval.cli import app

result = CliRunner().invoke(app, json.loads(sys.argv[1]))
heavy = sorted(
    m for m in sys.modules
    if m == "torch" or m.startswith(("torch.", "features.local.", "features.delg."))
    or m in ("retrieval.matchers.lightglue", "retrieval.matchers.mnn", "retrieval.api")
)
print(json.dumps({"exit": result.exit_code, "output": result.output, "heavy": heavy}))
"""
"""Runs `retr ARGS` through the typer app and reports the exit code, the output, and every
loaded module of torch, of a plug-in (local methods, DELG models, matchers) or of the API."""


def _cli(*args: str) -> dict:
    """`retr ARGS` in a fresh interpreter: {"exit", "output", "heavy"}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "RETR_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small index of synthetic features (no extractor runs): 12 images in 3 labels, then one
    more added, so that it has two segments to compact."""
    root = tmp_path_factory.mktemp("startup") / "idx"
    run(str(root), "build", [f"g{i % 3}/img{i}.jpg" for i in range(12)])
    run(str(root), "add", ["g9/extra.jpg"])
    return root


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["index", "--help"],
        ["index", "build", "--help"],
        ["query", "--help"],
        ["match", "--help"],
        ["eval", "--help"],
        ["serve", "--help"],
        ["train", "global", "--help"],
        ["train", "whitening", "--help"],
        ["convert", "delg", "--help"],
    ],
    ids=" ".join,
)
def test_help_loads_no_network(args: list[str]) -> None:
    out = _cli(*args)
    assert out["exit"] == 0, out["output"]
    assert "Usage" in out["output"]
    assert out["heavy"] == []


def test_help_shows_the_config_defaults() -> None:
    """The option defaults still come from the config models (SearchConf, LoopConf)."""
    from retrieval.search_conf import SearchConf
    from retrieval.training.confs import LoopConf

    query = _cli("query", "--help")["output"]
    assert f"[default: {SearchConf().shortlist}]" in query
    train = _cli("train", "global", "--help")["output"]
    assert f"[default: {LoopConf().steps}]" in train


def test_index_info_check_and_repair_load_no_network(index: Path) -> None:
    info = _cli("index", "info", "--index", str(index), "--json")
    assert info["exit"] == 0, info["output"]
    assert json.loads(info["output"])["images"] == {"indexed": 13}
    assert info["heavy"] == []
    for deep in ([], ["--deep"]):
        check = _cli("index", "check", "--index", str(index), *deep)
        assert check["exit"] == 0, check["output"]
        assert f"{index}: ok (13 images" in check["output"].replace("\n", "")
        assert check["heavy"] == []
    repaired = _cli("index", "repair", "--index", str(index))
    assert repaired["exit"] == 0, repaired["output"]
    assert repaired["heavy"] == []


def test_index_remove_and_compact_load_no_network(index: Path) -> None:
    removed = _cli("index", "remove", "g9/extra.jpg", "--index", str(index))
    assert removed["exit"] == 0, removed["output"]
    assert "1 removed" in removed["output"]
    assert removed["heavy"] == []
    compacted = _cli("index", "compact", "--index", str(index))
    assert compacted["exit"] == 0, compacted["output"]
    assert "1 segments in" in compacted["output"].replace("\n", "")
    assert compacted["heavy"] == []
    info = _cli("index", "info", "--index", str(index), "--json")
    assert json.loads(info["output"])["images"] == {"indexed": 12}


def test_index_errors_load_no_network(tmp_path: Path) -> None:
    """A missing index is one line and exit 1, still without torch."""
    out = _cli("index", "info", "--index", str(tmp_path / "none"))
    assert out["exit"] == 1
    assert "is not a retr index" in out["output"]
    assert out["heavy"] == []


def test_features_list_loads_no_plugin() -> None:
    out = _cli("features", "list")
    assert out["exit"] == 0, out["output"]
    from features.registry import LOCAL_METHODS

    for name, method in LOCAL_METHODS.items():
        assert name in out["output"]
        assert method.licence.split(" ")[0] in out["output"]
    assert out["heavy"] == []


def test_registry_metadata_is_what_the_plugins_use() -> None:
    """`retr features list` shows the registry's licence and checkpoint; the plug-in class
    (imported here) must carry the same ones."""
    from features.registry import LOCAL_METHODS, local_class

    for name, method in LOCAL_METHODS.items():
        cls = local_class(name)
        assert cls.name == name
        assert (cls.licence, cls.weights_spec) == (method.licence, method.weights)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from a import b` counts
    as both a and a.b, so that `from retrieval import cli` is seen)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    assert 'retr = "retrieval.cli:app"' in (ROOT / "pyproject.toml").read_text()
    cli = ROOT / "retrieval" / "cli"
    importers = [
        str(p.relative_to(ROOT))
        for p in _sources("features", "index", "retrieval", "scripts")
        if cli not in p.parents
        and any(m == "retrieval.cli" or m.startswith("retrieval.cli.") for m in _imports(p))
    ]
    assert importers == []


def test_lower_layers_never_import_the_retrieval_layer() -> None:
    """features and index sit under retrieval: an import upward would be a circle."""
    upward = [
        str(p.relative_to(ROOT))
        for p in _sources("features", "index")
        if any(m == "retrieval" or m.startswith("retrieval.") for m in _imports(p))
    ]
    assert upward == []
