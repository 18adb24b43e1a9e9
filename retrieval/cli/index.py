"""`retr index ...`: build, update, inspect and repair an index. Options of `index build` take
their help from IndexConfig and their values are validated by it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from features.core import field_help
from index.layout import IndexConfig
from retrieval.cli.support import (
    DEFAULT_INDEX,
    DbOpt,
    DeviceOpt,
    IndexOpt,
    QuietOpt,
    WaitOpt,
    cli_errors,
    console,
    err_console,
    index_config,
    json_option,
    progress_bar,
)

index_app = typer.Typer(help="Build, update, inspect and repair an index.", no_args_is_help=True)


def _help(name: str) -> str:
    return field_help(IndexConfig, name)


@index_app.command("build")
def index_build(
    corpus: Annotated[Path, typer.Argument(help="Folder of images; sub-folder name = label.")],
    index: IndexOpt = DEFAULT_INDEX,
    local: Annotated[
        str | None, typer.Option(help="Local-feature method (retr features list).")
    ] = None,
    global_model: Annotated[str | None, typer.Option("--global", help="Global model.")] = None,
    max_keypoints: Annotated[int | None, typer.Option(help="Keypoints kept per image.")] = None,
    local_conf: Annotated[
        str | None,
        typer.Option(help="Local-method settings as JSON, e.g. '{\"resize_max\": 800}'."),
    ] = None,
    global_conf: Annotated[
        str | None,
        typer.Option(help="Global-model settings as JSON, e.g. '{\"scales\": [1.0]}'."),
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV with columns path,label.")] = None,
    db: DbOpt = None,
    weights: Annotated[Path | None, typer.Option(help="Local-method checkpoint path.")] = None,
    index_type: Annotated[str | None, typer.Option(help=_help("index_type"))] = None,
    local_dtype: Annotated[str | None, typer.Option(help=_help("local_dtype"))] = None,
    matcher: Annotated[str | None, typer.Option(help=_help("matcher"))] = None,
    vectors: Annotated[
        str | None,
        typer.Option(
            "--vectors",
            help="Where the vectors live: faiss (default, files in the index), "
            "milvus://HOST:PORT/COLLECTION or milvus-lite://PATH.db/COLLECTION (retr[milvus]).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    wait: WaitOpt = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Extract on Ray: 'auto' starts a local runtime, an address joins a cluster "
            "(needs retr[ray])."
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Index every new or changed image of CORPUS (a killed build resumes where it stopped)."""
    from retrieval.building import build_index

    with cli_errors():
        local_values = {
            **json_option("--local-conf", local_conf),
            **({"max_keypoints": max_keypoints} if max_keypoints is not None else {}),
            **({"weights": str(weights)} if weights else {}),
        }
        config = index_config(
            local_method=local,
            global_model=global_model,
            local_conf=local_values,
            global_conf=json_option("--global-conf", global_conf),
            db_url=db,
            index_type=index_type,
            local_dtype=local_dtype,
            matcher=matcher,
            vector_store=vectors,
        )
        with progress_bar("indexing", quiet) as update:
            report = build_index(corpus, index, config, labels, update, device, wait, ray)
    console.print(
        f"indexed {report.indexed} new or changed, {report.unchanged} unchanged, "
        f"{len(report.failed)} failed, {len(report.duplicates)} duplicates "
        f"in {report.seconds:.1f} s ({report.images_per_second:.2f} images/s); "
        f"{report.total_indexed} images in {index}"
    )
    for path, reason in report.failed + report.duplicates:
        console.print(f"  skipped {path}: {reason}", highlight=False)
    for row in report.ignored_labels:
        console.print(f"  labels row ignored: {row}", highlight=False)


@index_app.command("info")
def index_info(
    index: IndexOpt = DEFAULT_INDEX,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts, configuration and sizes on disk of an index."""
    from index.info import index_info as describe

    with cli_errors():
        info = describe(index, db=db)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    table = Table(title=f"retr index {index}", show_header=False)
    for status, n in sorted(info["images"].items()):  # type: ignore[attr-defined]
        table.add_row(f"images {status}", str(n))
    for key in ("generation", "vectors", "segments", "pending"):
        table.add_row(key, str(info[key]))
    for key, value in info["config"].items():  # type: ignore[attr-defined]
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    for name, size in info["bytes"].items():  # type: ignore[attr-defined]
        table.add_row(f"size {name}", f"{size / 1e6:.2f} MB")
    console.print(table)


def _print_update(report: Any, index: Path) -> None:
    hidden = f"; {report.tombstones} vectors hidden until the next build" * bool(report.tombstones)
    console.print(
        f"{len(report.added)} added, {len(report.updated)} updated, {report.unchanged} "
        f"unchanged, {len(report.removed)} removed, {len(report.failed)} failed, "
        f"{len(report.duplicates)} duplicates in {index}{hidden}"
    )
    for path, reason in report.failed + report.duplicates:
        console.print(f"  skipped {path}: {reason}", highlight=False)
    for target in report.not_found:
        console.print(f"  not in the index: {target}", highlight=False)


@index_app.command("add")
def index_add(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders to add.")],
    index: IndexOpt = DEFAULT_INDEX,
    label: Annotated[
        str | None, typer.Option(help="Label of every added image (default: sub-folder name).")
    ] = None,
    device: DeviceOpt = "auto",
    wait: WaitOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Add images to a built index without rebuilding it (changed files are re-extracted)."""
    from retrieval.updating import add_images

    with cli_errors(), progress_bar("adding", quiet) as update:
        report = add_images(index, paths, label, update, device, wait=wait)
    _print_update(report, index)


@index_app.command("remove")
def index_remove(
    targets: Annotated[
        list[str], typer.Argument(help="Catalog ids, or image paths / folders to remove.")
    ],
    index: IndexOpt = DEFAULT_INDEX,
    wait: WaitOpt = None,
) -> None:
    """Remove images from the catalog, the feature store and the vector index."""
    from retrieval.updating import remove_images

    with cli_errors():
        report = remove_images(index, targets, wait=wait)
    _print_update(report, index)


@index_app.command("update")
def index_update(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or folders to re-check (default: all).")
    ] = None,
    index: IndexOpt = DEFAULT_INDEX,
    device: DeviceOpt = "auto",
    wait: WaitOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Re-extract indexed files whose content changed or whose features were lost, drop those
    that are gone.

    The whitening stays fixed; `retr index build` refits it."""
    from retrieval.updating import update_images

    with cli_errors(), progress_bar("updating", quiet) as update:
        report = update_images(index, paths or (), update, device, wait=wait)
    _print_update(report, index)


@index_app.command("check")
def index_check(
    index: IndexOpt = DEFAULT_INDEX,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also verify every file's checksum and every array.")
    ] = False,
    db: DbOpt = None,
) -> None:
    """Verify that catalog, feature segments, whitening and vector index agree (exit 1 if not)."""
    from index.check import check_index

    with cli_errors():
        report = check_index(index, deep=deep, db=db)
    for line in report.problems:
        err_console.print(f"[red]problem:[/red] {line}", highlight=False, soft_wrap=True)
    for line in report.notes:
        console.print(f"note: {line}", highlight=False, soft_wrap=True)
    verdict = "ok" if report.ok else f"{len(report.problems)} problems"
    console.print(
        f"{index}: {verdict} ({report.images} images in {report.segments} segments"
        f"{', deep' if deep else ''})"
    )
    if not report.ok:
        raise typer.Exit(1)


@index_app.command("repair")
def index_repair(index: IndexOpt = DEFAULT_INDEX, db: DbOpt = None, wait: WaitOpt = None) -> None:
    """Rebuild what can be derived (config, manifest, catalog, whitening, vector index), drop
    damaged segments, and list the images to extract again (`retr index update` does it)."""
    from index.repair import repair_index

    with cli_errors():
        report = repair_index(index, db=db, wait=wait)
    for action in report.actions:
        console.print(f"repaired: {action}", highlight=False, soft_wrap=True)
    if report.reextract:
        console.print(
            f"{len(report.reextract)} images lost their features; run `retr index update "
            f"--index {index}` to extract them again:",
            highlight=False,
        )
        for path in report.reextract:
            console.print(f"  {path}", highlight=False)


@index_app.command("compact")
def index_compact(index: IndexOpt = DEFAULT_INDEX, wait: WaitOpt = None) -> None:
    """Merge the feature segments into as few files as their size cap allows."""
    from index.layout import IndexPaths
    from index.writer import IndexWriter

    with cli_errors(), IndexWriter.open(IndexPaths(index), wait=wait) as writer:
        merged = writer.compact(full=True)
        writer.collect_garbage()
        left = len(writer.manifest.segments)
    console.print(f"merged {merged} segments away; {left} segments in {index}")
