"""Match pictures: two images side by side with the correspondences that verified them.

`match_picture` is the one drawing function: it matches and verifies the pair with
`retrieval.rerank.verify_pair` and the matcher that scored the result (`Match.matcher`), so the
picture shows exactly what the rerank counted, and draws inliers in green, rejected matches in
red (optional) and keypoints (optional), under a caption with the counts. The web page
(`GET /matches/...`), `retr query --show DIR` (`result_picture` per result) and
`retr match A B --out pair.png` (`match_files`, no index needed) all go through it.

A result that no matcher scored (a search without rerank) is drawn with the matcher that
decides the index's plan (`pair_matcher`: the last stage of "mnn+lightglue").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from features.core import RetrError
from features.image import ImageInput, load_image
from features.registry import DEFAULT_LOCAL
from features.types import LocalFeatures
from index.atomic import write_bytes_atomic
from retrieval.rerank import PairMatch, RerankConf, verify_pair
from retrieval.search import SearchConf

if TYPE_CHECKING:
    from retrieval.api import Retriever
    from retrieval.search import SearchResult

logger = logging.getLogger(__name__)

HEIGHT = 480
"""Height (px) both images are scaled to in a picture (never above the taller one's own)."""
GAP = 8
CAPTION = 28
INLIER = (40, 200, 60)
REJECTED = (220, 50, 50)
KEYPOINT = (250, 200, 40)


class ImageNotFoundError(RetrError, LookupError):
    """No indexed image has this catalog id (never indexed, failed, or removed)."""


@dataclass(frozen=True)
class MatchPicture:
    """image: (H, W, 3) uint8 RGB; pair: the matches (K, 2) and their verification."""

    image: np.ndarray
    pair: PairMatch

    @property
    def matches(self) -> int:
        return len(self.pair.matches)

    @property
    def inliers(self) -> int:
        return self.pair.inliers

    def png(self) -> bytes:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(self.image, cv2.COLOR_RGB2BGR))
        assert ok, "PNG encoding of a uint8 image cannot fail"
        return buf.tobytes()

    def save(self, path: str | Path) -> Path:
        """Write the picture as a PNG (atomically) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, self.png())
        return path


def match_picture(
    image_a: ImageInput,
    image_b: ImageInput,
    feats_a: LocalFeatures,
    feats_b: LocalFeatures,
    conf: RerankConf | None = None,
    *,
    matcher: str = "mnn",
    local_method: str = DEFAULT_LOCAL,
    device: Any = None,
    rejected: bool = True,
    keypoints: bool = False,
    height: int = HEIGHT,
) -> MatchPicture:
    """Match and verify `feats_a` against `feats_b` as the rerank does with `matcher` (one
    matcher, not a plan) on features of `local_method`, and draw the pair.

    `feats_*` are the local features of the images (keypoints in their original pixels);
    `rejected`: also draw the matches RANSAC rejected; `keypoints`: draw every keypoint."""
    pair = verify_pair(feats_a, feats_b, conf or RerankConf(), matcher, local_method, device)
    a, b = load_image(image_a), load_image(image_b)
    canvas = _draw(a, b, feats_a.keypoints, feats_b.keypoints, pair, rejected, keypoints, height)
    verdict = "verified" if pair.verified else "not verified"
    caption = f"{matcher}: {len(pair.matches)} matches, {pair.inliers} inliers ({verdict})"
    cv2.putText(canvas, caption, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return MatchPicture(canvas, pair)


def _draw(
    a: np.ndarray,
    b: np.ndarray,
    kpts_a: np.ndarray,
    kpts_b: np.ndarray,
    pair: PairMatch,
    rejected: bool,
    keypoints: bool,
    height: int,
) -> np.ndarray:
    """Both images at one height under a caption band, the matches drawn across."""
    side = min(height, max(a.shape[0], b.shape[0]))
    sa, sb = side / a.shape[0], side / b.shape[0]
    left, right = _scaled(a, sa), _scaled(b, sb)
    canvas = np.full((CAPTION + side, left.shape[1] + GAP + right.shape[1], 3), 255, np.uint8)
    canvas[CAPTION:, : left.shape[1]] = left
    canvas[CAPTION:, left.shape[1] + GAP :] = right
    pa = _to_canvas(kpts_a, sa, (0, CAPTION))
    pb = _to_canvas(kpts_b, sb, (left.shape[1] + GAP, CAPTION))
    if keypoints:
        for p in np.concatenate([pa, pb]):
            cv2.circle(canvas, _pt(p), 2, KEYPOINT, 1, cv2.LINE_AA)
    mask = _inlier_mask(pair)
    if rejected:  # faint, under the inliers
        overlay = canvas.copy()
        for qa, qb in pair.matches[~mask]:
            cv2.line(overlay, _pt(pa[qa]), _pt(pb[qb]), REJECTED, 1, cv2.LINE_AA)
        canvas = cv2.addWeighted(overlay, 0.45, canvas, 0.55, 0)
    for qa, qb in pair.matches[mask]:
        cv2.line(canvas, _pt(pa[qa]), _pt(pb[qb]), INLIER, 1, cv2.LINE_AA)
        for p in (pa[qa], pb[qb]):
            cv2.circle(canvas, _pt(p), 2, INLIER, -1, cv2.LINE_AA)
    return canvas


def _scaled(image: np.ndarray, s: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def _to_canvas(xy: np.ndarray, s: float, offset: tuple[int, int]) -> np.ndarray:
    """Keypoints (N, 2) in original pixels -> canvas pixels (pixel centres stay centres)."""
    return (xy + 0.5) * s - 0.5 + np.asarray(offset, np.float32)


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


def _inlier_mask(pair: PairMatch) -> np.ndarray:
    mask = pair.verification.mask
    if mask is None or len(mask) != len(pair.matches):
        return np.zeros(len(pair.matches), bool)
    return np.asarray(mask, bool)


# --- pictures of index images --------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedImage:
    """An indexed image: its catalog row's id, path and label, and the file it was read from."""

    id: int
    path: str
    label: str | None
    file: Path


def catalog_file(path: str, corpus: str | None) -> Path:
    """The file of a catalog path: absolute paths as they are, others under the corpus root."""
    p = Path(path)
    return p if p.is_absolute() or corpus is None else Path(corpus) / p


def indexed_image(retriever: Retriever, image_id: int) -> IndexedImage:
    """The indexed image with catalog id `image_id`, or ImageNotFoundError."""
    record = retriever.catalog.get([image_id]).get(image_id)
    if record is None or record.status != "indexed":
        raise ImageNotFoundError(f"no indexed image has id {image_id}")
    file = catalog_file(record.path, retriever.config.corpus)
    return IndexedImage(record.id, record.path, record.label, file)


def pair_matcher(plan: str, local_method: str, device: Any = None) -> str:
    """The matcher that decides a pair under `plan` (an index's or a query's `matcher`): the
    plan resolved for the device, then its last stage."""
    from retrieval.matchers import resolve_plan, stages

    return stages(resolve_plan(plan, local_method, device))[-1]


def result_picture(
    retriever: Retriever,
    query: np.ndarray,
    query_feats: LocalFeatures | None,
    image_id: int,
    conf: SearchConf | None = None,
    matcher: str = "",
    **style: Any,
) -> MatchPicture:
    """The match picture of a query (decoded (H, W, 3) RGB, and its local features when the
    search computed them) against indexed image `image_id`, from its stored features.
    `matcher`: the one that scored this result (`Match.matcher`; "" when none did)."""
    conf = conf or SearchConf()
    target = indexed_image(retriever, image_id)
    stored = retriever.local_features([image_id])
    if not stored:
        raise ImageNotFoundError(f"image {image_id} was removed from the index")
    feats = query_features(retriever, query, query_feats)
    method = retriever.config.local_method
    matcher = matcher or pair_matcher(conf.matcher or retriever.config.matcher, method)
    return match_picture(
        query,
        target.file,
        feats,
        stored[0],
        conf.rerank_conf,
        matcher=matcher,
        local_method=method,
        device=retriever.device,
        **style,
    )


def query_features(
    retriever: Retriever, query: np.ndarray, known: LocalFeatures | None = None
) -> LocalFeatures:
    """`known`, or the local features of `query` extracted as a search does (a search without
    rerank extracts none)."""
    if known is not None:
        return known
    local = retriever.extractors.describe(query).local
    assert local is not None
    return local


def write_result_pictures(
    retriever: Retriever,
    query: ImageInput,
    result: SearchResult,
    folder: str | Path,
    conf: SearchConf | None = None,
    **style: Any,
) -> list[Path]:
    """One PNG per result of `result` (the search of `query` with `conf`) in `folder`, named
    `<query stem>-<rank>-<image id>.png`; returns the paths written."""
    rgb = load_image(query)
    stem = Path(query).stem if isinstance(query, str | Path) else "query"
    feats = query_features(retriever, rgb, result.query)
    written = []
    for rank, m in enumerate(result.matches, 1):
        picture = result_picture(retriever, rgb, feats, m.id, conf, m.matcher, **style)
        written.append(picture.save(Path(folder) / f"{stem}-{rank:02d}-{m.id}.png"))
    return written


def match_files(
    image_a: ImageInput,
    image_b: ImageInput,
    local_method: str = DEFAULT_LOCAL,
    local_conf: dict[str, Any] | None = None,
    matcher: str = "auto",
    conf: RerankConf | None = None,
    device: Any = None,
    **style: Any,
) -> MatchPicture:
    """Any two images, no index: extract local features (`local_method`), match with the
    matcher that decides `matcher` (a plan: `pair_matcher`), verify and draw (`retr match A B
    --out pair.png`)."""
    from features.registry import load_local

    extractor = load_local(local_method, local_conf, device)
    a, b = load_image(image_a), load_image(image_b)
    chosen = pair_matcher(matcher, local_method, device)
    fa, fb = extractor.extract(a), extractor.extract(b)
    return match_picture(
        a, b, fa, fb, conf, matcher=chosen, local_method=local_method, device=device, **style
    )
