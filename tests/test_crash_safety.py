"""Crash safety: a real `retr` process killed with SIGKILL at every named step of build, add,
remove and update (index.faults: exact kill points, not timed ones) leaves an index that
`retr index check` finds sound, that queries answer as before or after the operation, and that
the rerun completes without redoing committed batches. Also: one writer at a time, and queries
running in one process while another adds and removes images see no error and no removed
image."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from index.check import check_index
from index.layout import IndexPaths
from index.manifest import Manifest
from index.writer import IndexWriter
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.updating import add_images, remove_images, update_images
from tests.corpus import MINI, TINY_OPTIONS

RETR = Path(sys.executable).parent / "retr"
SACRE = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))
BRIDGE = sorted((MINI / "images/tower_bridge").glob("*.jpg"))
SAN_MARCO = sorted((MINI / "images/piazza_san_marco").glob("*.jpg"))
BATCH = 2
"""Images per committed batch in these tests (RETR_COMMIT_IMAGES): 6 images = 3 batches."""


def _corpus(root: Path, files: dict[str, list[Path]]) -> Path:
    for group, paths in files.items():
        (root / group).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, root / group / p.name)
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RETR_OFFLINE": "1", "RETR_COMMIT_IMAGES": str(BATCH)}
    env.update(extra)
    return env


def _retr(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`retr ARGS` in a subprocess; with `fault`, SIGKILLed at that named point."""
    env = _env(**({"RETR_FAULT": fault} if fault else {}))
    done = subprocess.run([str(RETR), *args], env=env, capture_output=True, text=True, timeout=600)
    if fault:
        assert done.returncode == -signal.SIGKILL, (fault, done.returncode, done.stderr[-2000:])
    else:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def _build_args(corpus: Path, idx: Path) -> list[str]:
    return [
        "index", "build", str(corpus), "--index", str(idx), "-q",
        "--local-conf", json.dumps(TINY_OPTIONS["local_conf"]),
        "--global-conf", json.dumps(TINY_OPTIONS["global_conf"]),
    ]  # fmt: skip


Answers = dict[str, list[tuple[str, int]]]


def _answers(idx: Path) -> Answers:
    """What queries return: (path, inliers) of the top results of three fixed queries."""
    retriever = Retriever.open(idx)
    out = {}
    for q in (SACRE[0], BRIDGE[1], SAN_MARCO[0]):
        out[q.name] = [(m.path, m.inliers) for m in retriever.search(q, k=4).matches]
    return out


def _sound(idx: Path) -> None:
    report = check_index(idx, deep=True)
    assert report.ok, report.problems


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Answers]:
    """An uninterrupted build of the 6-image corpus and its answers."""
    root = tmp_path_factory.mktemp("reference")
    corpus = _corpus(root / "corpus", {"sacre_coeur": SACRE[:3], "tower_bridge": BRIDGE[:3]})
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # a failed record
    _retr(_build_args(corpus, root / "idx"))
    return corpus, _answers(root / "idx")


def _killed_build_resumes(reference: tuple[Path, Answers], tmp_path: Path, fault: str, redo: int):
    corpus, want = reference
    idx = tmp_path / "idx"
    _retr(_build_args(corpus, idx), fault=fault)
    report = build_index(corpus, idx, wait=None)  # the rerun: in process, stored config
    assert report.indexed == redo, (fault, report)
    assert report.total_indexed == 6 and [f for f, _ in report.failed] == ["broken.jpg"]
    _sound(idx)
    assert _answers(idx) == want
    leftovers = [p.name for p in idx.rglob("*") if ".tmp-" in p.name]
    assert not leftovers


# Kills during the first build: (point, images the rerun extracts again). Batches commit at
# batch:manifest; a kill before it costs that batch, a kill after it nothing.
BUILD_KILLS = [
    ("batch:catalog:2", 4),
    ("batch:segment:2", 4),
    ("batch:manifest:2", 2),
    ("batch:manifest:3", 0),
    ("batch:records:1", 0),
    ("publish:whitening", 0),
    ("publish:vectors", 0),
    ("publish:manifest", 0),
    ("publish:catalog", 0),
]


@pytest.mark.parametrize(("fault", "redo"), [pytest.param(f, n, id=f) for f, n in BUILD_KILLS])
def test_killed_first_build_resumes(reference, tmp_path: Path, fault: str, redo: int) -> None:
    _killed_build_resumes(reference, tmp_path, fault, redo)


@pytest.fixture
def small(reference: tuple[Path, Answers], tmp_path: Path) -> tuple[Path, Path]:
    """A private 4-image index (2 + 2) whose corpus gains the 2 remaining images."""
    corpus = _corpus(tmp_path / "corpus", {"sacre_coeur": SACRE[:2], "tower_bridge": BRIDGE[:2]})
    _retr(_build_args(corpus, tmp_path / "idx"))
    return corpus, tmp_path / "idx"


@pytest.mark.parametrize(
    "fault",
    [
        "batch:manifest:1",
        "publish:vectors",
        "publish:manifest",
    ],
)
def test_killed_add_is_before_or_after_and_the_rerun_finishes(
    small: tuple[Path, Path], tmp_path: Path, fault: str
) -> None:
    corpus, idx = small
    extra = _corpus(tmp_path / "extra", {"piazza_san_marco": SAN_MARCO[:2]})
    before = _answers(idx)
    _retr(["index", "add", str(extra / "piazza_san_marco"), "--index", str(idx), "-q"], fault)
    _sound(idx)
    after_kill = _answers(idx)
    published = fault == "publish:manifest"
    if not published:
        assert after_kill == before  # nothing of the add is visible yet
    report = add_images(idx, [extra / "piazza_san_marco"])
    assert len(report.added) + report.unchanged == 2
    _sound(idx)
    top = Retriever.open(idx).search(SAN_MARCO[0], k=1).matches[0]
    assert top.path.endswith(SAN_MARCO[0].name) and top.verified


@pytest.mark.parametrize(
    ("fault", "visible"),
    [
        pytest.param("remove:vectors", True, id="before-commit"),
        pytest.param("remove:manifest", False, id="after-commit"),
        pytest.param("sync:deleted", False, id="rows-deleted"),
    ],
)
def test_killed_remove_is_before_or_after(small: tuple[Path, Path], fault: str, visible: bool):
    corpus, idx = small
    victim = f"tower_bridge/{BRIDGE[0].name}"
    _retr(["index", "remove", victim, "--index", str(idx)], fault)
    _sound(idx)
    paths = {m.path for m in Retriever.open(idx).search(BRIDGE[0], k=4).matches}
    assert (victim in paths) == visible
    again = remove_images(idx, [victim])
    assert again.removed or again.not_found == [victim]  # done now, whichever it was
    _sound(idx)
    assert victim not in {m.path for m in Retriever.open(idx).search(BRIDGE[0], k=4).matches}
    build_index(corpus, idx)  # the file is still in the corpus: a build brings it back
    assert len(Manifest.load(idx).live_ids()) == 4


@pytest.mark.parametrize("fault", ["batch:manifest:1", "publish:manifest"])
def test_killed_update_finishes_on_rerun(small: tuple[Path, Path], fault: str) -> None:
    corpus, idx = small
    changed = corpus / "sacre_coeur" / SACRE[0].name
    shutil.copy(SAN_MARCO[2], changed)  # new content under an indexed name
    (corpus / "tower_bridge" / BRIDGE[1].name).unlink()  # a file that is gone
    before = Manifest.load(idx)
    _retr(["index", "update", "--index", str(idx), "-q"], fault)
    _sound(idx)
    after = Manifest.load(idx)  # the change and the removal are one commit: both or neither
    committed = fault == "publish:manifest"
    assert after.generation == before.generation + committed
    assert len(after.live_ids()) == (3 if committed else 4)
    gone = f"tower_bridge/{BRIDGE[1].name}"
    assert (gone in {m.path for m in Retriever.open(idx).search(BRIDGE[1], k=4).matches}) == (
        not committed
    )
    update_images(idx)
    _sound(idx)
    top = Retriever.open(idx).search(SAN_MARCO[2], k=1).matches[0]
    assert top.path == f"sacre_coeur/{SACRE[0].name}"
    assert len(Manifest.load(idx).live_ids()) == 3


def test_a_second_writer_fails_at_once_or_waits(small: tuple[Path, Path]) -> None:
    corpus, idx = small
    ready = idx.parent / "ready"
    env = _env(RETR_FAULT="publish:vectors", RETR_FAULT_ACTION="pause", RETR_FAULT_READY=str(ready))
    extra = _corpus(idx.parent / "extra", {"piazza_san_marco": SAN_MARCO[:1]})
    holder = subprocess.Popen(
        [str(RETR), "index", "add", str(extra), "--index", str(idx), "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(
            [str(RETR), "index", "remove", "1", "--index", str(idx)],
            env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"being written by pid {holder.pid}" in second.stderr
        assert "--wait" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert _answers(idx)  # readers are not blocked by the writer
        (idx / "write.lock").unlink()  # "clearing a stale lock" under a live writer
        third = subprocess.run(
            [str(RETR), "index", "remove", "1", "--index", str(idx)],
            env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert third.returncode == 1 and "is being written by" in third.stderr
    finally:
        holder.kill()  # the holder dies with the lock held: the kernel releases it
        holder.wait()
    report = remove_images(idx, [1], wait=5)
    assert report.removed == [1]
    _sound(idx)


def test_queries_during_adds_and_removes_see_no_error_and_no_removed_image(
    small: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, idx = small
    log = tmp_path / "queries.jsonl"
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _READER,
            str(idx),
            str(log),
            str(stop),
            str(SACRE[1]),
            str(BRIDGE[1]),
        ],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_lines(log, 2, reader)
        removed: dict[str, float] = {}
        extra = _corpus(tmp_path / "extra", {"piazza_san_marco": SAN_MARCO[:2]})
        add_images(idx, [extra / "piazza_san_marco" / SAN_MARCO[0].name])
        for victim in (f"tower_bridge/{BRIDGE[0].name}", f"sacre_coeur/{SACRE[0].name}"):
            remove_images(idx, [victim])
            removed[victim] = time.time()
        add_images(idx, [extra / "piazza_san_marco" / SAN_MARCO[1].name])
        _wait_for_lines(log, _lines(log) + 4, reader)
    finally:
        stop.touch()
        _, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) >= 6 and not [r for r in rows if r["error"]]
    for r in rows:
        for victim, when in removed.items():
            if r["start"] > when:
                assert victim not in r["paths"], (victim, r)
    assert len({r["generation"] for r in rows}) > 1  # the reader followed the writers


_READER = """
import json, sys, time
from pathlib import Path
from retrieval import Retriever
idx, log, stop, *queries = sys.argv[1:]
retriever = Retriever.open(idx)
with open(log, "a") as out:
    while not Path(stop).exists():
        for q in queries:
            start = time.time()
            try:
                result = retriever.search(q, k=10)
                row = {"paths": [m.path for m in result.matches], "error": None,
                       "generation": result.generation}
            except Exception as exc:
                row = {"paths": [], "error": repr(exc), "generation": -1}
            out.write(json.dumps({"start": start, **row}) + "\\n")
            out.flush()
"""


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while _lines(path) < n:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the reader process made no progress"
        time.sleep(0.2)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


_COMPACTING_WRITER = """
import sys
import numpy as np
from features.types import LocalFeatures
from index.layout import IndexConfig, IndexPaths
from index.writer import MERGE_FANOUT, Extracted, IndexWriter
rng = np.random.default_rng(0)
writer = IndexWriter.open(IndexPaths(sys.argv[1]), IndexConfig())
writer.bind_extractors("g", "l", 8)
for k in range(MERGE_FANOUT + 2):
    d = rng.normal(size=(30, 16)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    local = LocalFeatures(rng.uniform(0, 99, (30, 2)).astype(np.float32),
                          np.ones(30, np.float32), d, (100, 100))
    g = rng.normal(size=8).astype(np.float32)
    writer.commit_batch([Extracted(f"{k}.jpg", f"sha{k}", None, g, local)])
writer.publish(refit=True)
print("finished")
"""


@pytest.mark.parametrize("fault", ["compact:manifest", "publish:catalog"])
def test_killed_compaction_leaves_the_published_index_sound(tmp_path: Path, fault: str) -> None:
    idx = tmp_path / "idx"
    done = subprocess.run(
        [sys.executable, "-c", _COMPACTING_WRITER, str(idx)],
        env=_env(RETR_FAULT=fault), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    _sound(idx)
    manifest = Manifest.load(idx)
    assert manifest.published and len(manifest.live_ids()) == 10
    with IndexWriter.open(IndexPaths(idx)) as writer:  # the next writer deletes the leftovers
        writer.compact()
    _sound(idx)
    names = {p.name for p in (idx / "segments").iterdir()}
    manifest = Manifest.load(idx)
    assert names <= {s.name for s in manifest.segments} | {
        Path(f).name for f in manifest.previous_files
    }


_RANDOM_VICTIM = """
import sys
from index.layout import IndexPaths
from index.whitening import Whitening
from index.writer import IndexWriter
root, op = sys.argv[1], sys.argv[2]
with IndexWriter.open(IndexPaths(root), wait=60) as writer:
    writer.bind_extractors("g", "l", 8)
    if op == "compact":
        writer.compact(full=True)
    else:  # what `retr train whitening` stores: a whitening, every vector re-projected
        pca = Whitening.load(writer.paths.root / writer.manifest.whitening.name)
        writer.set_whitening("learned" if writer.manifest.whitening_kind == "pca" else "pca", pca)
print("finished")
"""


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["compact", "whitening"])
def test_random_kills_during_compaction_and_whitening(tmp_path: Path, operation: str) -> None:
    """kill -9 at random times (not only at named points), 6 times in a row on one index:
    each time the index is sound with the same images, and the last run finishes."""
    import random

    from tests.test_write_safety import _synthetic_index

    idx = tmp_path / "idx"
    _synthetic_index(idx, segments=24)
    live = Manifest.load(idx).live_ids().tolist()
    rng = random.Random(7)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _RANDOM_VICTIM, str(idx), operation],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(rng.uniform(0.5, 4.0))  # python start-up, lock, then the writes
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        _sound(idx)
        assert Manifest.load(idx).live_ids().tolist() == live
    done = subprocess.run(
        [sys.executable, "-c", _RANDOM_VICTIM, str(idx), operation],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]
    _sound(idx)
    assert Manifest.load(idx).live_ids().tolist() == live
