"""Evaluation datasets: the database to index, the queries, and their ground truth.

- Revisited Oxford5k / Paris6k (`revisited`), in their published layout:
  `<root>/jpg/<name>.jpg` and `<root>/gnd_<dataset>.pkl`, a dict with `imlist`, `qimlist` and
  `gnd[i]` = {`bbx`, `easy`, `hard`, `junk`} (indices into `imlist`). Queries are cropped to their
  bounding box, as the protocol prescribes. The revisitop 1M distractors (`<dir>/jpg/...` listed by
  `<dir>/revisitop1m.txt`) can be added to the database.
- Google Landmarks v2 recognition (`gldv2`): database = the `train` images (labels from
  `train.csv`: id,url,landmark_id, or `train_clean.csv`: landmark_id,images), queries = the `test`
  images listed in `recognition_solution_v2.1.csv` (id,landmarks,Usage; `landmarks` is
  space-separated and empty for images that show no landmark). Images are `<split>/a/b/c/<id>.jpg`.
- The shared landmarks-mini set (`landmarks_mini`), described by its `manifest.csv`.

A database entry is a path relative to the evaluation corpus; the runner links each one to its
file. The official files are fetched by retrieval.evaluation.downloads.
"""

from __future__ import annotations

import csv
import functools
import inspect
import logging
import pickle
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.core import DatasetError
from features.image import load_image
from retrieval.evaluation.downloads import REVISITOP_GND_URL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DbImage:
    """One database image: `rel` is its path in the evaluation corpus, `path` the file."""

    rel: str
    path: Path
    label: str | None = None


@dataclass(frozen=True)
class Query:
    """One query and its ground truth.

    easy / hard / junk: database `rel` paths (datasets without difficulty levels put every
    positive in `easy`). bbox: (x1, y1, x2, y2) crop in pixels, or None for the whole image.
    labels: true landmark labels for recognition, empty for a non-landmark query; None when the
    dataset has no recognition ground truth.
    """

    name: str
    path: Path
    easy: frozenset[str] = frozenset()
    hard: frozenset[str] = frozenset()
    junk: frozenset[str] = frozenset()
    bbox: tuple[float, float, float, float] | None = None
    labels: frozenset[str] | None = None
    kind: str | None = None
    """What the query shows, for results reported per kind (landmarks-mini: landmark, place,
    wxbs); None when the dataset does not say."""


@dataclass(frozen=True)
class Dataset:
    """protocols: 'easy', 'medium', 'hard' for the revisited datasets, else 'all'."""

    name: str
    database: tuple[DbImage, ...]
    queries: tuple[Query, ...]
    protocols: tuple[str, ...] = ("all",)
    notes: tuple[str, ...] = field(default=())

    @property
    def has_labels(self) -> bool:
        return any(q.labels is not None for q in self.queries)


def query_image(query: Query) -> np.ndarray:
    """(H, W, 3) uint8 RGB query image, cropped to its bounding box.

    The box is rounded like PIL's crop (revisitop crops with PIL) but clipped to the image
    instead of padded with black.
    """
    rgb = load_image(query.path)
    if query.bbox is None:
        return rgb
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (int(round(float(v))) for v in query.bbox)
    x1, x2 = max(0, min(x1, w)), max(0, min(x2, w))
    y1, y2 = max(0, min(y1, h)), max(0, min(y2, h))
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{query.path}: box {query.bbox} lies outside the {w}x{h} image")
    return np.ascontiguousarray(rgb[y1:y2, x1:x2])


# --- Revisited Oxford / Paris ------------------------------------------------------------------

REVISITED = ("roxford5k", "rparis6k")


def revisited(name: str, root: str | Path, distractors: str | Path | None = None) -> Dataset:
    """Revisited Oxford5k or Paris6k from `root` (holding `jpg/` and `gnd_<name>.pkl`).

    distractors: the `revisitop1m` directory (`jpg/` + `revisitop1m.txt`) to add R1M.
    """
    name = name.lower()
    if name not in REVISITED:
        raise DatasetError(f"unknown dataset '{name}' (available: {', '.join(REVISITED)})")
    root = Path(root)
    gnd = _read_gnd(root / f"gnd_{name}.pkl")
    imlist, qimlist = list(gnd["imlist"]), list(gnd["qimlist"])
    rels = [f"jpg/{_with_ext(n)}" for n in imlist]
    database = [DbImage(rel, root / rel) for rel in rels]
    _require_files(database, f"{name} images in {root / 'jpg'}", f"download_{name}")
    queries = []
    for qname, entry in zip(qimlist, gnd["gnd"], strict=True):
        x1, y1, x2, y2 = (float(v) for v in np.ravel(entry["bbx"])[:4])
        queries.append(
            Query(
                name=str(qname),
                path=root / "jpg" / _with_ext(qname),
                easy=_pick(rels, entry, "easy"),
                hard=_pick(rels, entry, "hard"),
                junk=_pick(rels, entry, "junk"),
                bbox=(x1, y1, x2, y2),
            )
        )
    if distractors is not None:
        database += revisitop1m(distractors)
    return Dataset(name, tuple(database), tuple(queries), ("easy", "medium", "hard"))


def revisitop1m(root: str | Path) -> list[DbImage]:
    """The 1M distractors, in the order of `revisitop1m.txt`, as corpus paths `revisitop1m/...`."""
    root = Path(root)
    listing = root / "revisitop1m.txt"
    if not listing.is_file():
        raise DatasetError(f"{listing} is missing; use download_revisitop1m('{root.parent}')")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    images = [DbImage(f"revisitop1m/{_with_ext(n)}", root / "jpg" / _with_ext(n)) for n in names]
    _require_files(images, f"revisitop1m images in {root / 'jpg'}", "download_revisitop1m")
    return images


def _read_gnd(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing; fetch it with download_{path.stem[4:]}('{path.parent.parent}') "
            f"or from {REVISITOP_GND_URL.format(name=path.stem[4:])}"
        )
    try:
        with open(path, "rb") as f:
            gnd = pickle.load(f)  # the official ground truth is a pickle; open only trusted files
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise DatasetError(f"{path}: not a readable ground-truth pickle ({exc})") from None
    if not isinstance(gnd, dict) or not {"imlist", "qimlist", "gnd"} <= set(gnd):
        raise DatasetError(f"{path}: expected a dict with imlist, qimlist and gnd")
    if len(gnd["gnd"]) != len(gnd["qimlist"]):
        n_gnd, n_q = len(gnd["gnd"]), len(gnd["qimlist"])
        raise DatasetError(f"{path}: {n_gnd} gnd entries for {n_q} queries")
    return gnd


def _pick(rels: Sequence[str], entry: dict[str, Any], key: str) -> frozenset[str]:
    """Corpus paths of the database indices `entry[key]` (absent key: none)."""
    return frozenset(rels[int(i)] for i in np.ravel(entry.get(key, [])))


def _with_ext(name: object) -> str:
    """revisitop lists names without extension; the files are JPEGs."""
    text = str(name)
    return text if Path(text).suffix else text + ".jpg"


def _require_files(images: Sequence[DbImage], what: str, helper: str) -> None:
    missing = [im.path for im in images if not im.path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} {what} are missing (first: {missing[0]}); "
            f"fetch them with {helper}(...)"
        )


# --- Google Landmarks v2 -------------------------------------------------------------------------


def gldv2_path(root: Path, split: str, image_id: str) -> Path:
    """GLDv2 stores image `0123abcd...` as `<split>/0/1/2/0123abcd....jpg`."""
    return root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def gldv2(
    root: str | Path,
    train_csv: str = "train.csv",
    solution_csv: str = "recognition_solution_v2.1.csv",
    usage: str | None = None,
    max_queries: int | None = None,
) -> Dataset:
    """GLDv2 recognition: database = train images on disk, queries = solution rows on disk.

    Only images present under `<root>/train` and `<root>/test` are used (the full train set is
    500 GB); how many were left out is recorded in `Dataset.notes`. `usage` keeps only the
    'Public' or 'Private' queries. GAP still counts every kept query that has a true label, also
    when that landmark has no image in the (partial) database, as the challenge does.
    """
    root = Path(root)
    labels = _read_train_labels(root / train_csv)
    database = [
        DbImage(f"train/{i[0]}/{i[1]}/{i[2]}/{i}.jpg", gldv2_path(root, "train", i), lab)
        for i, lab in labels.items()
    ]
    present = [im for im in database if im.path.is_file()]
    by_label: dict[str, set[str]] = defaultdict(set)
    for im in present:
        by_label[im.label or ""].add(im.rel)
    rows = _read_solution(root / solution_csv, usage)
    queries = []
    for qid, landmarks in rows:
        path = gldv2_path(root, "test", qid)
        if not path.is_file():
            continue
        positives = frozenset().union(*(by_label.get(lab, set()) for lab in landmarks))
        queries.append(Query(qid, path, easy=positives, labels=frozenset(landmarks)))
        if max_queries is not None and len(queries) >= max_queries:
            break
    if not present or not queries:
        raise DatasetError(
            f"{root}: no GLDv2 images found ({len(present)} train, {len(queries)} test); "
            "fetch them with download_gldv2(...)"
        )
    notes = (
        f"database: {len(present)} of {len(database)} train images on disk",
        f"queries: {len(queries)} of {len(rows)} solution rows on disk",
    )
    return Dataset("gldv2", tuple(present), tuple(queries), ("all",), notes)


def _read_csv(path: Path, columns: set[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; fetch it with download_gldv2('{path.parent}')")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not columns <= set(reader.fieldnames or ()):
            found = reader.fieldnames
            raise DatasetError(f"{path}: expected columns {sorted(columns)}, got {found}")
        return list(reader)


def _read_train_labels(path: Path) -> dict[str, str]:
    """image id -> landmark id, from train.csv (id,url,landmark_id) or train_clean.csv
    (landmark_id,images with space-separated ids)."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; fetch it with download_gldv2('{path.parent}')")
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if "images" in header:
        rows = _read_csv(path, {"landmark_id", "images"})
        return {i: r["landmark_id"] for r in rows for i in r["images"].split()}
    rows = _read_csv(path, {"id", "landmark_id"})
    return {r["id"]: r["landmark_id"] for r in rows}


def _read_solution(path: Path, usage: str | None) -> list[tuple[str, list[str]]]:
    rows = _read_csv(path, {"id", "landmarks"})
    if usage is not None:
        rows = [r for r in rows if r.get("Usage", "") == usage]
    return [(r["id"], (r["landmarks"] or "").split()) for r in rows]


# --- landmarks-mini ------------------------------------------------------------------------------

QUERY_MODES = ("first", "all")


def landmarks_mini(
    root: str | Path,
    queries: str = "first",
    kinds: Collection[str] | None = None,
    groups: Collection[str] | None = None,
    max_distractors: int | None = None,
) -> Dataset:
    """The landmarks-mini set from its `manifest.csv`; relevance = same non-empty `group`.

    queries="first": the first image (manifest order) of every group whose kind is in `kinds` is
    a query and is held out of the database. queries="all" (leave-one-out): every image of those
    kinds is a query, the database keeps every image and each query's own image is junk.
    kinds=None: ("landmark",) for "first", every labelled kind (landmark, place, wxbs) for
    "all". Distractors are never queries. `groups` and `max_distractors` (first n in manifest order)
    take a subset for quick runs.
    """
    if queries not in QUERY_MODES:
        raise DatasetError(f"unknown query mode '{queries}' (available: {', '.join(QUERY_MODES)})")
    root = Path(root)
    rows = _read_manifest(root / "manifest.csv", groups, max_distractors)
    if kinds is None:
        kinds = ("landmark",) if queries == "first" else {r["kind"] for r in rows}
    members: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["group"]:
            members[r["group"]].append(r["path"])
    chosen = [
        r
        for r in rows
        if r["kind"] in kinds
        and r["kind"] != "distractor"
        and r["group"]
        and (queries == "all" or members[r["group"]][0] == r["path"])
    ]
    held_out = {r["path"] for r in chosen} if queries == "first" else set()
    database = tuple(
        DbImage(r["path"], root / r["path"], r["group"] or None)
        for r in rows
        if r["path"] not in held_out
    )
    qs = tuple(
        Query(
            name=r["path"],
            path=root / r["path"],
            easy=frozenset(p for p in members[r["group"]] if p != r["path"]),
            junk=frozenset({r["path"]}) if queries == "all" else frozenset(),
            labels=frozenset({r["group"]}),
            kind=r["kind"],
        )
        for r in chosen
    )
    _require_files(database, f"landmarks-mini images in {root}", "a checkout of the shared data")
    return Dataset(f"landmarks-mini[{queries}]", database, qs, ("all",))


def _read_manifest(
    path: Path, groups: Collection[str] | None, max_distractors: int | None
) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing: point to the landmarks-mini directory")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"path", "group", "kind"} <= set(rows[0]):
        raise DatasetError(f"{path}: expected columns path,group,kind, got {list(rows[0])}")
    if groups is not None:
        unknown = set(groups) - {r["group"] for r in rows}
        if unknown:
            raise DatasetError(f"{path}: unknown groups {sorted(unknown)}")
        rows = [r for r in rows if r["group"] in groups or r["kind"] == "distractor"]
    if max_distractors is not None:
        distractors = [r["path"] for r in rows if r["kind"] == "distractor"][:max_distractors]
        rows = [r for r in rows if r["kind"] != "distractor" or r["path"] in distractors]
    return rows


# --- by name -------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., Dataset]] = {
    "roxford5k": functools.partial(revisited, "roxford5k"),
    "rparis6k": functools.partial(revisited, "rparis6k"),
    "gldv2": gldv2,
    "mini": landmarks_mini,
}


def open_dataset(name: str, root: str | Path, **options: Any) -> Dataset:
    """The dataset `name` (roxford5k, rparis6k, gldv2, mini) stored at `root`."""
    key = name.lower()
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}' (available: {', '.join(DATASETS)})")
    adapter = DATASETS[key]
    try:
        inspect.signature(adapter).bind(root, **options)
    except TypeError as exc:  # an option this adapter does not take
        raise DatasetError(f"dataset '{name}': {exc}") from None
    return adapter(root, **options)
