"""What the service does, route by route, on one open index.

`Service` is opened once per process (in the app's lifespan): it holds the Retriever (models
and index), the recent searches, and two lanes of work (retrieval.server.limits): searches,
recognitions and match pictures share one, index updates run one at a time on the other, so
writes are serialised inside the process (and across processes by the index's write lock) while
searches keep running on the generation they started on. Every job is one library call:
`Retriever.search`, `retrieval.pictures.result_picture`, `retrieval.updating.add_images` /
`remove_images`, `index.info.index_info`.

Uploaded images are decoded with `features.image.decode_bytes`, whose ImageReadError carries
the one-line reason the CLI prints (naming the uploaded file); uploads for the index are stored
under `<index>/uploads/`, named by their SHA-256, and catalogued by that path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from sqlalchemy import func, select

from features.core import ConfigError, IndexError_
from features.image import decode_bytes, load_image, resize_max
from index.atomic import write_bytes_atomic
from index.catalog import ImageRecord
from retrieval.api import Retriever
from retrieval.pictures import catalog_file, indexed_image, result_picture
from retrieval.search import SearchConf, result_json
from retrieval.server.errors import NotFound
from retrieval.server.limits import Lane
from retrieval.server.models import (
    AddResponse,
    Health,
    ImageList,
    ImageOut,
    IndexInfo,
    Outcome,
    RecognizeResponse,
    RemoveResponse,
    SearchResponse,
    UploadOutcome,
)
from retrieval.server.recent import RecentSearches
from retrieval.server.settings import ServerSettings
from retrieval.updating import UpdateReport, add_images, remove_images

logger = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"
THUMBNAILS_KEPT = 512
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "GIF": ".gif"}


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Picture:
    png: bytes
    matches: int
    inliers: int


class Service:
    def __init__(self, settings: ServerSettings, retriever: Retriever, scratch: Path) -> None:
        self.settings = settings
        self.retriever = retriever
        self.scratch = scratch
        self.recent = RecentSearches(scratch / "searches", settings.recent)
        self.uploads = Path(os.path.abspath(settings.index)) / UPLOADS_DIR
        self.reads = Lane("search", settings.concurrency, settings.queue, settings.timeout)
        self.writes = Lane("index update", 1, settings.write_queue, settings.write_timeout)
        self._thumbnails: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._thumbnails_lock = threading.Lock()
        self._owns_scratch = settings.scratch is None

    @classmethod
    def open(cls, settings: ServerSettings) -> Service:
        """Open the index and load its models (once, before the first request)."""
        retriever = Retriever.open(settings.index, db=settings.db, device=settings.device)
        retriever.extractors  # noqa: B018 -- load both models now and check their fingerprints
        scratch = settings.scratch or Path(tempfile.mkdtemp(prefix="retr-serve-"))
        return cls(settings, retriever, scratch)

    def close(self) -> None:
        self.reads.close()
        self.writes.close()
        if self._owns_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # --- searching -----------------------------------------------------------------------------

    async def search(self, upload: Upload, conf: SearchConf) -> SearchResponse:
        return await self.reads.run(self._search, upload, conf)

    def _search(self, upload: Upload, conf: SearchConf) -> SearchResponse:
        result = self.retriever.search(self.decode(upload), conf)
        matchers = {m.id: m.matcher for m in result.matches}
        search_id = self.recent.put(upload.data, result.query, conf, matchers)
        shown = result_json(upload.name, result)
        for match in shown["results"]:
            match["path"] = self.shown_path(match["path"])
        return SearchResponse.model_validate({**shown, "search_id": search_id})

    async def recognize(self, upload: Upload, conf: SearchConf) -> RecognizeResponse:
        return await self.reads.run(self._recognize, upload, conf)

    def _recognize(self, upload: Upload, conf: SearchConf) -> RecognizeResponse:
        rec = self.retriever.recognize(self.decode(upload), conf)
        return RecognizeResponse(
            label=rec.label, confidence=rec.confidence, evidence=list(rec.evidence)
        )

    async def match_picture(self, search_id: str, image_id: int) -> Picture:
        return await self.reads.run(self._match_picture, search_id, image_id)

    def _match_picture(self, search_id: str, image_id: int) -> Picture:
        recent = self.recent.get(search_id)
        if recent is None:
            raise NotFound(
                f"search {search_id} is not one of the last {self.settings.recent} searches; "
                "search again"
            )
        query = self.decode(Upload("query", recent.image))
        matcher = recent.matchers.get(image_id, "")
        picture = result_picture(
            self.retriever, query, recent.features, image_id, recent.conf, matcher
        )
        return Picture(picture.png(), picture.matches, picture.inliers)

    def decode(self, upload: Upload) -> np.ndarray:
        """The uploaded image as (H, W, 3) uint8 RGB; ImageReadError with the CLI's reason,
        naming the upload."""
        return decode_bytes(upload.data, upload.name, self.settings.max_pixels)

    # --- images ------------------------------------------------------------------------------

    def image_file(self, image_id: int) -> Path:
        """The file of an indexed image (only catalog rows reach the file system)."""
        image = indexed_image(self.retriever, image_id)
        if not image.file.is_file():
            raise NotFound(f"image {image_id}: its file {image.path} is gone")
        return image.file

    def thumbnail(self, image_id: int, size: int) -> bytes:
        """A JPEG of the image with its longer side at most `size` px (kept in an LRU)."""
        file = self.image_file(image_id)
        key = (str(file), file.stat().st_mtime_ns, size)
        with self._thumbnails_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        small, _ = resize_max(load_image(file), size)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        assert ok, "JPEG encoding of a uint8 image cannot fail"
        with self._thumbnails_lock:
            self._thumbnails[key] = jpeg = buf.tobytes()
            while len(self._thumbnails) > THUMBNAILS_KEPT:
                self._thumbnails.popitem(last=False)
        return jpeg

    def list_images(self, status: str | None, offset: int, limit: int) -> ImageList:
        """Catalog rows, by id, optionally of one status (failed rows carry their reason)."""
        where = [ImageRecord.status == status] if status else []
        with self.retriever.catalog.session() as s:
            total = s.scalar(select(func.count()).select_from(ImageRecord).where(*where)) or 0
            q = select(ImageRecord).where(*where).order_by(ImageRecord.id)
            rows = s.scalars(q.offset(offset).limit(limit))
            images = [
                ImageOut.model_validate(r, from_attributes=True).model_copy(
                    update={"path": self.shown_path(r.path)}
                )
                for r in rows
            ]
        return ImageList(total=total, offset=offset, images=images)

    # --- index updates -------------------------------------------------------------------------

    async def add(self, uploads: list[Upload], label: str | None) -> AddResponse:
        return await self.writes.run(self._add, uploads, label)

    def _add(self, uploads: list[Upload], label: str | None) -> AddResponse:
        if not uploads:
            raise ConfigError("no image uploaded (send one or more files in the 'images' field)")
        for upload in uploads:  # every file must decode before any is stored
            self.decode(upload)
        stored = [self._store(u) for u in uploads]
        try:
            report = add_images(
                self.settings.index,
                [path for path, _ in stored],
                label,
                wait=self.settings.write_timeout,
                models=self.retriever.extractors,  # the loaded models: no reload per upload
            )
        except BaseException:
            for path, created in stored:
                if created:
                    path.unlink(missing_ok=True)
            raise
        self.retriever.refresh()
        outcomes = [
            self._outcome(u, path, report) for u, (path, _) in zip(uploads, stored, strict=True)
        ]
        return AddResponse(files=outcomes, generation=self.retriever.generation)

    def _store(self, upload: Upload) -> tuple[Path, bool]:
        """Keep an upload under uploads/<sha256><ext>; returns its path and whether it is new."""
        digest = hashlib.sha256(upload.data).hexdigest()
        fmt = Image.open(io.BytesIO(upload.data)).format or ""
        ext = EXTENSIONS.get(fmt) or (f".{fmt.lower()}" if fmt else ".img")
        path = self.uploads / f"{digest}{ext}"
        if path.is_file():
            return path, False
        write_bytes_atomic(path, upload.data)
        return path, True

    def _outcome(self, upload: Upload, file: Path, report: UpdateReport) -> UploadOutcome:
        """What the add did to one stored upload, found by its catalog path."""
        with self.retriever.catalog.session() as s:
            q = select(ImageRecord).where(ImageRecord.path.in_(self._catalog_names(file)))
            record = s.scalars(q).first()
        if record is None:  # cannot happen after a successful add; say so rather than guess
            raise IndexError_(f"{upload.name}: stored as {file} but not in the catalog")
        outcome: Outcome = "unchanged"
        if record.path in report.added:
            outcome = "added"
        elif record.path in report.updated:
            outcome = "updated"
        elif record.status == "failed":
            outcome = "failed"
        elif record.status == "duplicate":
            outcome = "duplicate"
        return UploadOutcome(
            name=upload.name,
            path=self.shown_path(record.path),
            outcome=outcome,
            id=record.id,
            reason=record.reason,
        )

    def _catalog_names(self, file: Path) -> list[str]:
        """The catalog path of a stored upload: absolute, or relative to the corpus root when
        the index lies inside the corpus (as retrieval.updating catalogues it)."""
        names = [file.as_posix()]
        corpus = self.retriever.config.corpus
        if corpus and file.is_relative_to(corpus):
            names.append(file.relative_to(corpus).as_posix())
        return names

    async def remove(self, image_id: int) -> RemoveResponse:
        return await self.writes.run(self._remove, image_id)

    def _remove(self, image_id: int) -> RemoveResponse:
        record = self.retriever.catalog.get([image_id]).get(image_id)
        if record is None:
            raise NotFound(f"no image has id {image_id}")
        report = remove_images(self.settings.index, [image_id], wait=self.settings.write_timeout)
        if report.not_found:
            raise NotFound(f"no image has id {image_id}")
        file = catalog_file(record.path, self.retriever.config.corpus)
        if file.parent == self.uploads:  # our own copy of an upload: nothing else refers to it
            file.unlink(missing_ok=True)
        self.retriever.refresh()
        return RemoveResponse(removed=report.removed, generation=self.retriever.generation)

    # --- the index -----------------------------------------------------------------------------

    def health(self) -> Health:
        snapshot = self.retriever.snapshot()
        return Health(generation=snapshot.generation, images=snapshot.manifest.vector_count)

    def info(self) -> IndexInfo:
        """`retr index info`, with the index and corpus folders by name only, and what the page
        needs to know of the service (`service`: whether a token is needed, for writes or for
        everything, and the upload limits)."""
        info = self.retriever.info()
        info["index"] = Path(str(info["index"])).name
        config = dict(info.get("config") or {})  # type: ignore[call-overload]
        if config.get("corpus"):
            config["corpus"] = Path(str(config["corpus"])).name
        settings = self.settings
        shown = {
            "token_required": settings.token is not None,
            "private_reads": settings.private_reads,
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels,
        }
        return IndexInfo.model_validate({**info, "config": config, "service": shown})

    def shown_path(self, path: str) -> str:
        """A catalog path as clients see it: never an absolute server path. Corpus paths are
        already relative to the corpus; uploads are `uploads/<sha256>.<ext>`; any other
        absolute path (a file added from outside the corpus) shows its name only."""
        p = Path(path)
        if not p.is_absolute():
            return path
        if p.parent == self.uploads:
            return f"{UPLOADS_DIR}/{p.name}"
        return p.name
