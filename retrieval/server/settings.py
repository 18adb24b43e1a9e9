"""What `retr serve` can be told: the index, the token, and the limits of every request."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from features.core import StrictConf
from features.image import MAX_PIXELS


class ServerSettings(StrictConf):
    """One service's configuration (the `retr serve` options are these fields)."""

    index: Path
    """Index directory."""
    db: str | None = None
    """SQLAlchemy URL of the catalog (default: the index's own)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    token: str | None = None
    """Bearer token that index updates (POST /images, DELETE /images/{id}) need; None: open."""
    private_reads: bool = False
    """With a token: searches, images, matches and /info need the token too (only the page,
    its static files and /health stay open)."""
    max_body_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 above it)."""
    max_pixels: int = Field(default=MAX_PIXELS, ge=1)
    """Largest uploaded image, in pixels (the same cap as indexing)."""
    concurrency: int = Field(default=2, ge=1)
    """Searches (and match pictures) computed at once by one process."""
    queue: int = Field(default=16, ge=0)
    """Searches waiting for a free slot; more get 503 with Retry-After."""
    timeout: float = Field(default=60.0, gt=0)
    """Seconds a search, recognition or match picture may take, waiting included (504 after)."""
    write_queue: int = Field(default=8, ge=0)
    """Index updates waiting behind the running one; more get 503 with Retry-After."""
    write_timeout: float = Field(default=600.0, gt=0)
    """Seconds an index update may take, waiting included (504 after; the update still
    finishes, and GET /info shows it)."""
    retry_after: int = Field(default=2, ge=1)
    """Seconds a client told 503 should wait."""
    recent: int = Field(default=256, ge=1)
    """Recent searches whose match pictures stay available."""
    scratch: Path | None = None
    """Folder for recent searches (shared by the worker processes); None: a temporary one."""

    @model_validator(mode="after")
    def _private_reads_need_a_token(self) -> ServerSettings:
        if self.private_reads and not self.token:
            raise ValueError("private_reads needs a token (--token or $RETR_TOKEN)")
        return self
