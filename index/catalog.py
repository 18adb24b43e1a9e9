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

PostgreSQL (`postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`, `pip install 'retr[postgres]'`):
ids come from the table's sequence (explicit ids, which only a repair inserts, move it past
them); pooled connections are checked before use, so a build that sat in extraction while the
server restarted reconnects, and a server that stays down fails the next catalog step with one
line (the batches committed before it are kept: the rerun resumes). A catalog belongs to one
index directory: its writer records the index's id in `retr_index` (`bind`), and another
index's writer is refused, because two indexes in one table would see each other's rows as
their own. Several indexes can share one database in separate schemas
(`?options=-csearch_path%3DNAME` in the URL, after `CREATE SCHEMA NAME`).

Queries never load the whole table where a question does not need it: counts by status are one
GROUP BY, lookups by id go in batches of LOOKUP_BATCH, pending rows are read as (id, hash) pairs,
and writes go as one multi-row statement per batch.
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
    insert,
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
WRITE_BATCH = 5_000
"""Rows per multi-row INSERT or UPDATE."""
BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 10
"""Seconds to reach a database server."""


LOST_FEATURES = "features lost"
"""How the reason of a row whose features a repair dropped starts (index.repair)."""


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


class IndexOwner(Base):
    """The index directory a catalog belongs to (one row; `Catalog.bind`)."""

    __tablename__ = "retr_index"

    uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


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
            self.engine: Engine = create_engine(
                url, connect_args=_connect_args(url), pool_pre_ping=not url.startswith("sqlite")
            )
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
            if _unreachable(_first_line(exc)):
                raise self._failure("open", exc) from None
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
            raise self._failure(what, exc) from None

    def _failure(self, what: str, exc: BaseException) -> IndexError_:
        """One line for a failed database step: an unreachable server says so (the data is
        not at fault, so no repair hint); anything else names the catalog and the fix."""
        first = _first_line(exc)
        if _unreachable(first):
            return CatalogUnreachableError(
                f"catalog {self.shown}: {what} failed: the server is unreachable ({first}); "
                "check that it is running and reachable from here, then retry"
            )
        return IndexError_(f"catalog {self.shown}: {what} failed: {first}{self._hint()}")

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
        return {r.id: r for r in self._lookup(ImageRecord.id, {int(i) for i in ids})}

    def by_paths(self, paths: Iterable[str]) -> dict[str, ImageRecord]:
        """Records of `paths` (missing ones left out), looked up in batches."""
        return {r.path: r for r in self._lookup(ImageRecord.path, set(paths))}

    def _lookup(self, column: Any, values: set[Any]) -> list[ImageRecord]:
        """Rows whose `column` is one of `values`, LOOKUP_BATCH values per query."""
        wanted = sorted(values)
        out: list[ImageRecord] = []
        with self._guard("lookup"), self.session() as s:
            for start in range(0, len(wanted), LOOKUP_BATCH):
                part = wanted[start : start + LOOKUP_BATCH]
                out.extend(s.scalars(select(ImageRecord).where(column.in_(part))))
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

    def pending_hashes(self) -> dict[int, str]:
        """id -> sha256 of every pending row (two columns, not whole records)."""
        with self._guard("reading"), self.session() as s:
            q = select(ImageRecord.id, ImageRecord.sha256).where(
                ImageRecord.status == Status.PENDING.value
            )
            return {int(i): str(h) for i, h in s.execute(q)}

    def lost_features(self) -> int:
        """Rows whose features a repair dropped with a damaged segment and that no update has
        extracted again (pending, with the repair's reason)."""
        with self._guard("counting"), self.session() as s:
            q = select(func.count()).where(
                ImageRecord.status == Status.PENDING.value,
                ImageRecord.reason.like(f"{LOST_FEATURES}%"),
            )
            return int(s.scalar(q) or 0)

    def status_counts(self) -> dict[str, int]:
        """Rows per status (one GROUP BY)."""
        with self._guard("counting"), self.session() as s:
            q = select(ImageRecord.status, func.count()).group_by(ImageRecord.status)
            return {str(st): int(n) for st, n in s.execute(q)}

    def is_empty(self) -> bool:
        """Whether the table has no row (one indexed probe, not a count of the table)."""
        with self._guard("reading"), self.session() as s:
            return s.scalar(select(ImageRecord.id).limit(1)) is None

    def count(self) -> int:
        with self._guard("counting"), self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ImageRecord)) or 0)

    # --- writes --------------------------------------------------------------------------------

    def upsert(self, changes: Sequence[RowChange]) -> list[int]:
        """Insert or update rows in one transaction; returns their ids, in order. Rows with an
        id that exists are updated (width and height only when `size` is given), the others
        inserted, as one multi-row statement per WRITE_BATCH."""
        with self._guard("writing"), self.session() as s:
            given = [c.id for c in changes if c.id is not None]
            existing = set(self._existing(s, given))
            out: list[int | None] = [c.id for c in changes]
            fresh = [k for k, c in enumerate(changes) if c.id is None or c.id not in existing]
            if fresh:
                values = [_row_values(changes[k], changes[k].id is not None, True) for k in fresh]
                with_id = [v for v in values if "id" in v]
                without = [(k, v) for k, v in zip(fresh, values, strict=True) if "id" not in v]
                if with_id:
                    self._insert(s, with_id)
                    self._advance_sequence(s)
                if without:
                    ids = self._insert(s, [v for _, v in without], returning=True)
                    for (k, _), i in zip(without, ids, strict=True):
                        out[k] = i
            stale = [c for c in changes if c.id is not None and c.id in existing]
            for sized in (True, False):
                rows = [
                    _row_values(c, with_id=True) for c in stale if (c.size is not None) == sized
                ]
                for start in range(0, len(rows), WRITE_BATCH):
                    s.execute(update(ImageRecord), rows[start : start + WRITE_BATCH])
            s.commit()
            return [int(i) for i in out if i is not None]

    def _existing(self, s: Session, ids: Sequence[int]) -> list[int]:
        found: list[int] = []
        for start in range(0, len(ids), LOOKUP_BATCH):
            part = ids[start : start + LOOKUP_BATCH]
            found += s.scalars(select(ImageRecord.id).where(ImageRecord.id.in_(part)))
        return found

    def _insert(self, s: Session, rows: list[dict[str, Any]], returning: bool = False) -> list[int]:
        """Multi-row INSERTs; with `returning`, the new ids in the order of `rows`."""
        ids: list[int] = []
        for start in range(0, len(rows), WRITE_BATCH):
            part = rows[start : start + WRITE_BATCH]
            if returning:
                q = insert(ImageRecord).returning(ImageRecord.id, sort_by_parameter_order=True)
                ids += [int(r[0]) for r in s.execute(q, part)]
            else:
                s.execute(insert(ImageRecord), part)
        return ids

    def _advance_sequence(self, s: Session) -> None:
        """After rows were inserted with their ids given: PostgreSQL's sequence moves past them
        (SQLite's AUTOINCREMENT counter follows by itself), so ids are never reused."""
        if self.engine.dialect.name == "postgresql":
            s.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('images', 'id'), "
                    "(SELECT COALESCE(MAX(id), 1) FROM images))"
                )
            )

    def insert_with_ids(self, records: Sequence[ImageRecord]) -> None:
        """Rows with their ids given (catalog repair), inserted in multi-row statements."""
        columns = [c.key for c in ImageRecord.__table__.columns]
        rows = [{k: getattr(r, k) for k in columns if getattr(r, k) is not None} for r in records]
        with self._guard("writing"), self.session() as s:
            now = _now()
            for row in rows:
                row.setdefault("created_at", now)
                row.setdefault("updated_at", now)
                row.setdefault("width", None)
                row.setdefault("height", None)
                row.setdefault("label", None)
                row.setdefault("reason", None)
            if rows:
                self._insert(s, rows)
                self._advance_sequence(s)
            s.commit()

    # --- the owning index ----------------------------------------------------------------------

    def owner(self) -> str | None:
        """The id of the index directory this catalog belongs to (None: not recorded)."""
        with self._guard("reading the owner"), self.session() as s:
            if not inspect(self.engine).has_table(IndexOwner.__tablename__):
                return None
            return s.scalar(select(IndexOwner.uid).limit(1))

    def bind(self, uid: str, root: object) -> None:
        """Record that the index `uid` (directory `root`) owns this catalog, or refuse when
        another index does (module docstring)."""
        found = self.owner()
        if found is not None and found != uid:
            raise IndexError_(
                f"catalog {self.shown} belongs to another index (id {found[:12]}), not to {root} "
                f"({uid[:12]}); give each index its own database, or its own schema "
                "(`?options=-csearch_path%3DNAME` in the --db URL, after CREATE SCHEMA NAME)"
            )
        if found is None:
            with self._guard("recording the owner"), self.session() as s:
                Base.metadata.create_all(self.engine, tables=[IndexOwner.__table__])  # type: ignore[list-item]
                s.add(IndexOwner(uid=uid))
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
    if url.startswith("postgresql"):
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


def _row_values(c: RowChange, with_id: bool, new: bool = False) -> dict[str, Any]:
    """Column values of a change (updated_at set here: bulk statements skip ORM hooks). A new
    row always has width and height (None when unknown), so a batch's rows share their keys;
    an update leaves them alone unless the size is known."""
    values: dict[str, Any] = {
        "path": c.path,
        "sha256": c.sha256,
        "label": c.label,
        "status": c.status.value,
        "reason": c.reason,
        "updated_at": _now(),
    }
    if with_id:
        values["id"] = c.id
    if c.size is not None:
        values["width"], values["height"] = c.size
    elif new:
        values["width"] = values["height"] = None
    return values


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


class CatalogUnreachableError(IndexError_):
    """The catalog's database server cannot be reached (refused, timed out, unknown host)."""


UNREACHABLE = (
    "connection refused",
    "timeout expired",
    "timed out",
    "could not translate host",
    "name or service not known",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "server closed the connection",
)
"""What database drivers (psycopg, SQLAlchemy) say when the server cannot be reached."""


def _unreachable(message: str) -> bool:
    low = message.lower()
    return any(s in low for s in UNREACHABLE)


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
