"""Typed request and response bodies of the service (what /docs shows). A result is the
library's own `retrieval.search.Match`, so the service cannot drift from `retr query --json`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from retrieval.search import Match


class SearchResponse(BaseModel):
    """`retr query --json`'s object for one query (retrieval.search.result_json), plus the
    search id that names this search in GET /matches/{search_id}/{image_id}.png."""

    model_config = ConfigDict(extra="allow")  # whatever result_json adds passes through

    search_id: str
    query: str
    landmark: str
    confidence: float
    evidence: list[int]
    """Ids of the results that voted for the landmark."""
    results: list[Match]
    timings: dict[str, float]
    """Seconds per stage of this search."""
    generation: int
    """The index generation the search ran on."""


class RecognizeResponse(BaseModel):
    label: str
    """The landmark, or "unknown" when no result verifies."""
    confidence: float
    evidence: list[Match]


class ImageOut(BaseModel):
    """One catalog row."""

    id: int
    path: str
    label: str | None
    status: str
    reason: str | None


class ImageList(BaseModel):
    total: int
    """Rows with this status (all rows when none was asked)."""
    offset: int
    images: list[ImageOut]


Outcome = Literal["added", "updated", "unchanged", "duplicate", "failed"]


class UploadOutcome(BaseModel):
    """What happened to one uploaded file."""

    name: str
    """The file name the client sent."""
    path: str
    """Its catalog path (the stored copy, named by content hash)."""
    outcome: Outcome
    id: int | None = None
    reason: str | None = None


class AddResponse(BaseModel):
    files: list[UploadOutcome]
    generation: int


class RemoveResponse(BaseModel):
    removed: list[int]
    generation: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    generation: int
    images: int
    """Vectors searchable in that generation."""


class IndexInfo(BaseModel):
    """index.info.index_info: what `retr index info --json` prints."""

    model_config = ConfigDict(extra="allow")

    index: str
    generation: int
    config: dict[str, object]
    images: dict[str, int]
    """Catalog rows per status."""
    vectors: int
    segments: int
    pending: int
    bytes: dict[str, int]
    service: dict[str, object] = {}
    """What clients need to know of this service: token_required (for index updates),
    private_reads (for everything), max_body_bytes, max_pixels."""
