"""Evaluate a retr index on a dataset: global-only and reranked search side by side.

    from retrieval.evaluation import open_dataset, run_eval, format_table
    result = run_eval(open_dataset("roxford5k", "data/roxford5k"), "idx/roxford5k")
    rich.print(format_table(result))

The database is linked (symlinks) into `<index_dir>/corpus`, its labels written to
`<index_dir>/eval_labels.csv`, and indexed there; a later run reuses the index when it already
holds the database with those labels. Datasets may share an index: their links live side by side.
Every query is searched over the whole database (up to `max_rank` results, default
DEFAULT_MAX_RANK), once without and once with the local rerank, and scored with the dataset's
metrics. Images that the index holds but the dataset does not are left out of the rankings;
database images stored as duplicates of another file are ranked right after that file (their
features are identical).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from features.core import ConfigError, RetrError
from features.pipeline import Described
from index.catalog import Status
from index.layout import IndexConfig, IndexPaths, settle_config
from retrieval.api import Match, Retriever
from retrieval.building import build_index
from retrieval.evaluation.datasets import Dataset, Query, query_image
from retrieval.evaluation.metrics import (
    DEFAULT_KS,
    Prediction,
    RankingMetrics,
    Relevance,
    RevisitedGT,
    global_average_precision,
    ranking_metrics,
    recognition_accuracy,
    revisited_metrics,
)
from retrieval.ingest import Progress
from retrieval.recognition import UNKNOWN
from retrieval.search import SearchConf, SearchResult

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "format_table", "run_eval", "write_json"]

MODES = ("global", "rerank")
CORPUS_DIR = "corpus"
LABELS_NAME = "eval_labels.csv"
TOP_SHOWN = 10
DEFAULT_MAX_RANK = 10_000
"""Longest ranking fetched per query unless asked otherwise: the whole of ROxford / RParis, a
lower bound of AP with R1M (positives beyond it add nothing)."""


@dataclass(frozen=True)
class QueryResult:
    """One query. ap: mode -> protocol -> AP (None: no positive under that protocol)."""

    name: str
    ap: dict[str, dict[str, float | None]]
    prediction: dict[str, Prediction | None]
    top: dict[str, list[str]]
    seconds: dict[str, float]
    error: str | None = None


@dataclass(frozen=True)
class ModeMetrics:
    """Dataset-level scores of one search mode. gap / accuracy: None without labels."""

    protocols: dict[str, RankingMetrics]
    gap: float | None
    accuracy: float | None
    seconds_per_query: float
    stage_seconds: dict[str, float]
    kinds: dict[str, RankingMetrics] = field(default_factory=dict)
    """The same ranking metrics over the queries of each kind (Query.kind), when known."""


@dataclass(frozen=True)
class BuildInfo:
    reused: bool
    indexed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    protocols: tuple[str, ...]
    n_database: int
    n_queries: int
    index_dir: str
    config: dict[str, Any]
    build: BuildInfo
    modes: dict[str, ModeMetrics]
    queries: list[QueryResult]
    notes: list[str]


def run_eval(
    dataset: Dataset,
    index_dir: str | Path,
    config: IndexConfig | None = None,
    rerank: bool = True,
    progress: Progress | None = None,
    *,
    search: SearchConf | None = None,
    max_rank: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    variants: dict[str, SearchConf] | None = None,
    stored_queries: bool = False,
) -> EvalResult:
    """Index `dataset`'s database in `index_dir` if needed, run its queries, score them.

    config: the IndexConfig of a new index (`IndexConfig.parse`); the fields it was given must
    agree with an existing index (index.layout.settle_config). rerank=False runs the global
    search only. search: shortlist, verification and vote settings (k is set by the runner).
    variants: reranked modes side by side, by name (e.g. one per matcher), each with its own
    settings (default: {"rerank": search}); each query is described once for all modes.
    stored_queries: a query that is a whole database image (the leave-one-out protocol) is
    described by its features stored in the index instead of being extracted again (local
    descriptors as stored, e.g. float16; its times then leave extraction out).
    progress(done, total, current) sees the build, then the queries ("query: <name>").
    """
    retriever, build = prepare_index(dataset, Path(index_dir), config, progress)
    confs = {"global": search or SearchConf()}
    if rerank:
        confs.update(variants or {"rerank": confs["global"]})
    modes = tuple(confs)
    wanted = {im.rel for im in dataset.database}
    stored = {im.path.resolve(): im.rel for im in dataset.database} if stored_queries else {}
    ranker = _Ranker(retriever, wanted, max_rank, confs, stored)
    rankings: dict[str, list[list[str]]] = {m: [] for m in modes}
    queries: list[QueryResult] = []
    stages: dict[str, defaultdict[str, float]] = {m: defaultdict(float) for m in modes}
    for done, q in enumerate(dataset.queries):
        if progress:
            progress(done, len(dataset.queries), f"query: {q.name}")
        result, ranked = ranker.run(q, modes, stages)
        queries.append(result)
        for m in modes:
            rankings[m].append(ranked[m])
    if progress:
        progress(len(dataset.queries), len(dataset.queries), "")
    metrics = {m: _score_mode(dataset, rankings[m], queries, m, ks, stages[m]) for m in modes}
    queries = _with_ap(queries, metrics)
    return EvalResult(
        dataset=dataset.name,
        protocols=dataset.protocols,
        n_database=len(dataset.database),
        n_queries=len(dataset.queries),
        index_dir=str(index_dir),
        config=retriever.config.model_dump(),
        build=build,
        modes=metrics,
        queries=queries,
        notes=[*dataset.notes, *ranker.notes(), *_failure_notes(build, queries)],
    )


# --- index ---------------------------------------------------------------------------------------


def prepare_index(
    dataset: Dataset, index_dir: Path, config: IndexConfig | None, progress: Progress | None
) -> tuple[Retriever, BuildInfo]:
    """Open the index when it already holds the database with its labels (and agrees with
    `config`), else build it incrementally (new files are extracted, known ones only
    relabelled)."""
    paths = IndexPaths(index_dir)
    _check_own_index(paths)
    if paths.exists():
        existing = paths.read_config()
        if settle_config(existing, config) == existing:
            retriever = Retriever.open(index_dir)
            known = {r.path: r.label for r in retriever.catalog.all()}
            if all(im.rel in known and known[im.rel] == im.label for im in dataset.database):
                return retriever, BuildInfo(reused=True)
    corpus = link_corpus(dataset, index_dir / CORPUS_DIR)
    labels = write_labels(dataset, index_dir / LABELS_NAME)
    report = build_index(corpus, index_dir, config, labels, progress)
    retriever = Retriever.open(index_dir)
    return retriever, BuildInfo(
        reused=False,
        indexed=report.indexed,
        unchanged=report.unchanged,
        failed=list(report.failed),
        duplicates=len(report.duplicates),
        seconds=report.seconds,
    )


def _check_own_index(paths: IndexPaths) -> None:
    """An evaluation builds into, and reuses, only an index it made itself (its corpus is the
    folder of links it keeps inside the index): any other index, or a folder with other files,
    is refused in one line and never modified."""
    root = paths.root
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"--index {root} is a file; pass a new folder for the evaluation index")
    own = (root / CORPUS_DIR).resolve()
    if paths.exists():
        corpus = paths.read_config().corpus
        if corpus is None or Path(corpus).resolve() != own:
            raise ConfigError(
                f"index {root} was built from {corpus or 'another corpus'}, not by an "
                "evaluation: pass a new --index folder (an evaluation never changes another index)"
            )
    elif any(root.iterdir()):
        raise ConfigError(
            f"--index {root} is a folder with other files and no index: pass a new or empty folder"
        )


def link_corpus(dataset: Dataset, corpus: Path) -> Path:
    """`corpus/<rel>` -> the database files (symlinks; copies where links are not allowed)."""
    for im in dataset.database:
        link = corpus / im.rel
        target = im.path.resolve()
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(target)
        except OSError:  # e.g. Windows without the symlink privilege
            shutil.copy2(target, link)
    return corpus


def write_labels(dataset: Dataset, path: Path) -> Path:
    """The `path,label` CSV that retrieval.building.read_labels reads (unlabelled rows empty).

    Rows of other datasets already in the file are kept: a build relabels every corpus file from
    this CSV, and must not wipe the labels of another dataset sharing the index.
    """
    labels: dict[str, str] = {}
    if path.is_file():
        with open(path, newline="") as f:
            labels = {r["path"]: r["label"] for r in csv.DictReader(f)}
    labels.update((im.rel, im.label or "") for im in dataset.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(sorted(labels.items()))
    os.replace(tmp, path)
    return path


# --- queries -------------------------------------------------------------------------------------


class _Ranker:
    """Runs the searches of one evaluation and turns matches into database rankings."""

    def __init__(
        self,
        retriever: Retriever,
        wanted: set[str],
        max_rank: int | None,
        confs: dict[str, SearchConf],
        stored: dict[Path, str] | None = None,
    ) -> None:
        self.retriever = retriever
        self.wanted = wanted
        self.size = len(retriever.snapshot().vectors)
        self.depth = max(1, min(max_rank or DEFAULT_MAX_RANK, self.size))
        self.confs = {
            m: c.model_copy(update={"k": self.depth, "rerank": m != "global" and c.rerank})
            for m, c in confs.items()
        }
        """Settings per mode: "global" ranks by the global descriptor only, a variant may too
        (rerank=False: e.g. to compare global-stage refinements)."""
        self.aliases = _duplicate_aliases(retriever)
        self.outside = {
            r.path for r in retriever.catalog.with_status(Status.INDEXED) if not self._known(r.path)
        }
        """Indexed images that are not in this dataset: never results, never voters."""
        ids = {r.path: r.id for r in retriever.catalog.with_status(Status.INDEXED)}
        for kept, dups in self.aliases.items():
            ids.update(dict.fromkeys(dups, ids[kept]))
        self.stored = {p: ids[rel] for p, rel in (stored or {}).items() if rel in ids}
        """Query file -> the id of its stored features (stored_queries)."""
        self.reused = 0

    def run(
        self, q: Query, modes: Sequence[str], stages: dict[str, defaultdict[str, float]]
    ) -> tuple[QueryResult, dict[str, list[str]]]:
        """(result without APs, mode -> ranking) of one query."""
        ranked: dict[str, list[str]] = {m: [] for m in modes}
        preds: dict[str, Prediction | None] = dict.fromkeys(modes)
        seconds = dict.fromkeys(modes, 0.0)
        error = None
        try:
            local = any(self.confs[m].rerank for m in modes)
            described = self._describe(q, local)
            for m in modes:
                # each mode is charged the extraction it needs: the global model alone, or all
                extracted = {
                    k: v
                    for k, v in described.seconds.items()
                    if self.confs[m].rerank or k == "global"
                }
                t0 = time.perf_counter()
                result = self.retriever.search(
                    described, self.confs[m], exclude=self.outside | q.junk
                )
                seconds[m] = time.perf_counter() - t0 + sum(extracted.values())
                for stage, s in (*extracted.items(), *result.timings.items()):
                    stages[m][stage] += s
                ranked[m] = self._expand(result.matches)
                preds[m] = _predict(result, m)
        except RetrError as exc:  # an unreadable query scores 0 instead of ending the run
            logger.warning("query %s failed: %s", q.name, exc)
            error = str(exc)
        top = {m: ranked[m][:TOP_SHOWN] for m in modes}
        return QueryResult(q.name, {}, preds, top, seconds, error), ranked

    def _describe(self, q: Query, local: bool) -> Described:
        """The query's features: stored ones for a whole indexed image (`stored`), else
        extracted from the query image."""
        image_id = self.stored.get(q.path.resolve()) if q.bbox is None else None
        if image_id is None:
            return self.retriever.extractors.describe(query_image(q), with_local=local)
        store = self.retriever.snapshot().store
        feats = store.local_features([image_id])[0]
        self.reused += 1
        return Described(store.global_descriptors([image_id])[0], feats, feats.image_size)

    def _known(self, path: str) -> bool:
        """Whether an indexed path stands for a database image (itself or a duplicate of it)."""
        return path in self.wanted or any(p in self.wanted for p in self.aliases.get(path, ()))

    def _expand(self, matches: list[Match]) -> list[str]:
        out: list[str] = []
        for x in matches:
            out.extend(p for p in (x.path, *self.aliases.get(x.path, ())) if p in self.wanted)
        return out

    def notes(self) -> list[str]:
        notes = []
        if self.reused:
            notes.append(
                f"{self.reused} queries were described by their stored features: their times "
                "leave extraction out"
            )
        if self.depth < self.size:
            notes.append(f"rankings cut at {self.depth} of {self.size} images: AP is a lower bound")
        if self.outside:
            notes.append(
                f"{len(self.outside)} indexed images are not in this dataset's database and "
                "were left out of the rankings"
            )
        return notes


def _failure_notes(build: BuildInfo, queries: list[QueryResult]) -> list[str]:
    notes = []
    if build.failed:
        notes.append(f"{len(build.failed)} database images could not be indexed")
    failed = [q.name for q in queries if q.error]
    if failed:
        notes.append(f"{len(failed)} queries failed and score 0 (first: {failed[0]})")
    return notes


def _duplicate_aliases(retriever: Retriever) -> dict[str, list[str]]:
    """indexed path -> the paths of catalog records with the same content (not indexed)."""
    by_hash: dict[str, list[Any]] = defaultdict(list)
    for rec in retriever.catalog.all():
        by_hash[rec.sha256].append(rec)
    aliases: dict[str, list[str]] = {}
    for recs in by_hash.values():
        kept = [r for r in recs if r.status == "indexed"]
        if kept and len(recs) > 1:
            aliases[kept[0].path] = sorted(r.path for r in recs if r.status == "duplicate")
    return aliases


def _predict(result: SearchResult, mode: str) -> Prediction | None:
    """Global: the label of the first result (1-NN), confidence its global score (nothing is
    verified, so the vote would always say unknown). Rerank: the search's own recognition.
    Junk results (in leave-one-out mode, the query itself) were excluded by the search. A
    variant that did not rerank (result.matcher empty) counts as global."""
    if mode == "global" or not result.matcher:
        first = result.matches[0] if result.matches else None
        return Prediction(first.label, first.global_score) if first and first.label else None
    rec = result.recognition
    return None if rec.label == UNKNOWN else Prediction(rec.label, rec.confidence)


# --- scores --------------------------------------------------------------------------------------


def _score_mode(
    dataset: Dataset,
    rankings: list[list[str]],
    results: list[QueryResult],
    mode: str,
    ks: Sequence[int],
    stages: dict[str, float],
) -> ModeMetrics:
    """Metrics of one mode over all queries (rankings[i] belongs to dataset.queries[i])."""
    if dataset.protocols == ("easy", "medium", "hard"):
        gts = [RevisitedGT(q.easy, q.hard, q.junk) for q in dataset.queries]
        protocols = revisited_metrics(rankings, gts, ks)
    else:
        rels = [Relevance(q.easy | q.hard, q.junk) for q in dataset.queries]
        protocols = {"all": ranking_metrics(rankings, rels, ks)}
    kinds = {}
    for kind in sorted({q.kind for q in dataset.queries if q.kind}):
        rows = [i for i, q in enumerate(dataset.queries) if q.kind == kind]
        rels = [Relevance(q.easy | q.hard, q.junk) for q in (dataset.queries[i] for i in rows)]
        kinds[kind] = ranking_metrics([rankings[i] for i in rows], rels, ks)
    gap = accuracy = None
    if dataset.has_labels:
        solution = {q.name: q.labels or frozenset() for q in dataset.queries}
        preds = {r.name: r.prediction.get(mode) for r in results}
        gap = global_average_precision(preds, solution)
        accuracy = recognition_accuracy(preds, solution)
    n = max(1, len(results))
    return ModeMetrics(
        protocols=protocols,
        gap=gap,
        accuracy=accuracy,
        seconds_per_query=sum(r.seconds.get(mode, 0.0) for r in results) / n,
        stage_seconds={k: v / n for k, v in sorted(stages.items())},
        kinds=kinds,
    )


def _with_ap(results: list[QueryResult], metrics: dict[str, ModeMetrics]) -> list[QueryResult]:
    """Copy each query's AP (per mode and protocol) from the metrics' per-query lists."""
    return [
        replace(
            r,
            ap={
                m: {p: pm.per_query_ap[i] for p, pm in mm.protocols.items()}
                for m, mm in metrics.items()
            },
        )
        for i, r in enumerate(results)
    ]


# --- output --------------------------------------------------------------------------------------


def summary_rows(result: EvalResult) -> list[tuple[str, list[float | None]]]:
    """(metric name, value per mode in result.modes order) rows, in percent where a rate."""
    modes = list(result.modes.values())
    if not modes:
        return []
    rows: list[tuple[str, list[float | None]]] = []
    revisited = result.protocols == ("easy", "medium", "hard")
    for p in result.protocols:
        prefix = f"{p[0].upper()} " if revisited else ""
        first = modes[0].protocols[p]
        rows.append((f"{prefix}mAP", [_pct(m.protocols[p].map) for m in modes]))
        rows += [(f"{prefix}mP@{k}", [_pct(m.protocols[p].mp[k]) for m in modes]) for k in first.mp]
        if not revisited:
            rows += [
                (f"recall@{k}", [_pct(m.protocols[p].recall[k]) for m in modes])
                for k in first.recall
            ]
    for kind, first in modes[0].kinds.items():  # mAP, mP at the largest k, recall at the smallest
        top, one = max(first.mp), min(first.recall)
        rows.append((f"{kind} mAP", [_pct(m.kinds[kind].map) for m in modes]))
        rows.append((f"{kind} mP@{top}", [_pct(m.kinds[kind].mp[top]) for m in modes]))
        rows.append((f"{kind} recall@{one}", [_pct(m.kinds[kind].recall[one]) for m in modes]))
    if modes[0].gap is not None:
        rows.append(("GAP", [_pct(m.gap) for m in modes]))
        rows.append(("accuracy", [_pct(m.accuracy) for m in modes]))
    rows.append(("s / query", [m.seconds_per_query for m in modes]))
    return rows


def _pct(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * value


def format_table(result: EvalResult) -> Any:
    """A rich Table: one row per metric, one column per mode, and the reranking gain."""
    from rich.table import Table

    modes = list(result.modes)
    table = Table(
        title=f"{result.dataset}: {result.n_queries} queries, {result.n_database} database images"
    )
    table.add_column("metric")
    for m in modes:
        table.add_column(m, justify="right")
    if len(modes) == 2:
        table.add_column("gain", justify="right")
    for name, values in summary_rows(result):
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        if len(values) == 2:
            a, b = values
            cells.append("-" if a is None or b is None else f"{b - a:+.2f}")
        table.add_row(name, *cells)
    return table


def to_dict(result: EvalResult) -> dict[str, Any]:
    """JSON-ready dict (NaN -> None; per-query APs only under `queries`)."""
    data = asdict(result)
    for mode in data["modes"].values():
        for metrics in (*mode["protocols"].values(), *mode["kinds"].values()):
            metrics.pop("per_query_ap", None)
    return _clean(data)


def write_json(result: EvalResult, path: str | Path) -> Path:
    """Write the result as JSON (temp file + os.replace)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(result), indent=2, allow_nan=False))
    os.replace(tmp, path)
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
