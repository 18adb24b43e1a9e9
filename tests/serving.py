"""Fixtures and helpers of the service tests (test_server, test_browser): one tiny index of
landmarks-mini photos per session, private copies of it for tests that write, and `retr serve`
started as a real uvicorn process on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

from index.layout import IndexPaths
from index.writer import IndexWriter
from retrieval.building import build_index
from tests.corpus import MINI, tiny

RETR = Path(sys.executable).parent / "retr"
GROUPS = {"sacre_coeur": 4, "tower_bridge": 3, "st_pauls_cathedral": 3}
"""Indexed images per landmark (the first of each group is held out as a query)."""
DISTRACTORS = 2
BROKEN = "empty.jpg"


def group(name: str) -> list[Path]:
    return sorted((MINI / "images" / name).glob("*.jpg"))


QUERY = group("sacre_coeur")[0]
"""A held-out photo of an indexed landmark."""
OTHER = group("piazza_san_marco")[0]
"""A photo of a landmark that is not indexed (what tests add)."""


@dataclass(frozen=True)
class Served:
    corpus: Path
    index: Path


def build_served(root: Path) -> Served:
    """A tiny index (TINY_OPTIONS) of GROUPS and DISTRACTORS under `root` (conftest's
    `served_index` builds it once per session; tests must not change it)."""
    corpus = root / "corpus"
    for name, n in GROUPS.items():
        (corpus / name).mkdir(parents=True)
        for p in group(name)[1 : 1 + n]:
            (corpus / name / p.name).symlink_to(p)
    for p in sorted((MINI / "distractors").glob("*.jpg"))[:DISTRACTORS]:
        (corpus / p.name).symlink_to(p)
    (corpus / BROKEN).write_bytes(b"")  # a failed row, with its reason, for the index view
    build_index(corpus, root / "idx", tiny())
    return Served(corpus, root / "idx")


def writable_copy(served: Served, dest: Path) -> Served:
    """A private copy of the corpus (links) and index, the index pointing at the copy."""
    shutil.copytree(served.corpus, dest / "corpus", symlinks=True)
    shutil.copytree(served.index, dest / "idx")
    with IndexWriter.open(IndexPaths(dest / "idx")) as writer:
        writer.set_config(writer.config.model_copy(update={"corpus": str(dest / "corpus")}))
    return Served(dest / "corpus", dest / "idx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def live_server(index: Path, *options: str, startup: float = 120.0) -> Iterator[str]:
    """`retr serve --index INDEX OPTIONS` on a free loopback port; yields its base URL once
    /health answers, and stops it at the end."""
    port = free_port()
    log = index.parent / f"serve-{port}.log"
    args = [str(RETR), "serve", "--index", str(index), "--port", str(port), *options]
    env = {**os.environ, "RETR_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup
        while True:
            assert proc.poll() is None, f"retr serve exited: {log.read_text()[-3000:]}"
            try:
                if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, f"retr serve did not start: {log.read_text()}"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
