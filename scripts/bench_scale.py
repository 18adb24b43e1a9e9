"""Scale measurements: vector backends, catalogs and the feature store at 10k-1M images.

    python scripts/bench_scale.py vectors --sizes 100000,1000000 --dim 256
        FAISS (Flat, HNSW32, OPQ+IVF-PQ) against Milvus Lite (FLAT, HNSW, IVF_FLAT, IVF_SQ8) on
        the same synthetic whitened vectors (scripts/bench_index.py's clustered unit rows), each
        through retr's vector backend (index.vector_backends): build seconds, bytes per vector
        on disk, queries per second (a batch, and one at a time), recall@10 against exact.
    python scripts/bench_scale.py catalog --rows 1000000 --pg postgresql+psycopg://...
        SQLite against PostgreSQL with N synthetic catalog rows: filling time, `index info`
        (in process and as `retr index info`), a 1,000-id lookup, the whole-table read an
        ingest does; with --ingest N, N synthetic images stored without extraction (the
        database's share of a build); with --mini, a build of a mini-set subset on each
        (images per second, same answers).
    python scripts/bench_scale.py store --sizes 10000,100000,1000000
        Synthetic images written through IndexWriter (one segment per committed batch of
        --batch images, published without compaction, then compacted): store open time and
        the read of a 100-candidate shortlist, before and after compaction.

Every figure is wall time on this machine; the long runs are bounded by their sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import per_second, synthetic  # noqa: E402

from features.types import LocalFeatures  # noqa: E402
from index.catalog import Catalog, RowChange, Status  # noqa: E402
from index.info import index_info  # noqa: E402
from index.layout import IndexConfig, IndexPaths  # noqa: E402
from index.manifest import Manifest, SegmentEntry, pack_ids  # noqa: E402
from index.snapshot import IndexSnapshot  # noqa: E402
from index.store import FeatureStore  # noqa: E402
from index.vector_backends import Vectors, vector_backend  # noqa: E402
from index.vector_backends.milvus import MilvusTarget, release  # noqa: E402
from index.writer import Extracted, IndexWriter  # noqa: E402

console = Console(width=160)
RESULTS: dict[str, list[dict[str, Any]]] = {}
SAVE_TO: Path | None = None


def record(section: str, row: dict[str, Any]) -> None:
    """Keep a result row, with the machine's 1-minute load average when it was taken (the
    machine is shared: figures are comparable within one run), and save what there is so far."""
    row["load"] = os.getloadavg()[0]
    RESULTS.setdefault(section, []).append(row)
    console.print(f"{section}: {row}", highlight=False)
    if SAVE_TO is not None:
        SAVE_TO.write_text(json.dumps(RESULTS, indent=1, default=float))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn: Callable[[], Any], repeats: int = 5) -> tuple[float, float, Any]:
    """(best wall seconds, best CPU seconds of this process, last result) over `repeats` calls:
    on a shared machine the CPU time of a one-thread step is the steadier figure."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu = time.process_time()
        wall, out = timed(fn)
        walls.append(wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


def table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    t = Table(title=title)
    for key in rows[0]:
        t.add_column(key, justify="right")
    for row in rows:
        t.add_row(*(f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(t)


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- vectors ------------------------------------------------------------------------------------


def bench_vectors(args: argparse.Namespace) -> None:
    q = synthetic(args.queries, args.dim, seed=1)
    for n in (int(s) for s in args.sizes.split(",")):
        x = synthetic(n, args.dim, seed=2)
        ids = np.arange(n, dtype=np.int64) * 7 + 3  # catalog ids are not positions
        exact = ids[_exact_top(x, q, 10)]
        for kind, index_type in _types(args.types, n):
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                row = _bench_backend(kind, index_type, Path(tmp), ids, x, q, exact, args.single)
            record("vectors", {"N": n, "backend": kind, **row})
            del row
    table("vector backends", RESULTS.get("vectors", []))


def _types(spec: str, n: int) -> list[tuple[str, str]]:
    """(backend, index type) pairs: "faiss:Flat;milvus:HNSW;..."; "faiss:ivfpq" stands for the
    OPQ + IVF-PQ string FAISS's "auto" uses at this size."""
    from index.vectors import ivfpq_factory

    out = []
    for item in spec.split(";"):
        kind, _, index_type = item.partition(":")
        out.append((kind, ivfpq_factory(n, 256) if index_type == "ivfpq" else index_type))
    return out


def _exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact top k of each query (brute force, in blocks of 100 queries)."""
    rows = []
    for start in range(0, len(q), 100):
        sims = q[start : start + 100] @ x.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        rows.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(rows)


def _bench_backend(
    kind: str,
    index_type: str,
    root: Path,
    ids: np.ndarray,
    x: np.ndarray,
    q: np.ndarray,
    exact: np.ndarray,
    single_queries: int,
) -> dict[str, Any]:
    store = None if kind == "faiss" else f"milvus-lite://{root / 'v.db'}/bench"
    backend = vector_backend(root, store, index_type)
    manifest = Manifest(segments=[_segment(ids)])
    build, _ = timed(lambda: backend.rebuild(manifest, 1, ids, x))
    manifest.generation = 1
    backend.finish(manifest)
    on_disk = disk_bytes(root / "v.db") if store else disk_bytes(root / "vectors-1.faiss")
    open_s, vectors = timed(lambda: backend.open(manifest))
    _, got = vectors.search(q, 10)
    recall = float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, exact, strict=True)]))
    batch = per_second(lambda: vectors.search(q, 10), len(q), 2)
    one = q[:single_queries]
    single = per_second(lambda: [vectors.search(v[None], 10) for v in one], len(one), 2)
    row = {
        "index": getattr(vectors, "factory", index_type),
        "build s": build,
        "open s": open_s,
        "bytes/vector": on_disk / len(ids),
        "QPS batch": batch,
        "QPS single": single,
        "recall@10": recall,
    }
    _close(vectors, backend, store)
    return row


def _close(vectors: Vectors, backend: Any, store: str | None) -> None:
    backend.close()
    if store:
        release(MilvusTarget.parse(store))


def _segment(ids: np.ndarray) -> SegmentEntry:
    """A manifest entry whose live ids are `ids` (the vector backends read only the ids)."""
    return SegmentEntry(name="seg-0.h5", bytes=0, sha256="", encoding="float16", ids=pack_ids(ids))


# --- catalog ------------------------------------------------------------------------------------


def bench_catalog(args: argparse.Namespace) -> None:
    targets = [("sqlite", None)] + ([("postgresql", args.pg)] if args.pg else [])
    for name, url in [(n, u) for n, u in targets if n in args.databases.split(",")]:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            if args.rows:
                record("catalog", _bench_catalog(name, url, Path(tmp), args.rows))
            if args.ingest:
                record("ingest", _bench_ingest(name, url, Path(tmp), args))
            if args.mini:
                record("mini build", _bench_mini(name, url, Path(tmp), args))
    table("catalog at scale", RESULTS.get("catalog", []))
    table("synthetic ingest", RESULTS.get("ingest", []))
    table("mini-set build", RESULTS.get("mini build", []))


def _bench_catalog(name: str, url: str | None, tmp: Path, rows: int) -> dict[str, Any]:
    paths = IndexPaths(tmp / "idx")
    config = IndexConfig.parse({"db_url": _fresh_db(url, name)} if url else {})
    IndexWriter.open(paths, config).close()  # a new index: manifest, catalog, owner
    catalog = Catalog(paths.db_url(config))
    statuses = [Status.INDEXED] * 8 + [Status.FAILED, Status.DUPLICATE]

    def fill() -> None:
        for start in range(0, rows, 50_000):
            catalog.upsert(
                [
                    RowChange(f"group{k % 5000}/img{k:08d}.jpg", f"{k:064x}", f"group{k % 5000}",
                              statuses[k % 10], None, None, (1024, 768))
                    for k in range(start, min(rows, start + 50_000))
                ]
            )  # fmt: skip

    fill_s, _ = timed(fill)
    info_s, info = timed(lambda: index_info(paths.root))
    cli = [str(Path(sys.executable).parent / "retr"), "index", "info", "-i", str(paths.root)]
    cli_s, _ = timed(lambda: subprocess.run(cli, check=True, capture_output=True))
    bare = cli[:1] + ["--help"]
    start_s, _ = timed(lambda: subprocess.run(bare, check=True, capture_output=True))
    wanted = np.random.default_rng(0).choice(rows, 1000, replace=False) + 1
    lookup_s, found = timed(lambda: catalog.get(wanted.tolist()))
    assert len(found) == 1000
    lookups = [timed(lambda: catalog.get(wanted.tolist()))[0] for _ in range(3)]
    all_s, everything = timed(catalog.by_path)
    assert len(everything) == rows and sum(info["images"].values()) == rows  # type: ignore[attr-defined]
    size = _catalog_bytes(catalog, paths)
    catalog.dispose()
    return {
        "database": name,
        "rows": rows,
        "fill s": fill_s,
        "index info s (in process)": info_s,
        "retr index info s (process)": cli_s,
        "retr --help s (start-up alone)": start_s,
        "1,000-id lookup s (cold)": lookup_s,
        "1,000-id lookup s (warm)": min(lookups),
        "read every row s": all_s,
        "bytes/row": size / rows,
    }


def _catalog_bytes(catalog: Catalog, paths: IndexPaths) -> int:
    """The catalog's size: SQLite's file, or PostgreSQL's table with its indexes."""
    if catalog.engine.dialect.name == "sqlite":
        return paths.catalog.stat().st_size
    from sqlalchemy import text

    with catalog.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_total_relation_size('images')")).scalar() or 0)


def _bench_ingest(
    name: str, url: str | None, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """A build without extraction: --ingest synthetic images committed in batches of --batch
    (catalog rows, segment, manifest per batch), then published; what the database adds to a
    build's own work."""
    config = {"index_type": "Flat", **({"db_url": _fresh_db(url, name)} if url else {})}
    writer = IndexWriter.open(IndexPaths(tmp / "ingest"), IndexConfig.parse(config))
    writer.bind_extractors("synthetic-global", "synthetic-local", args.gdim)
    rng = np.random.default_rng(0)
    commit_s, _ = timed(lambda: _fill_store(writer, args.ingest, args, rng))
    publish_s, _ = timed(lambda: writer.publish(refit=True))
    writer.close()
    return {
        "database": name,
        "images": args.ingest,
        "batches": -(-args.ingest // args.batch),
        "commit s": commit_s,
        "publish s": publish_s,
        "images/s": args.ingest / (commit_s + publish_s),
    }


def _bench_mini(name: str, url: str | None, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from retrieval import Retriever
    from retrieval.building import build_index

    images = sorted(Path(args.mini).glob("images/*/*.jpg"))[: args.mini_images]
    corpus = tmp / "corpus"
    for p in images:
        (corpus / p.parent.name).mkdir(parents=True, exist_ok=True)
        (corpus / p.parent.name / p.name).symlink_to(p.resolve())
    options = {"local_conf": {"resize_max": 320, "max_keypoints": 512},
               "global_conf": {"resize_max": 384}}  # fmt: skip
    config = IndexConfig.parse({**options, **({"db_url": _fresh_db(url, name)} if url else {})})
    report = build_index(corpus, tmp / "mini", config)
    retriever = Retriever.open(tmp / "mini")
    answers = [
        [(m.path, round(m.global_score, 5), m.inliers) for m in retriever.search(p, k=5).matches]
        for p in images[:: max(1, len(images) // 4)]
    ]
    digest = hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:12]
    return {
        "database": name,
        "images": report.indexed,
        "build s": report.seconds,
        "images/s": report.images_per_second,
        "answers digest": digest,
    }


def _fresh_db(url: str, name: str) -> str:
    """A new database beside the one `url` names (every benchmark index gets its own)."""
    from sqlalchemy import create_engine, text

    base, _, _ = url.rpartition("/")
    db = f"bench_{name}_{time.time_ns()}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {db}"))
    engine.dispose()
    return f"{base}/{db}"


# --- store --------------------------------------------------------------------------------------


def bench_store(args: argparse.Namespace) -> None:
    for n in (int(s) for s in args.sizes.split(",")):
        root = Path(tempfile.mkdtemp(dir=args.workdir)) / "idx"
        try:
            for row in _bench_store(root, n, args):
                record("store", row)
        finally:
            shutil.rmtree(root.parent, ignore_errors=True)
    table("feature store", RESULTS.get("store", []))


def _bench_store(root: Path, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    writer = IndexWriter.open(IndexPaths(root), IndexConfig.parse({"index_type": "Flat"}))
    writer.bind_extractors("synthetic-global", "synthetic-local", args.gdim)
    rng = np.random.default_rng(0)
    write_s, _ = timed(lambda: _fill_store(writer, n, args, rng))
    publish_s, _ = timed(lambda: writer.publish(refit=True, compact=False))
    rows = [_measure_store(root, n, "published, not compacted", write_s + publish_s, args)]
    compact_s, _ = timed(writer.compact)
    writer.close()
    rows.append(_measure_store(root, n, "compacted", compact_s, args))
    return rows


def _fill_store(writer: IndexWriter, n: int, args: argparse.Namespace, rng: Any) -> None:
    k, d = args.keypoints, args.local_dim
    for start in range(0, n, args.batch):
        m = min(args.batch, n - start)
        g = rng.standard_normal((m, args.gdim), np.float32)
        kp = rng.uniform(0, 1000, (m, k, 2)).astype(np.float32)
        desc = rng.standard_normal((m, k, d), np.float32)
        desc /= np.linalg.norm(desc, axis=2, keepdims=True)
        scores = np.linspace(1, 0.1, k, dtype=np.float32)
        batch = [
            Extracted(f"g{(start + i) % 5000}/{start + i:08d}.jpg", f"{start + i:064x}",
                      None, g[i], LocalFeatures(kp[i], scores, desc[i], (1024, 768)))
            for i in range(m)
        ]  # fmt: skip
        writer.commit_batch(batch)


def _measure_store(
    root: Path, n: int, state: str, seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    paths = IndexPaths(root)
    manifest_s, manifest_cpu, manifest = cpu_timed(lambda: Manifest.load(root))
    open_s, open_cpu, store = cpu_timed(lambda: FeatureStore(root, manifest))
    rng = np.random.default_rng(1)
    reads, cpus, touched = [], [], []
    for _ in range(args.reads):  # a new store each time: every segment opened cold
        ids = rng.choice(store.ids(), 100, replace=False)
        fresh = FeatureStore(root, manifest)
        wall, cpu, feats = cpu_timed(lambda fresh=fresh, ids=ids: fresh.local_features(ids), 1)
        assert len(feats) == 100
        touched.append(len(np.unique(fresh.segments_of(ids))))
        reads.append(wall)
        cpus.append(cpu)
        fresh.close()
    warm_s, warm_cpu, _ = cpu_timed(lambda: store.local_features(ids))
    snap_s, snap_cpu, snap = cpu_timed(lambda: IndexSnapshot.open(paths), 3)
    snap.close()
    store.close()
    return {
        "images": n,
        "state": state,
        "segments": len(manifest.segments),
        "manifest KB": (root / "manifest.json").stat().st_size / 1024,
        "write/compact s": seconds,
        "manifest load ms": 1000 * manifest_s,
        "manifest load ms CPU": 1000 * manifest_cpu,
        "store open ms": 1000 * open_s,
        "store open ms CPU": 1000 * open_cpu,
        "snapshot open ms (with FAISS Flat file)": 1000 * snap_s,
        "shortlist read ms (cold, median)": 1000 * float(np.median(reads)),
        "shortlist read ms CPU (cold, median)": 1000 * float(np.median(cpus)),
        "segments touched": float(np.median(touched)),
        "shortlist read ms (warm)": 1000 * warm_s,
        "shortlist read ms CPU (warm)": 1000 * warm_cpu,
        "segment files GB": disk_bytes(paths.segments) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["vectors", "catalog", "store"])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries sent one at a time")
    parser.add_argument(
        "--types",
        default="faiss:Flat;faiss:HNSW32;faiss:ivfpq;milvus:FLAT;milvus:HNSW;milvus:IVF_FLAT;"
        "milvus:IVF_SQ8",
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="catalog rows (0: skip)")
    parser.add_argument("--ingest", type=int, default=0, help="synthetic images to ingest")
    parser.add_argument("--pg", help="PostgreSQL URL for the catalog benchmark")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--mini", help="landmarks-mini folder: also time a subset build")
    parser.add_argument("--mini-images", type=int, default=24)
    parser.add_argument("--batch", type=int, default=250, help="images per committed batch")
    parser.add_argument("--gdim", type=int, default=64, help="global descriptor dims")
    parser.add_argument("--keypoints", type=int, default=16)
    parser.add_argument("--local-dim", type=int, default=32)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where temporary indexes go")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    global SAVE_TO
    SAVE_TO = Path(args.json) if args.json else None
    {"vectors": bench_vectors, "catalog": bench_catalog, "store": bench_store}[args.what](args)


if __name__ == "__main__":
    main()
