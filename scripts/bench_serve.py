"""Load test of `retr serve` on loopback: N clients for T seconds, throughput and latency.

Builds (or reuses) an index of the landmarks-mini database (prepare_index, as bench_query), copies
it (the second phase writes), starts `retr serve` on 127.0.0.1 and runs, for rerank=false and
rerank=true:

1. quiet: N clients, each sending the held-out queries in turn (POST /search, k=10) for T
   seconds; prints requests, errors, throughput and p50/p95/p99 latency;
2. under updates: the same load while one more client adds a new image (a mirrored distractor,
   POST /images) and removes it again (DELETE /images/{id}), over and over. Reports the errors
   (must be 0) and the results that differ from a quiet server (must be 0): for the images no
   update touches (every id of the index before the run), each answer must equal, in order,
   score, inliers and verdict, what a quiet server answers for the same query on the index
   without the added image or with it (the old or the new state, never a mix). The quiet
   phase's answers are checked against the first state the same way (the service answers the
   same query the same way, whichever thread runs it).

Bounded: at most 32 clients and 300 s per phase; loopback only.

    python scripts/bench_serve.py --data ../shared/data/landmarks-mini --index /tmp/bench-idx \\
        --clients 4 --seconds 30
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

from retrieval.evaluation.datasets import landmarks_mini
from retrieval.evaluation.runner import prepare_index

MAX_CLIENTS = 32
MAX_SECONDS = 300
TOKEN = uuid.uuid4().hex
K = 10
CHURN_IMAGES = 2

Untouched = list[tuple[int, float, int, bool]]


class Client:
    """One keep-alive HTTP connection to the service on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(
        self, method: str, path: str, files: tuple[str, str, bytes] | None = None
    ) -> tuple[int, Any]:
        """(status, JSON body); status 0 when the connection failed. A connection the server
        closed while idle (keep-alive timeout) is reopened once, before anything was sent."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = None
        if files is not None:
            body, headers["Content-Type"] = multipart(*files)
        for attempt in range(2):
            try:
                self.conn.request(method, path, body, headers)
                response = self.conn.getresponse()
                data = response.read()
                return response.status, json.loads(data) if data[:1] == b"{" else None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._reopen()
                if attempt:
                    return 0, None
            except (OSError, http.client.HTTPException):
                self._reopen()
                return 0, None
        return 0, None

    def _reopen(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Load:
    """What one phase measured."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    answers: list[tuple[str, Any]] = field(default_factory=list)
    """(query name, body) of every answered search (kept for the consistency check)."""
    wall: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def row(self) -> list[str]:
        ms = np.percentile(np.array(self.latencies) * 1000, [50, 95, 99]) if self.latencies else []
        return [
            str(len(self.latencies) + self.errors),
            str(self.errors),
            f"{len(self.latencies) / self.wall:.2f}",
            *(f"{v:.0f}" for v in ms),
        ]


def run_load(
    port: int, queries: list[tuple[str, bytes]], rerank: bool, clients: int, seconds: float
) -> Load:
    """`clients` threads searching the queries in turn until `seconds` have passed."""
    load = Load()
    start = time.monotonic()
    deadline = start + seconds

    def client(offset: int) -> None:
        c = Client(port)
        n = offset
        while time.monotonic() < deadline:
            name, data = queries[n % len(queries)]
            n += 1
            t0 = time.perf_counter()
            status, body = c.call(
                "POST", f"/search?k={K}&rerank={str(rerank).lower()}", ("image", name, data)
            )
            elapsed = time.perf_counter() - t0
            with load.lock:
                if status == 200:
                    load.latencies.append(elapsed)
                    load.answers.append((name, body))
                else:
                    load.errors += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.wall = time.monotonic() - start
    return load


@dataclass
class Churn:
    adds: int = 0
    removes: int = 0
    errors: int = 0


def churn(port: int, images: list[tuple[str, bytes]], deadline: float) -> Churn:
    """Add an image, remove it, next image, until the deadline."""
    c, done, n = Client(port), Churn(), 0
    while time.monotonic() < deadline:
        name, data = images[n % len(images)]
        n += 1
        new = add(c, name, data)
        if new is None:
            done.errors += 1
            continue
        done.adds += 1
        status, _ = c.call("DELETE", f"/images/{new}")
        done.removes += status == 200
        done.errors += status != 200
    return done


def add(c: Client, name: str, data: bytes) -> int | None:
    status, body = c.call("POST", "/images", ("images", name, data))
    if status != 200 or body["files"][0]["outcome"] != "added":
        return None
    return int(body["files"][0]["id"])


def untouched(body: Any, original: set[int]) -> Untouched:
    return [
        (m["id"], m["global_score"], m["inliers"], m["verified"])
        for m in body["results"]
        if m["id"] in original
    ]


def references(
    port: int,
    queries: list[tuple[str, bytes]],
    churn_images: list[tuple[str, bytes]],
    rerank: bool,
    original: set[int],
    clients: int,
) -> dict[str, list[Untouched]]:
    """Per query, its untouched results on a quiet server in every state the churn passes
    through: the index alone, and the index with each churn image (searched by `clients`
    threads; the answers do not depend on it)."""
    c = Client(port)
    path = f"/search?k={K}&rerank={str(rerank).lower()}"

    def answer(query: tuple[str, bytes]) -> Untouched:
        status, body = Client(port).call("POST", path, ("image", *query))
        assert status == 200, (status, body)
        return untouched(body, original)

    def answers() -> list[Untouched]:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(answer, queries))

    states = [answers()]
    for name, data in churn_images:
        new = add(c, name, data)
        assert new is not None, f"could not add {name}"
        states.append(answers())
        assert c.call("DELETE", f"/images/{new}")[0] == 200
    return {name: [s[i] for s in states] for i, (name, _) in enumerate(queries)}


def mirrored(path: Path) -> tuple[str, bytes]:
    """A new image (not a duplicate of any indexed file): the photo mirrored."""
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buf, "JPEG", quality=90)
    return f"mirrored-{path.name}", buf.getvalue()


def start_server(index: Path, port: int, clients: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index)]
    args += ["--port", str(port), "--token", TOKEN, "--queue", str(max(16, clients))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"retr serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if Client(port).call("GET", "/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("retr serve did not start within 300 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def phases(
    port: int,
    queries: list[tuple[str, bytes]],
    churn_images: list[tuple[str, bytes]],
    rerank: bool,
    clients: int,
    seconds: float,
) -> list[list[str]]:
    """The quiet phase and the phase under updates for one rerank setting: table rows."""
    flag = str(rerank).lower()
    _, listed = Client(port).call("GET", "/images?status=indexed&limit=1000")
    original = {row["id"] for row in listed["images"]}
    run_load(port, queries[:2], rerank, 1, 0.1)  # warm-up
    quiet = run_load(port, queries, rerank, clients, seconds)
    refs = references(port, queries, churn_images, rerank, original, clients)
    unsteady = sum(untouched(body, original) != refs[name][0] for name, body in quiet.answers)
    done: list[Churn] = []
    deadline = time.monotonic() + seconds
    writer = threading.Thread(target=lambda: done.append(churn(port, churn_images, deadline)))
    writer.start()
    busy = run_load(port, queries, rerank, clients, seconds)
    writer.join()
    differing = sum(untouched(body, original) not in refs[name] for name, body in busy.answers)
    updates = done[0]
    busy.errors += updates.errors
    return [
        ["quiet", flag, *quiet.row(), "-", str(unsteady)],
        ["under updates", flag, *busy.row(), f"{updates.adds}/{updates.removes}", str(differing)],
    ]


HEADER = (
    "phase",
    "rerank",
    "requests",
    "errors",
    "req/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "adds/removes",
    "differing",
)


def report(rows: list[list[str]], title: str) -> None:
    """A rich table, then the same rows in Markdown (for docs/results.md)."""
    table = Table(title=title)
    for col in HEADER:
        table.add_column(col, justify="left" if col in ("phase", "rerank") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)
    print("\n| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    parser.add_argument("--index", type=Path, default=Path("bench-index"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients 1..{MAX_CLIENTS}, --seconds up to {MAX_SECONDS}")

    dataset = landmarks_mini(args.data)
    prepare_index(dataset, args.index, None, None)
    queries = [(q.path.name, q.path.read_bytes()) for q in dataset.queries]
    distractors = [im.path for im in dataset.database if not im.label][:CHURN_IMAGES]
    churn_images = [mirrored(p) for p in distractors]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        index = Path(tmp) / "idx"
        shutil.copytree(args.index, index, symlinks=True)  # the updates must not touch it
        port = free_port()
        server = start_server(index, port, args.clients)
        try:
            for rerank in (False, True):
                rows += phases(port, queries, churn_images, rerank, args.clients, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=60)
    title = f"retr serve on {len(dataset.database)} images, {args.clients} clients"
    report(rows, f"{title} x {args.seconds:g} s per phase")


if __name__ == "__main__":
    main()
