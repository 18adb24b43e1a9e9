"""The image catalog: one row per corpus file, in any SQLAlchemy database (SQLite by default).

The row id is the id everything else uses: the FAISS id and the feature-store key.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone

from sqlalchemy import DateTime, String, Text, create_engine, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from features.core import IndexError_


class Status(str, enum.Enum):
    INDEXED = "indexed"
    FAILED = "failed"
    DUPLICATE = "duplicate"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ImageRecord(Base):
    """One corpus file. `path` is relative to the corpus root, with forward slashes."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int | None]
    height: Mapped[int | None]
    label: Mapped[str | None] = mapped_column(String(256), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )

    def __repr__(self) -> str:
        return f"ImageRecord(id={self.id}, path={self.path!r}, status={self.status})"


class Catalog:
    """Typed access to the catalog tables of one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = create_engine(url)
            Base.metadata.create_all(self.engine)
        except (SQLAlchemyError, ImportError) as exc:
            raise IndexError_(f"cannot open catalog database {url}: {exc}") from None

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def all(self) -> list[ImageRecord]:
        with self.session() as s:
            return list(s.scalars(select(ImageRecord).order_by(ImageRecord.id)))

    def by_path(self) -> dict[str, ImageRecord]:
        return {r.path: r for r in self.all()}

    def get(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = list(ids)
        with self.session() as s:
            rows = s.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids)))
            return {r.id: r for r in rows}

    def indexed_ids(self) -> list[int]:
        with self.session() as s:
            q = select(ImageRecord.id).where(ImageRecord.status == Status.INDEXED.value)
            return list(s.scalars(q.order_by(ImageRecord.id)))

    def find_indexed_by_hash(self, sha256: str) -> ImageRecord | None:
        with self.session() as s:
            q = select(ImageRecord).where(
                ImageRecord.sha256 == sha256, ImageRecord.status == Status.INDEXED.value
            )
            return s.scalars(q.limit(1)).first()

    def save(self, record: ImageRecord) -> ImageRecord:
        """Insert or update one record and commit; the returned record carries its id."""
        with self.session() as s:
            merged = s.merge(record)
            s.commit()
            return merged

    def remove(self, ids: Iterable[int]) -> None:
        with self.session() as s:
            s.execute(delete(ImageRecord).where(ImageRecord.id.in_(list(ids))))
            s.commit()

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.all()))
