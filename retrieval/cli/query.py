"""`retr query` and `retr match`: rank an index's images for a query, match any two images.
Options take their defaults and help from SearchConf (and IndexConfig for `match`), and their
values are validated by them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from features.core import field_default, field_help
from index.layout import IndexConfig
from retrieval.cli.support import (
    DEFAULT_INDEX,
    DbOpt,
    DeviceOpt,
    IndexOpt,
    cli_errors,
    console,
    err_console,
)
from retrieval.search_conf import SearchConf


def _search_help(name: str) -> str:
    return field_help(SearchConf, name)


def _index_default(name: str) -> Any:
    return field_default(IndexConfig, name)


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
        from retrieval.search import result_json

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
