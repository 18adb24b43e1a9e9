"""The image catalog: one row per corpus file, in any SQLAlchemy database (SQLite by default).

The row id is the id everything else uses: the FAISS id and the feature-store key. Ids are never
reused (AUTOINCREMENT on SQLite, a sequence elsewhere).

Statuses: `indexed` (features published), `pending` (features extracted or being extracted by an
unfinished build; becomes `indexed` when the build publishes), `failed` and `duplicate` (no
features; `reason` says why). Which images searches can return is decided by the index's
manifest, not by this table (index.manifest); the statuses are what a user reads, and the
writer keeps them in step.

Only `retr index build` creates a catalog (`create=True`); every other use opens an existing one,
so a mistyped `--db` never produces an empty catalog that silently answers nothing. SQLite runs
in WAL mode with a busy timeout, so readers and the one writer do not block each other. URLs in
messages have their password masked.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from features.core import IndexError_

LOOKUP_BATCH = 500
"""Ids per `IN (...)` lookup (SQLite's bound-parameter limit is 999 on old builds)."""
BUSY_TIMEOUT_MS = 30_000


class Status(str, enum.Enum):
    INDEXED = "indexed"
    PENDING = "pending"
    FAILED = "failed"
    DUPLICATE = "duplicate"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ImageRecord(Base):
    """One corpus file. `path` is relative to the corpus root, with forward slashes."""

    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}

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


@dataclass(frozen=True)
class RowChange:
    """A row to insert (id None) or update (id given)."""

    path: str
    sha256: str
    label: str | None
    status: Status
    reason: str | None = None
    id: int | None = None
    size: tuple[int, int] | None = None
    """(width, height), when known."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparsable database URL>"


class Catalog:
    """Typed access to the catalog table of one database URL.

    create: make the table when it is missing (only `retr index build` does); otherwise a
    database without it is an error naming the URL. `hint` is appended to error messages (the
    command that fixes the index).
    """

    def __init__(self, url: str, create: bool = False, hint: str = "") -> None:
        self.url = url
        self.shown = mask_url(url)
        self.hint = hint
        sqlite_file = _sqlite_file(url)
        if not create and sqlite_file is not None and not sqlite_file.is_file():
            raise IndexError_(f"catalog file {sqlite_file} is missing{self._hint()}")
        try:
            self.engine: Engine = create_engine(url, connect_args=_connect_args(url))
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            with self._guard("open"):
                if create:
                    Base.metadata.create_all(self.engine)
                elif not inspect(self.engine).has_table(ImageRecord.__tablename__):
                    raise IndexError_(
                        f"catalog {self.shown} holds no retr catalog (no `images` table); pass "
                        f"the --db the index was built with{self._hint()}"
                    )
        except (SQLAlchemyError, ImportError, ArgumentError, ValueError) as exc:
            raise IndexError_(
                f"cannot open catalog {self.shown}: {_first_line(exc)}{self._hint()}"
            ) from None

    def _hint(self) -> str:
        return f"; {self.hint}" if self.hint else ""

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Database errors -> one IndexError_ line naming the catalog (password masked)."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise IndexError_(
                f"catalog {self.shown}: {what} failed: {_first_line(exc)}{self._hint()}"
            ) from None

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # --- reads ---------------------------------------------------------------------------------

    def all(self) -> list[ImageRecord]:
        with self._guard("reading"), self.session() as s:
            return list(s.scalars(select(ImageRecord).order_by(ImageRecord.id)))

    def by_path(self) -> dict[str, ImageRecord]:
        return {r.path: r for r in self.all()}

    def get(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Records of `ids` (missing ones left out), looked up in batches."""
        wanted = sorted({int(i) for i in ids})
        out: dict[int, ImageRecord] = {}
        with self._guard("lookup"), self.session() as s:
            for start in range(0, len(wanted), LOOKUP_BATCH):
                part = wanted[start : start + LOOKUP_BATCH]
                rows = s.scalars(select(ImageRecord).where(ImageRecord.id.in_(part)))
                out.update((r.id, r) for r in rows)
        return out

    def with_status(self, *statuses: Status) -> list[ImageRecord]:
        with self._guard("reading"), self.session() as s:
            q = select(ImageRecord).where(ImageRecord.status.in_([st.value for st in statuses]))
            return list(s.scalars(q.order_by(ImageRecord.id)))

    def ids_with_status(self, *statuses: Status) -> list[int]:
        with self._guard("reading"), self.session() as s:
            q = select(ImageRecord.id).where(ImageRecord.status.in_([st.value for st in statuses]))
            return list(s.scalars(q.order_by(ImageRecord.id)))

    def indexed_ids(self) -> list[int]:
        return self.ids_with_status(Status.INDEXED)

    def find_by_hash(self, sha256: str, statuses: Sequence[Status]) -> list[ImageRecord]:
        with self._guard("lookup"), self.session() as s:
            q = select(ImageRecord).where(
                ImageRecord.sha256 == sha256,
                ImageRecord.status.in_([st.value for st in statuses]),
            )
            return list(s.scalars(q.order_by(ImageRecord.id)))

    def status_counts(self) -> dict[str, int]:
        """Rows per status (one GROUP BY)."""
        with self._guard("counting"), self.session() as s:
            q = select(ImageRecord.status, func.count()).group_by(ImageRecord.status)
            return {str(st): int(n) for st, n in s.execute(q)}

    def is_empty(self) -> bool:
        with self._guard("counting"), self.session() as s:
            return s.scalar(select(ImageRecord.id).limit(1)) is None

    def count(self) -> int:
        with self._guard("counting"), self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ImageRecord)) or 0)

    # --- writes --------------------------------------------------------------------------------

    def upsert(self, changes: Sequence[RowChange]) -> list[int]:
        """Insert or update rows in one transaction; returns their ids, in order."""
        with self._guard("writing"), self.session() as s:
            out = []
            for c in changes:
                values: dict[str, Any] = {
                    "path": c.path,
                    "sha256": c.sha256,
                    "label": c.label,
                    "status": c.status.value,
                    "reason": c.reason,
                }
                if c.size is not None:
                    values["width"], values["height"] = c.size
                rec = s.merge(ImageRecord(id=c.id, **values))
                s.flush()
                out.append(rec.id)
            s.commit()
            return out

    def insert_with_ids(self, records: Sequence[ImageRecord]) -> None:
        """Rows with their ids given (catalog repair)."""
        with self._guard("writing"), self.session() as s:
            s.add_all(records)
            s.commit()

    def set_label(self, image_id: int, label: str | None) -> None:
        with self._guard("writing"), self.session() as s:
            s.execute(update(ImageRecord).where(ImageRecord.id == image_id).values(label=label))
            s.commit()

    def set_status(self, ids: Iterable[int], status: Status, reason: str | None = None) -> None:
        wanted = sorted({int(i) for i in ids})
        with self._guard("writing"), self.session() as s:
            for start in range(0, len(wanted), LOOKUP_BATCH):
                part = wanted[start : start + LOOKUP_BATCH]
                s.execute(
                    update(ImageRecord)
                    .where(ImageRecord.id.in_(part))
                    .values(status=status.value, reason=reason)
                )
            s.commit()

    def remove(self, ids: Iterable[int]) -> None:
        wanted = sorted({int(i) for i in ids})
        with self._guard("deleting"), self.session() as s:
            for start in range(0, len(wanted), LOOKUP_BATCH):
                part = wanted[start : start + LOOKUP_BATCH]
                s.execute(delete(ImageRecord).where(ImageRecord.id.in_(part)))
            s.commit()

    # --- health --------------------------------------------------------------------------------

    def integrity_problems(self) -> list[str]:
        """SQLite's own integrity check (other databases check themselves): [] when sound."""
        if self.engine.dialect.name != "sqlite":
            return []
        with self._guard("integrity check"), self.engine.connect() as conn:
            rows = [str(r[0]) for r in conn.execute(text("PRAGMA integrity_check"))]
        return [] if rows == ["ok"] else rows

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for other databases and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


def _connect_args(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"timeout": BUSY_TIMEOUT_MS / 1000}
    return {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
