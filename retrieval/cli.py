"""The `retr` command: thin typer wrappers over the library.

Library errors (RetrError) become one red line and exit code 1 here, and only here. Options of
`index build` and `query` take their defaults and help from the config models (IndexConfig,
SearchConf), and their values are validated by them.
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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from features.core import ConfigError, RetrError, field_default, field_help
from retrieval.search import SearchConf
from retrieval.training.cli import train_app

app = typer.Typer(
    help="retr: landmark image retrieval with a DELG shortlist and local-feature reranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build, update, inspect and repair an index.", no_args_is_help=True)
features_app = typer.Typer(help="Local-feature methods.", no_args_is_help=True)
convert_app = typer.Typer(
    help="Convert official checkpoints to retr's PyTorch format.", no_args_is_help=True
)
app.add_typer(index_app, name="index")
app.add_typer(features_app, name="features")
app.add_typer(convert_app, name="convert")
app.add_typer(train_app, name="train")

console = Console()
err_console = Console(stderr=True)

IndexOpt = Annotated[Path, typer.Option("--index", "-i", help="Index directory.")]
DEFAULT_INDEX = Path("retr-index")
DbOpt = Annotated[
    str | None, typer.Option(help="SQLAlchemy URL of the catalog (default: the index's own).")
]
WaitOpt = Annotated[
    float | None,
    typer.Option(help="Seconds to wait while another process writes the index (default: fail)."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


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
def progress_bar(
    description: str, quiet: bool = False
) -> Iterator[Callable[[int, int, str], None] | None]:
    """A rich progress bar (images done / total, rate, elapsed) fed by a progress callback."""
    if quiet:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=None, current="")

        def update(done: int, total: int, current: str) -> None:
            bar.update(task, completed=done, total=total, current=current[-50:])

        yield update


def _help_index(name: str) -> str:
    from index.layout import IndexConfig

    return field_help(IndexConfig, name)


def _search_help(name: str) -> str:
    return field_help(SearchConf, name)


def _json_option(name: str, value: str | None) -> dict[str, Any]:
    """A JSON-object option, or ConfigError in one line."""
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{name}: expected a JSON object like '{{\"key\": 1}}'")
    return parsed


def _index_config(**given: Any) -> Any:
    """IndexConfig from the options the user gave (None = not given)."""
    from index.layout import IndexConfig

    return IndexConfig.parse({k: v for k, v in given.items() if v not in (None, {})})


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
    index_type: Annotated[str | None, typer.Option(help=_help_index("index_type"))] = None,
    local_dtype: Annotated[str | None, typer.Option(help=_help_index("local_dtype"))] = None,
    matcher: Annotated[str | None, typer.Option(help=_help_index("matcher"))] = None,
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
            **_json_option("--local-conf", local_conf),
            **({"max_keypoints": max_keypoints} if max_keypoints is not None else {}),
            **({"weights": str(weights)} if weights else {}),
        }
        config = _index_config(
            local_method=local,
            global_model=global_model,
            local_conf=local_values,
            global_conf=_json_option("--global-conf", global_conf),
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
    from index.maintenance import index_info as describe

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
    from index.maintenance import check_index

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
    from index.maintenance import repair_index

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


@app.command("query")
def query(
    images: Annotated[list[Path], typer.Argument(help="Query image(s).")],
    index: IndexOpt = DEFAULT_INDEX,
    k: Annotated[int, typer.Option("-k", help=_search_help("k"))] = field_default(SearchConf, "k"),
    shortlist: Annotated[int, typer.Option(help=_search_help("shortlist"))] = field_default(
        SearchConf, "shortlist"
    ),
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Global ranking only.")] = False,
    matcher: Annotated[str | None, typer.Option(help=_search_help("matcher"))] = None,
    qe: Annotated[int, typer.Option(help=_search_help("qe"))] = field_default(SearchConf, "qe"),
    dba: Annotated[int, typer.Option(help=_search_help("dba"))] = field_default(SearchConf, "dba"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    show: Annotated[
        Path | None,
        typer.Option(help="Write one match picture (PNG) per result into this folder."),
    ] = None,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Rank the indexed images for each query and name the recognised landmark."""
    from features.core import parse_conf
    from retrieval.api import Retriever

    results = []
    with cli_errors():
        values = {
            "k": k,
            "shortlist": shortlist,
            "rerank": not no_rerank,
            "matcher": matcher,
            "qe": qe,
            "dba": dba,
        }
        conf = parse_conf(SearchConf, values, "query options")
        retriever = Retriever.open(index, db=db, device=device)
        for image in images:
            results.append((image, retriever.search(image, conf)))
        if show is not None:
            from retrieval.pictures import write_result_pictures

            written = [
                p
                for image, result in results
                for p in write_result_pictures(retriever, image, result, show, conf)
            ]
            err_console.print(
                f"wrote {len(written)} match pictures to {show}", highlight=False, soft_wrap=True
            )
    if as_json:
        sys.stdout.write(json.dumps([result_json(i, r) for i, r in results], indent=2) + "\n")
        return
    for image, result in results:
        table = Table(title=f"{image}")
        for col in ("rank", "path", "label", "global", "inliers"):
            table.add_column(
                col, justify="right" if col in ("rank", "global", "inliers") else "left"
            )
        for rank, m in enumerate(result.matches, 1):
            inl = f"{m.inliers}{' ✓' if m.verified else ''}" if conf.rerank else "-"
            table.add_row(str(rank), m.path, m.label or "", f"{m.global_score:.3f}", inl)
        console.print(table)
        rec = result.recognition
        console.print(f"landmark: [bold]{rec.label}[/bold] (confidence {rec.confidence:.2f})")


def result_json(image: Path | str, result: Any) -> dict[str, Any]:
    """One query's result as `retr query --json` prints it (the HTTP service sends the same)."""
    from dataclasses import asdict

    rec = result.recognition
    return {
        "query": str(image),
        "landmark": rec.label,
        "confidence": rec.confidence,
        "evidence": [m.id for m in rec.evidence],
        "results": [asdict(m) for m in result.matches],
        "timings": result.timings,
        "generation": result.generation,
    }


def _index_default(name: str) -> Any:
    from index.layout import IndexConfig

    return field_default(IndexConfig, name)


def _serve_help(name: str) -> str:
    from retrieval.server.settings import ServerSettings

    return field_help(ServerSettings, name)


def _serve_default(name: str) -> Any:
    from retrieval.server.settings import ServerSettings

    return field_default(ServerSettings, name)


@app.command("serve")
def serve(
    index: IndexOpt = DEFAULT_INDEX,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless told).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes, each with its own models and searches.")
    ] = 1,
    token: Annotated[
        str | None, typer.Option(envvar="RETR_TOKEN", help=_serve_help("token"))
    ] = None,
    max_body_mb: Annotated[
        float | None, typer.Option(help="Largest request body in MB (default 25).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help=_serve_help("concurrency"))] = _serve_default(
        "concurrency"
    ),
    queue: Annotated[int, typer.Option(help=_serve_help("queue"))] = _serve_default("queue"),
    timeout: Annotated[float, typer.Option(help=_serve_help("timeout"))] = _serve_default(
        "timeout"
    ),
    db: DbOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve search, recognition, index updates and a web page over HTTP (FastAPI and uvicorn:
    the `serve` extra of retr)."""
    from features.core import parse_conf
    from retrieval.server import ServerSettings

    body = {"max_body_bytes": int(max_body_mb * 2**20)} if max_body_mb is not None else {}
    with cli_errors():
        try:
            from retrieval.server.app import serve as run
        except ImportError as exc:
            raise ConfigError(f"retr serve needs pip install 'retr[serve]' ({exc})") from None
        settings = parse_conf(
            ServerSettings,
            {
                "index": index,
                "db": db,
                "device": device,
                "token": token,
                "concurrency": concurrency,
                "queue": queue,
                "timeout": timeout,
                **body,
            },
            "serve options",
        )
        err_console.print(f"serving {index} on http://{host}:{port}", highlight=False)
        run(settings, host, port, workers)


@app.command("match")
def match(
    image_a: Annotated[Path, typer.Argument(help="First image.")],
    image_b: Annotated[Path, typer.Argument(help="Second image.")],
    out: Annotated[Path | None, typer.Option(help="Write the match picture (PNG) here.")] = None,
    local: Annotated[str, typer.Option(help="Local-feature method.")] = _index_default(
        "local_method"
    ),
    max_keypoints: Annotated[int | None, typer.Option(help="Keypoints kept per image.")] = None,
    matcher: Annotated[
        str,
        typer.Option(help="auto, mnn, lightglue or mnn+lightglue (a plan: its last matcher)."),
    ] = _index_default("matcher"),
    rejected: Annotated[bool, typer.Option(help="Draw the matches RANSAC rejected (red).")] = True,
    keypoints: Annotated[bool, typer.Option(help="Draw every keypoint.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Match any two images as the rerank does (no index needed): extract, match, verify; print
    the counts and draw the verified correspondences."""
    from retrieval.pictures import match_files

    local_conf = {"max_keypoints": max_keypoints} if max_keypoints is not None else None
    with cli_errors():
        picture = match_files(
            image_a,
            image_b,
            local,
            local_conf,
            matcher,
            device=device,
            rejected=rejected,
            keypoints=keypoints,
        )
        if out is not None:
            picture.save(out)
    verdict = "verified" if picture.pair.verified else "not verified"
    console.print(
        f"{picture.pair.matcher}: {picture.matches} matches, {picture.inliers} inliers "
        f"({verdict})" + (f"; wrote {out}" if out is not None else ""),
        highlight=False,
        soft_wrap=True,
    )


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
    matcher: Annotated[
        list[str] | None,
        typer.Option(help="Matcher(s) of the rerank; repeat to compare several in one run."),
    ] = None,
    qe: Annotated[int, typer.Option(help=_search_help("qe"))] = field_default(SearchConf, "qe"),
    dba: Annotated[int, typer.Option(help=_search_help("dba"))] = field_default(SearchConf, "dba"),
    stored_queries: Annotated[
        bool,
        typer.Option(
            "--stored-queries",
            help="Queries that are whole database images (--queries all) use their stored "
            "features instead of being extracted again (times then leave extraction out).",
        ),
    ] = False,
) -> None:
    """Evaluate retrieval and recognition on a standard benchmark, global-only vs reranked."""
    from features.core import parse_conf
    from retrieval.evaluation.datasets import open_dataset
    from retrieval.evaluation.plots import plot as draw
    from retrieval.evaluation.runner import format_table, run_eval, write_json

    options = {"queries": queries} if queries else {}
    with cli_errors():
        ds = open_dataset(dataset, data, **options)
        config = _index_config(local_method=local)
        search = parse_conf(SearchConf, {"qe": qe, "dba": dba}, "eval options")
        variants = {
            f"rerank {m}": parse_conf(SearchConf, {**search.model_dump(), "matcher": m}, "eval")
            for m in matcher or ()
        }
        with progress_bar("evaluating") as update:
            result = run_eval(
                ds,
                index,
                config,
                rerank=not no_rerank,
                progress=update,
                search=search,
                variants=variants or None,
                stored_queries=stored_queries,
            )
        console.print(format_table(result))
        for note in result.notes:
            console.print(f"note: {note}", highlight=False)
        if as_json is not None:
            console.print(f"wrote {write_json(result, as_json)}")
        if plot is not None:
            console.print(f"wrote {draw(result, plot)}")


if __name__ == "__main__":
    app()
