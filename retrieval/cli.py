"""The `retr` command: thin typer wrappers over the library.

Library errors (RetrError) become one red line and exit code 1 here, and only here.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from features.core import RetrError

app = typer.Typer(
    help="retr: landmark image retrieval with a DELG shortlist and local-feature reranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and inspect an index.", no_args_is_help=True)
features_app = typer.Typer(help="Local-feature methods.", no_args_is_help=True)
convert_app = typer.Typer(
    help="Convert official checkpoints to retr's PyTorch format.", no_args_is_help=True
)
app.add_typer(index_app, name="index")
app.add_typer(features_app, name="features")
app.add_typer(convert_app, name="convert")

console = Console()
err_console = Console(stderr=True)

IndexOpt = Annotated[Path, typer.Option("--index", "-i", help="Index directory.")]
DEFAULT_INDEX = Path("retr-index")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and exit code 1."""
    try:
        yield
    except RetrError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=None, current="")

        def update(done: int, total: int, current: str) -> None:
            bar.update(task, completed=done, total=total, current=current[-50:])

        yield update


@index_app.command("build")
def index_build(
    corpus: Annotated[Path, typer.Argument(help="Folder of images; sub-folder name = label.")],
    index: IndexOpt = DEFAULT_INDEX,
    local: Annotated[
        str | None, typer.Option(help="Local-feature method (retr features list).")
    ] = None,
    global_model: Annotated[str | None, typer.Option("--global", help="Global model.")] = None,
    max_keypoints: Annotated[int | None, typer.Option(help="Keypoints kept per image.")] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV with columns path,label.")] = None,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the catalog.")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local-method checkpoint path.")] = None,
    index_type: Annotated[
        str | None,
        typer.Option(help="FAISS index: auto (by corpus size), Flat, HNSW32, or a factory string."),
    ] = None,
    local_dtype: Annotated[
        str | None,
        typer.Option(help="Local descriptor storage: float16, float32, int8, pq or pq<M>."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Index every new or changed image of CORPUS."""
    from retrieval.building import build_index

    options: dict[str, Any] = {}
    if local is not None:
        options["local_method"] = local
    if global_model is not None:
        options["global_model"] = global_model
    local_conf = {
        k: v
        for k, v in (
            ("max_keypoints", max_keypoints),
            ("weights", str(weights) if weights else None),
        )
        if v
    }
    if local_conf:
        options["local_conf"] = local_conf
    if db is not None:
        options["db_url"] = db
    if index_type is not None:
        options["index_type"] = index_type
    if local_dtype is not None:
        options["local_dtype"] = local_dtype
    with cli_errors():
        if quiet:
            report = build_index(corpus, index, options, labels_csv=labels, device=device)
        else:
            with progress_bar("indexing") as update:
                report = build_index(corpus, index, options, labels, update, device)
    console.print(
        f"indexed {report.indexed} new or changed, {report.unchanged} unchanged, "
        f"{len(report.failed)} failed, {len(report.duplicates)} duplicates "
        f"in {report.seconds:.1f} s ({report.images_per_second:.2f} images/s); "
        f"{report.total_indexed} images in {index}"
    )
    for path, reason in report.failed + report.duplicates:
        console.print(f"  skipped {path}: {reason}", highlight=False)


@index_app.command("info")
def index_info(
    index: IndexOpt = DEFAULT_INDEX,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the catalog.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts, configuration and sizes on disk of an index."""
    from retrieval.api import Retriever

    with cli_errors():
        info = Retriever.open(index, db=db).info()
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    table = Table(title=f"retr index {index}", show_header=False)
    for status, n in sorted(info["images"].items()):
        table.add_row(f"images {status}", str(n))
    table.add_row("vectors", f"{info['vectors']} x {info['dim']}")
    for key, value in info["config"].items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    for name, size in info["bytes"].items():
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
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Add images to a built index without rebuilding it (changed files are re-extracted)."""
    from retrieval.updating import add_images

    with cli_errors():
        if quiet:
            report = add_images(index, paths, label, device=device)
        else:
            with progress_bar("adding") as update:
                report = add_images(index, paths, label, update, device)
    _print_update(report, index)


@index_app.command("remove")
def index_remove(
    targets: Annotated[
        list[str], typer.Argument(help="Catalog ids, or image paths / folders to remove.")
    ],
    index: IndexOpt = DEFAULT_INDEX,
) -> None:
    """Remove images from the catalog, the feature stores and the vector index."""
    from retrieval.updating import remove_images

    with cli_errors():
        report = remove_images(index, targets)
    _print_update(report, index)


@index_app.command("update")
def index_update(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or folders to re-check (default: all).")
    ] = None,
    index: IndexOpt = DEFAULT_INDEX,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Re-extract indexed files whose content changed, drop those that are gone.

    The whitening stays fixed; `retr index build` refits it."""
    from retrieval.updating import update_images

    with cli_errors():
        if quiet:
            report = update_images(index, paths or (), device=device)
        else:
            with progress_bar("updating") as update:
                report = update_images(index, paths or (), update, device)
    _print_update(report, index)


@app.command("query")
def query(
    images: Annotated[list[Path], typer.Argument(help="Query image(s).")],
    index: IndexOpt = DEFAULT_INDEX,
    k: Annotated[int, typer.Option("-k", help="Results to show.")] = 10,
    shortlist: Annotated[int, typer.Option(help="Global candidates to rerank.")] = 100,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Global ranking only.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the catalog.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Rank the indexed images for each query and name the recognised landmark."""
    from retrieval.api import Retriever
    from retrieval.recognition import vote

    results = []
    with cli_errors():
        retriever = Retriever.open(index, db=db, device=device)
        for image in images:
            matches = retriever.search(image, k=k, rerank=not no_rerank, shortlist=shortlist)
            label, confidence, _ = vote(matches)
            results.append((image, matches, label, confidence))
    if as_json:
        out = [
            {
                "query": str(i),
                "landmark": lab,
                "confidence": conf,
                "results": [m.__dict__ for m in ms],
            }
            for i, ms, lab, conf in results
        ]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    for image, matches, label, confidence in results:
        table = Table(title=f"{image}")
        for col in ("rank", "path", "label", "global", "inliers"):
            table.add_column(
                col, justify="right" if col in ("rank", "global", "inliers") else "left"
            )
        for rank, m in enumerate(matches, 1):
            inl = f"{m.inliers}{' ✓' if m.verified else ''}" if not no_rerank else "-"
            table.add_row(str(rank), m.path, m.label or "", f"{m.global_score:.3f}", inl)
        console.print(table)
        console.print(f"landmark: [bold]{label}[/bold] (confidence {confidence:.2f})")


@features_app.command("list")
def features_list() -> None:
    """Every local-feature method, its licence, and whether its weights were found."""
    from features.registry import LOCAL_METHODS, local_class
    from features.weights import cache_dir, resolve_weights

    table = Table(title="local-feature methods")
    for col in ("method", "licence", "weights"):
        table.add_column(col)
    for name in LOCAL_METHODS:
        try:
            cls = local_class(name)
        except ImportError as exc:
            table.add_row(name, "?", f"[red]unavailable: {exc}[/red]")
            continue
        spec = cls.weights_spec
        if spec is None:
            status = "none needed"
        else:
            try:
                status = f"[green]found[/green] {resolve_weights(spec, what=name)}"
            except RetrError:
                status = f"[yellow]missing[/yellow]: put {spec.filename} in {cache_dir()}"
        table.add_row(name, cls.licence, status)
    console.print(table)


@convert_app.command("aslfeat")
def convert_aslfeat(
    src: Annotated[Path, typer.Argument(help="Official TF checkpoint (prefix, .index or folder).")],
    out: Annotated[Path, typer.Argument(help="PyTorch checkpoint to write (e.g. aslfeat_v2.pt).")],
) -> None:
    """Convert the official ASLFeat TensorFlow checkpoint (needs `pip install 'retr[tf]'`)."""
    from features.convert.aslfeat import convert_aslfeat as convert

    with cli_errors():
        written = convert(src, out)
    console.print(f"wrote {written}")


@convert_app.command("delg")
def convert_delg(
    src: Annotated[Path, typer.Argument(help="Exported DELG SavedModel dir or checkpoint prefix.")],
    out: Annotated[Path, typer.Argument(help="PyTorch checkpoint to write.")],
    reference: Annotated[
        Path | None, typer.Option(help="SavedModel for the self-check (default: SRC).")
    ] = None,
    probe: Annotated[Path | None, typer.Option(help="Probe image for the self-check.")] = None,
) -> None:
    """Convert an official DELG model (needs `pip install 'retr[tf]'`); refuses to write when
    the converted model disagrees with TensorFlow on a probe image."""
    from features.convert.delg import convert_delg as convert

    with cli_errors():
        written = convert(src, out, probe_image=probe, reference=reference)
    console.print(f"wrote {written}")


@app.command("eval")
def evaluate(
    dataset: Annotated[str, typer.Argument(help="mini, roxford5k, rparis6k or gldv2.")],
    data: Annotated[Path, typer.Option(help="Dataset root folder.")],
    index: IndexOpt = DEFAULT_INDEX,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Global ranking only.")] = False,
    local: Annotated[str | None, typer.Option(help="Local method for a new index.")] = None,
    as_json: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a per-query AP plot here.")] = None,
    queries: Annotated[
        str | None, typer.Option(help="mini only: 'first' (held out) or 'all'.")
    ] = None,
) -> None:
    """Evaluate retrieval and recognition on a standard benchmark, global-only vs reranked."""
    from retrieval.evaluation.datasets import open_dataset
    from retrieval.evaluation.plots import plot as draw
    from retrieval.evaluation.runner import format_table, run_eval, write_json

    options = {"queries": queries} if queries else {}
    with cli_errors():
        ds = open_dataset(dataset, data, **options)
        with progress_bar("evaluating") as update:
            result = run_eval(ds, index, rerank=not no_rerank, local_method=local, progress=update)
        console.print(format_table(result))
        for note in result.notes:
            console.print(f"note: {note}", highlight=False)
        if as_json is not None:
            console.print(f"wrote {write_json(result, as_json)}")
        if plot is not None:
            console.print(f"wrote {draw(result, plot)}")


if __name__ == "__main__":
    app()
