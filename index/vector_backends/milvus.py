"""Milvus as the vector backend: whitened global descriptors in a Milvus collection, ids =
catalog ids, searched with Milvus's own index types (`pip install 'retr[milvus]'`).

    milvus://[USER:PASSWORD@]HOST:PORT/NAME   a Milvus server (standalone or distributed)
    milvus-lite://PATH.db/NAME                Milvus Lite, embedded in the process (relative
                                              PATH: inside the index directory)

**Collections.** Every rebuild (`retr index build`, a repair) creates the collection
`NAME_g<generation>` with rows (id INT64 primary key = catalog id, vector FLOAT_VECTOR(D), gen
INT64 = the generation that wrote the row); the manifest names it, and after the commit the
alias NAME is pointed at it for other tools (retr itself goes by the manifest). `retr index add`,
`update` and `remove` edit that collection in place with Milvus's native upsert and delete.

**Generations with a collection edited in place** (the manifest's guarantees, index.manifest):

- A reader of generation g searches its manifest's collection with the filter `gen <= g` and
  skips the ids its manifest lists in `vector_hidden`. Rows a later publish writes carry a
  later gen, and removed ids are hidden from the commit that removes them until they are
  deleted, so a search never returns an id that its generation does not hold.
- Add / update: the writer records the ids it is about to upsert in `vector_intent` (a manifest
  save that is still generation g), upserts them with gen g+1, then commits g+1 with the intent
  cleared. Ids whose features went (a file that now fails) are hidden in that commit.
- Remove: one commit hides the ids and drops them from the live set.
- After every commit the writer deletes the hidden ids from the collection, clears the list and
  moves the alias (`finish`).
- A kill before a commit: the next writer finds `vector_intent` and puts generation g back:
  ids that g holds are upserted again with g's vector (g's whitening of the stored descriptor)
  and gen g, the others deleted (`recover`). A kill after a commit: the next writer finishes the
  deletions and the alias. A kill during a rebuild leaves a collection that no manifest names,
  which the next writer drops, as it drops those of generations before the previous one.
- What differs from FAISS files, where every generation is its own file: an updated image's row
  is replaced in place, so a reader still on generation g misses that image (it is not
  returned at all, never with the new vector) until it moves to g+1, which a Retriever does
  before its next search; after a kill during an update, searches miss it until the next
  writer restores it. Milvus Lite serves one process at a time (the file is locked by the first
  process that opens it): use a Milvus server for separate writer and query processes.
- Collections are made with Strong consistency, so a query process sees every write that a
  commit it has read depends on (Milvus's default, Bounded, may lag by seconds).

**Index types** (`index_type`): FLAT (exact), HNSW (M 32, efConstruction 40, ef 128 like FAISS
HNSW32 in index.vectors), IVF_FLAT, IVF_SQ8, IVF_PQ, or "auto", chosen by the corpus size like
index.vectors.choose_factory: FLAT below 50k vectors, HNSW below 1M, IVF_PQ above (about
4*sqrt(N) lists, 1/8 probed, codes of up to 64 bytes); Milvus Lite has no IVF_PQ and gets
IVF_SQ8 (one byte per dimension) instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from features.core import ConfigError, IndexError_
from index.manifest import COLLECTION_MARK, CollectionEntry, Manifest, pack_ids, unpack_ids
from index.vector_backends import Published, VectorBackend, compare, mask_store
from index.vectors import FLAT_BELOW, HNSW_BELOW, HNSW_EF_SEARCH, ivf_lists

logger = logging.getLogger(__name__)

AUTO = "auto"
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ")
LITE_INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
PQ_MAX_BYTES = 64
MAX_TOPK = 16_384
"""Milvus's largest search limit."""
ID_END = 1 << 62
"""Above every catalog id (ids are INT64)."""
BATCH_BYTES = 16 << 20
"""Vector bytes per insert, upsert or delete request (gRPC messages stay well under 64 MB)."""
CONNECT_TIMEOUT = 10.0
"""Seconds to reach a Milvus server."""
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")


@dataclass(frozen=True)
class MilvusTarget:
    """A parsed `vector_store` setting."""

    uri: str
    """http://HOST:PORT, or the absolute path of a Milvus Lite file."""
    token: str
    name: str
    """The alias retr maintains; collections are NAME_g<generation>."""
    lite: bool
    shown: str
    """For messages: the server or file, without a password."""

    @classmethod
    def parse(cls, value: str, root: Path | None = None) -> MilvusTarget:
        """ValueError naming what is wrong when `value` is not a Milvus target."""
        if value.startswith("milvus-lite://"):
            path, _, name = value[len("milvus-lite://") :].rpartition("/")
            if not path.endswith(".db"):
                raise ValueError(
                    f"'{value}': a Milvus Lite target is milvus-lite://PATH.db/COLLECTION"
                )
            file = Path(path)
            if not file.is_absolute() and root is not None:
                file = Path(root).resolve() / file
            target = cls(str(file), "", name, True, f"Milvus Lite file {file}")
        elif value.startswith("milvus://"):
            parts = urlsplit(value)
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or port is None:
                raise ValueError(f"'{mask_store(value)}': expected milvus://HOST:PORT/COLLECTION")
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            token = f"{user}:{password}" if user else ""
            name = parts.path.strip("/")
            shown = f"Milvus server {parts.hostname}:{port}"
            target = cls(f"http://{parts.hostname}:{port}", token, name, False, shown)
        else:
            raise ValueError(f"'{mask_store(value)}' is not a milvus:// or milvus-lite:// target")
        if not _NAME.match(target.name):
            raise ValueError(
                f"'{target.name}' is not a usable Milvus collection name (letters, digits and "
                "underscores, starting with a letter or underscore)"
            )
        return target


def choose_index_type(n: int, lite: bool) -> str:
    """The Milvus index type "auto" stands for, for N vectors (module docstring)."""
    if n < FLAT_BELOW:
        return "FLAT"
    if n < HNSW_BELOW:
        return "HNSW"
    return "IVF_SQ8" if lite else "IVF_PQ"


def index_params(index_type: str, n: int, dim: int) -> dict[str, Any]:
    """Build parameters of `index_type` for N vectors of dimension D."""
    if index_type == "HNSW":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
    if index_type.startswith("IVF"):
        params: dict[str, Any] = {"nlist": min(ivf_lists(n), max(n, 1))}
        if index_type == "IVF_PQ":
            m = max(d for d in range(1, min(PQ_MAX_BYTES, dim) + 1) if dim % d == 0)
            params.update(m=m, nbits=8)
        return params
    return {}


def search_params(index_type: str, build: dict[str, Any], k: int) -> dict[str, Any]:
    if index_type == "HNSW":
        return {"ef": max(HNSW_EF_SEARCH, k)}
    if index_type.startswith("IVF"):
        return {"nprobe": max(1, int(build.get("nlist", 8)) // 8)}
    return {}


# --- connections ---------------------------------------------------------------------------------

_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()


def connect(target: MilvusTarget) -> Any:
    """A MilvusClient for `target`, shared by every user in this process; IndexError_ in one
    line when the server cannot be reached, the credentials are refused or a Milvus Lite file is
    held by another process."""
    key = (target.uri, target.token)
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            return client
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise ConfigError(
                "the Milvus vector store needs pymilvus (and milvus-lite for milvus-lite://): "
                "pip install 'retr[milvus]'"
            ) from None
        if target.lite:
            _check_lite_free(Path(target.uri))
        with _guard(target, "connecting"):
            client = MilvusClient(uri=target.uri, token=target.token, timeout=CONNECT_TIMEOUT)
        _clients[key] = client
        return client


def release(target: MilvusTarget) -> None:
    """Close this process's connection to `target`; for Milvus Lite, also stop its embedded
    server, so that another process may open the file."""
    with _clients_lock:
        client = _clients.pop((target.uri, target.token), None)
    if client is not None:
        client.close()
    if target.lite:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(target.uri)


def _check_lite_free(path: Path) -> None:
    """Milvus Lite locks its file for the process that opens it: say so in one line instead of
    the embedded server's traceback."""
    lock = path / "LOCK"
    if not lock.is_file():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise IndexError_(
            f"Milvus Lite file {path} is open in another process (Milvus Lite serves one process "
            "at a time); wait for it, or use a Milvus server (milvus://HOST:PORT/COLLECTION)"
        ) from None
    finally:
        os.close(fd)


@contextmanager
def _guard(target: MilvusTarget, what: str, hint: str = "") -> Iterator[None]:
    """Milvus and gRPC errors -> one IndexError_ line naming the server or file."""
    try:
        yield
    except (IndexError_, ConfigError):
        raise
    except Exception as exc:  # pymilvus raises MilvusException, grpc errors and plain ones
        message = str(getattr(exc, "message", "") or exc).strip().splitlines()
        first = message[0][:300] if message else type(exc).__name__
        raise IndexError_(
            f"{target.shown}: {what} failed: {first}{f'; {hint}' if hint else ''}"
        ) from None


# --- searching -----------------------------------------------------------------------------------


class MilvusVectors:
    """One generation's view of a collection (module docstring: `gen <= g`, hidden ids)."""

    def __init__(
        self,
        client: Any,
        target: MilvusTarget,
        entry: CollectionEntry,
        generation: int,
        hidden: np.ndarray,
        count: int,
        expected: Callable[[], np.ndarray] | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.entry = entry
        self.factory = entry.index_type
        self.generation = generation
        self.hidden = hidden
        self.count = count
        self.expected = expected
        """The sorted ids the generation should hold (ids() cuts its reads by them)."""
        self._filter = f"gen <= {generation}"
        self._build = index_params(entry.index_type, count, entry.dim)

    @property
    def dim(self) -> int:
        return self.entry.dim

    @property
    def tombstones(self) -> int:
        return len(self.hidden)

    def __len__(self) -> int:
        return self.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.count)
        m = len(queries)
        out_s = np.full((m, k), -np.inf, np.float32)
        out_i = np.full((m, k), -1, np.int64)
        if k == 0 or m == 0:
            return out_s, out_i
        limit = min(k + len(self.hidden), MAX_TOPK)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        with _guard(self.target, f"search in {self.entry.name}"):
            rows = self.client.search(
                self.entry.name,
                data=list(q),
                limit=limit,
                filter=self._filter,
                output_fields=["id"],
                anns_field="vector",
                search_params={
                    "metric_type": "IP",
                    "params": search_params(self.factory, self._build, limit),
                },
            )
        for r, hits in enumerate(rows):
            ids = np.fromiter((h["id"] for h in hits), np.int64, len(hits))
            scores = np.fromiter((h["distance"] for h in hits), np.float32, len(hits))
            keep = ~np.isin(ids, self.hidden) if len(self.hidden) else slice(None)
            ids, scores = ids[keep][:k], scores[keep][:k]
            out_i[r, : len(ids)], out_s[r, : len(ids)] = ids, scores
        return out_s, out_i

    def ids(self) -> np.ndarray:
        """Sorted ids this generation holds (for checks: O(N)). A query returns at most
        MAX_TOPK rows and Milvus Lite serves no query iterator, so the id line is cut into
        ranges that each hold half that many of the expected ids, and a range that comes back
        full is halved until it fits: about N / 8192 queries, however sparse the ids."""
        expected = self.expected() if self.expected is not None else np.zeros(0, np.int64)
        edges = [int(e) for e in expected[MAX_TOPK // 2 :: MAX_TOPK // 2]]
        bounds = [0, *edges, ID_END]
        with _guard(self.target, f"listing {self.entry.name}"):
            parts = [self._range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return np.setdiff1d(np.concatenate([np.zeros(0, np.int64), *parts]), self.hidden)

    def _range(self, lo: int, hi: int) -> np.ndarray:
        """Ids in [lo, hi) of this generation."""
        got = self._query(f"id >= {lo} and id < {hi}")
        if len(got) < MAX_TOPK or hi - lo < 2:
            return got
        mid = lo + (hi - lo) // 2
        return np.concatenate([self._range(lo, mid), self._range(mid, hi)])

    def _query(self, ids: str) -> np.ndarray:
        where = f"{self._filter} and {ids}"
        rows = self.client.query(
            self.entry.name, filter=where, output_fields=["id"], limit=MAX_TOPK
        )
        return np.fromiter((r["id"] for r in rows), np.int64, len(rows))


# --- the backend ---------------------------------------------------------------------------------


class MilvusBackend(VectorBackend):
    """See the module docstring."""

    in_place = True

    def __init__(self, value: str, root: Path, index_type: str) -> None:
        try:
            self.target = MilvusTarget.parse(value, root)
        except ValueError as exc:
            raise ConfigError(f"--vectors: {exc}") from None
        self.root = Path(root)
        self.index_type = index_type
        allowed = LITE_INDEX_TYPES if self.target.lite else INDEX_TYPES
        if index_type != AUTO and index_type not in allowed:
            raise ConfigError(
                f"index type '{index_type}' is not one {self.target.shown} offers; valid: "
                f"{AUTO}, {', '.join(allowed)}"
            )
        self.client = connect(self.target)
        self._pattern = re.compile(rf"^{re.escape(self.target.name)}_g\d+$")

    def where(self, manifest: Manifest) -> str:
        name = manifest.collection.name if manifest.collection else self.target.name
        return f"Milvus collection {name} on {self.target.shown}"

    def _hint(self) -> str:
        return f"run `retr index repair --index {self.root}`"

    # --- readers -----------------------------------------------------------------------------

    def open(self, manifest: Manifest) -> MilvusVectors:
        entry = manifest.collection
        if entry is None:
            raise IndexError_(
                f"{self.root}: the manifest names no Milvus collection (the index was built with "
                f"another vector store); {self._hint()}"
            )
        where = self.where(manifest)
        with _guard(self.target, f"opening {entry.name}", self._hint()):
            if entry.name not in self.client.list_collections():
                raise IndexError_(f"{where} is missing; {self._hint()}")
            dim = self._dim(entry.name)
            if dim != entry.dim:
                raise IndexError_(
                    f"{where} holds vectors of {dim} dims, the index's have {entry.dim}; "
                    f"{self._hint()}"
                )
            state = self.client.get_load_state(entry.name).get("state")
            if getattr(state, "name", str(state)) != "Loaded":
                self.client.load_collection(entry.name)
        hidden = unpack_ids(manifest.vector_hidden)

        def expected() -> np.ndarray:
            return np.union1d(manifest.live_ids(), unpack_ids(manifest.vector_intent))

        return MilvusVectors(
            self.client,
            self.target,
            entry,
            manifest.generation,
            hidden,
            manifest.vector_count,
            expected,
        )

    def _dim(self, name: str) -> int:
        fields = self.client.describe_collection(name).get("fields", [])
        dims = [int(f["params"]["dim"]) for f in fields if "dim" in f.get("params", {})]
        return dims[0] if dims else -1

    # --- writers -----------------------------------------------------------------------------

    def rebuild(self, new: Manifest, gen: int, ids: np.ndarray, vectors: np.ndarray) -> None:
        n, dim = vectors.shape
        kind = self.index_type
        if kind == AUTO:
            kind = choose_index_type(n, self.target.lite)
        name = f"{self.target.name}_g{gen}"
        self._check_alias_free()
        with _guard(self.target, f"building {name}"):
            from pymilvus import DataType

            if name in self.client.list_collections():  # left by a killed build of this gen
                self.client.drop_collection(name)
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("gen", DataType.INT64)
            # Strong: a search sees every write committed before it, from any client (the
            # default, Bounded, could show a removed id or miss an added one for a while)
            self.client.create_collection(name, schema=schema, consistency_level="Strong")
            self._write(name, ids, vectors, gen, upsert=False)
            self.client.flush(name)  # sealed segments get the index; growing ones are scanned
            params = self.client.prepare_index_params()
            params.add_index(
                field_name="vector",
                index_type=kind,
                metric_type="IP",
                params=index_params(kind, n, dim),
            )
            self.client.create_index(name, params)
            self.client.load_collection(name)
        logger.info("built Milvus %s %s over %d vectors", kind, name, n)
        new.collection = CollectionEntry(name=name, dim=dim, index_type=kind)
        new.vectors = None
        new.vector_count = n
        new.vector_hidden, new.vector_intent = [], []

    def _check_alias_free(self) -> None:
        """NAME must be free or an alias (retr's): never someone else's collection."""
        with _guard(self.target, "listing collections"):
            taken = self.target.name in self.client.list_collections()
        if taken:
            raise ConfigError(
                f"{self.target.shown} already has a collection named {self.target.name} that "
                "retr did not make (retr keeps NAME as an alias of its NAME_g<n> collections); "
                "choose another collection name in --vectors"
            )

    def _write(
        self, name: str, ids: np.ndarray, vectors: np.ndarray, gen: int, upsert: bool
    ) -> None:
        rows = max(1, BATCH_BYTES // (4 * max(vectors.shape[1], 1)))
        send = self.client.upsert if upsert else self.client.insert
        for start in range(0, len(ids), rows):
            part = slice(start, start + rows)
            block = [
                {"id": int(i), "vector": v, "gen": gen}
                for i, v in zip(ids[part], vectors[part], strict=True)
            ]
            send(name, block)

    def _delete(self, name: str, ids: np.ndarray) -> None:
        for start in range(0, len(ids), 16_384):
            self.client.delete(name, ids=[int(i) for i in ids[start : start + 16_384]])

    def edit(
        self,
        old: Manifest,
        new: Manifest,
        gen: int,
        gone: np.ndarray,
        fresh: tuple[np.ndarray, np.ndarray],
        tombstone: bool | None,
    ) -> int:
        entry = self._entry(old)
        ids, vectors = fresh
        if len(ids) and vectors.shape[1] != entry.dim:
            raise IndexError_(
                f"{self.where(old)} holds vectors of {entry.dim} dims, the new ones have "
                f"{vectors.shape[1]}; {self._hint()}"
            )
        present = old.live_ids()
        hide = np.intersect1d(np.setdiff1d(gone, ids), present)
        with _guard(self.target, f"writing {entry.name}", "nothing was committed; run it again"):
            self._write(entry.name, ids, vectors.astype(np.float32), gen, upsert=True)
        new.vector_hidden = pack_ids(np.union1d(unpack_ids(old.vector_hidden), hide))
        new.vector_count = len(np.union1d(np.setdiff1d(present, hide), ids))
        return 0

    def remove(
        self, old: Manifest, new: Manifest, gen: int, ids: np.ndarray, tombstone: bool | None
    ) -> int:
        self._entry(old)
        present = old.live_ids()
        hide = np.intersect1d(ids, present)
        new.vector_hidden = pack_ids(np.union1d(unpack_ids(old.vector_hidden), hide))
        new.vector_count = len(present) - len(hide)
        return 0

    def _entry(self, manifest: Manifest) -> CollectionEntry:
        if manifest.collection is None:
            raise IndexError_(
                f"{self.root}: the manifest names no Milvus collection; build the index again "
                f"with --vectors {self.target.shown}"
            )
        return manifest.collection

    # --- after commits and crashes -----------------------------------------------------------

    def finish(self, manifest: Manifest) -> bool:
        entry = manifest.collection
        if entry is None:
            return False
        changed = False
        with _guard(self.target, f"finishing {entry.name}", "the next write finishes it"):
            if manifest.vector_hidden:
                self._delete(entry.name, unpack_ids(manifest.vector_hidden))
                manifest.vector_hidden = []
                changed = True
            self._point_alias(entry.name)
        return changed

    def _point_alias(self, name: str) -> None:
        alias = self.target.name
        if alias in self.client.list_aliases(name).get("aliases", []):
            return
        if alias in self.client.list_aliases().get("aliases", []):
            self.client.alter_alias(name, alias)
        else:
            self.client.create_alias(name, alias)

    def recover(self, manifest: Manifest, published: Published) -> bool:
        if not manifest.vector_intent or manifest.collection is None:
            return False
        name = manifest.collection.name
        ids = unpack_ids(manifest.vector_intent)
        held, vectors = published(ids)
        with _guard(self.target, f"restoring {name}"):
            self._delete(name, np.setdiff1d(ids, held))
            self._write(name, held, vectors, manifest.generation, upsert=True)
        logger.info("restored %d vectors of %s left by an interrupted publish", len(ids), name)
        manifest.vector_intent = []
        return True

    def collect_garbage(self, keep: set[str]) -> list[str]:
        wanted = {k.removeprefix(COLLECTION_MARK) for k in keep if k.startswith(COLLECTION_MARK)}
        dropped = []
        with _guard(self.target, "dropping old collections", "the next write drops them"):
            for name in self.client.list_collections():
                if self._pattern.match(name) and name not in wanted:
                    for alias in self.client.list_aliases(name).get("aliases", []):
                        self.client.drop_alias(alias)
                    self.client.drop_collection(name)
                    dropped.append(COLLECTION_MARK + name)
        return dropped

    def check(self, manifest: Manifest, live: np.ndarray, dim: int) -> list[str]:
        try:
            vectors = self.open(manifest)
            intent = unpack_ids(manifest.vector_intent)  # restored by the next writer
            problems = compare(self.where(manifest), vectors, live, dim, ignore=intent)
        except IndexError_ as exc:
            return [str(exc)]
        return problems
