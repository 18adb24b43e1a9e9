"""`retr index info`: what an index holds, read from its manifest and catalog only (never the
vector index), so it is fast at any size.
"""

from __future__ import annotations

from pathlib import Path

from index.catalog import Catalog
from index.layout import IndexPaths, parse_config
from index.manifest import Manifest
from index.vector_backends import mask_store


def index_info(index_dir: str | Path, db: str | None = None) -> dict[str, object]:
    """What `retr index info` shows: configuration (password masked), generation, catalog
    counts by status (one GROUP BY), vectors, segments and bytes on disk. Reads the manifest and
    the catalog only (never the vector index), so it is fast at any size."""
    from index.catalog import mask_url

    paths = IndexPaths(index_dir)
    if not paths.exists():
        paths.read_config()  # raises "not a retr index"
    manifest = Manifest.load(paths.root)
    config = parse_config(manifest.config)
    if db:
        config = config.model_copy(update={"db_url": db})
    catalog = Catalog(paths.db_url(config), hint=paths.repair_hint())
    try:
        counts = catalog.status_counts()
    finally:
        catalog.dispose()
    shown = config.model_dump()
    if shown.get("db_url"):
        shown["db_url"] = mask_url(shown["db_url"])
    if shown.get("vector_store"):
        shown["vector_store"] = mask_store(shown["vector_store"])
    sizes = {"segments": sum(s.bytes for s in manifest.segments + manifest.pending)}
    for entry in (manifest.vectors, manifest.whitening, manifest.codec):
        if entry is not None:
            sizes[entry.name.split("-")[0]] = entry.bytes
    if manifest.whitening_other is not None:
        sizes["inactive whitening"] = manifest.whitening_other.bytes
    if paths.catalog.is_file():
        sizes["catalog"] = paths.catalog.stat().st_size
    return {
        "index": str(paths.root),
        "generation": manifest.generation,
        "config": shown,
        "images": counts,
        "vectors": manifest.vector_count,
        "collection": manifest.collection.name if manifest.collection else None,
        "segments": len(manifest.segments),
        "pending": sum(len(s.live_ids()) for s in manifest.pending),
        "bytes": sizes,
    }
