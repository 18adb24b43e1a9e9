"""Building on Ray (a local runtime of 2 CPUs): the same index as a single-process build, a
worker killed mid-build has its batch retried with nothing lost or duplicated, a corrupt image
fails in its worker with the usual reason, and a killed driver leaves a build that a plain
`retr index build` resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.core import ConfigError
from index.catalog import Catalog
from index.check import check_index
from index.layout import IndexPaths
from index.manifest import Manifest
from index.store import FeatureStore
from index.writer import IndexWriter
from retrieval import Retriever
from retrieval.building import build_index, corpus_items
from retrieval.distributed import connect, disconnect
from retrieval.ingest import Ingester, ingest_files
from tests.corpus import MINI, TINY_OPTIONS, tiny

ray = pytest.importorskip("ray", reason="Ray is part of the dev install (retr[ray])")

SACRE = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))
BRIDGE = sorted((MINI / "images/tower_bridge").glob("*.jpg"))
RETR = Path(sys.executable).parent / "retr"


@pytest.fixture(scope="module")
def runtime():
    """One local Ray runtime for the module (builds join it instead of starting their own)."""
    connect("auto", num_cpus=2)
    yield
    disconnect()


def _corpus(root: Path, bad: bool = False) -> Path:
    for group, files in (("sacre_coeur", SACRE[:4]), ("tower_bridge", BRIDGE[:4])):
        (root / group).mkdir(parents=True)
        for p in files:
            shutil.copy(p, root / group / p.name)
    if bad:
        (root / "broken.jpg").write_bytes(SACRE[0].read_bytes()[:300])
    return root


def _features(idx: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """path -> (global descriptor, keypoints, descriptors) of every indexed image."""
    manifest = Manifest.load(idx)
    paths = {r.id: r.path for r in Catalog(f"sqlite:///{idx / 'catalog.sqlite'}").all()}
    with FeatureStore(idx, manifest) as store:
        ids = store.ids()
        glob = store.global_descriptors(ids)
        local = store.local_features(ids)
    return {
        paths[int(i)]: (g, f.keypoints, f.descriptors)
        for i, g, f in zip(ids, glob, local, strict=True)
    }


def _rows(idx: Path) -> list[tuple[int, str, str | None, str, str | None]]:
    records = Catalog(f"sqlite:///{idx / 'catalog.sqlite'}").all()
    return [(r.id, r.path, r.label, r.status, r.reason) for r in records]


def test_ray_build_equals_the_single_process_build(runtime, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus", bad=True)
    local = build_index(corpus, tmp_path / "local", tiny())
    remote = build_index(corpus, tmp_path / "ray", tiny(), ray="auto")
    assert ray.is_initialized()  # joined the module's runtime, left it running
    assert remote.indexed == local.indexed == 8
    assert remote.failed == local.failed and "corrupt or truncated" in remote.failed[0][1]
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")  # same ids, paths, reasons
    a, b = _features(tmp_path / "local"), _features(tmp_path / "ray")
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path][0], b[path][0], atol=1e-5)
        np.testing.assert_allclose(a[path][1], b[path][1], atol=1e-3)
        np.testing.assert_allclose(a[path][2], b[path][2], atol=2e-3)
    for q in (SACRE[0], BRIDGE[1]):
        want = Retriever.open(tmp_path / "local").search(q, k=5).matches
        got = Retriever.open(tmp_path / "ray").search(q, k=5).matches
        assert [m.path for m in got] == [m.path for m in want]
        assert all(abs(x.inliers - y.inliers) <= 2 for x, y in zip(got, want, strict=True))
    assert check_index(tmp_path / "ray", deep=True).ok


def test_a_worker_killed_mid_build_has_its_batch_retried(runtime, tmp_path: Path) -> None:
    from retrieval.distributed import RayExtraction

    corpus = _corpus(tmp_path / "corpus")
    paths = IndexPaths(tmp_path / "idx")
    config = tiny().model_copy(update={"corpus": str(corpus)})
    pool = RayExtraction(config)
    victim = pool.worker_info()[0]["pid"]
    killed: list[int] = []

    def progress(done: int, total: int, current: str) -> None:
        if done == 2 and not killed:  # batches are in flight on both workers
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    try:
        with IndexWriter.open(paths, config) as writer:
            ingester = Ingester(writer, pool.models)
            report = ingest_files(ingester, corpus_items(corpus, None), progress, pool)
            writer.publish(refit=True)
        assert killed and victim not in {w["pid"] for w in pool.worker_info()}  # restarted
    finally:
        pool.close()
    assert len(report.indexed) == 8 and not report.failed and not report.duplicates
    assert sorted(r[0] for r in _rows(paths.root)) == list(range(1, 9))  # none lost or twice
    assert check_index(paths.root, deep=True).ok


def test_a_killed_driver_leaves_a_build_that_resumes_without_ray(runtime, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    env = {
        **os.environ,
        "RETR_OFFLINE": "1",
        "RETR_COMMIT_IMAGES": "2",
        "RETR_FAULT": "batch:manifest:2",
    }
    address = ray.get_runtime_context().gcs_address  # the driver joins this cluster by address
    args = [
        str(RETR), "index", "build", str(corpus), "--index", str(tmp_path / "idx"), "-q",
        "--ray", address,
        "--local-conf", json.dumps(TINY_OPTIONS["local_conf"]),
        "--global-conf", json.dumps(TINY_OPTIONS["global_conf"]),
    ]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    report = build_index(corpus, tmp_path / "idx")  # no Ray: the same index resumes
    assert report.indexed == 4 and report.total_indexed == 8
    assert check_index(tmp_path / "idx", deep=True).ok


def test_without_ray_the_option_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'retr\[ray\]'"):
        build_index(_corpus(tmp_path / "c"), tmp_path / "idx", tiny(), ray="auto")
    assert not (tmp_path / "idx").exists()  # refused before anything was written


def test_a_local_start_that_times_out_is_made_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's GCS server sometimes never publishes its port here: `connect` shuts the failed
    start down and starts again; a second timeout, or any failure to join a cluster, is one
    ConfigError line."""
    import retrieval.distributed as distributed

    class FakeRay:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls, self.shutdowns = failures, 0, 0

        def is_initialized(self) -> bool:
            return False

        def init(self, **_: object) -> None:
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port")

        def shutdown(self) -> None:
            self.shutdowns += 1

    once = FakeRay(failures=1)
    monkeypatch.setattr(distributed, "_ray", lambda: once)
    assert distributed.connect("auto")[0] and (once.calls, once.shutdowns) == (2, 1)
    twice = FakeRay(failures=2)
    monkeypatch.setattr(distributed, "_ray", lambda: twice)
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster at auto: Timed out"):
        distributed.connect("auto")
    remote = FakeRay(failures=1)
    monkeypatch.setattr(distributed, "_ray", lambda: remote)
    with pytest.raises(ConfigError, match="ray://head:10001"):
        distributed.connect("ray://head:10001")
    assert remote.calls == 1
