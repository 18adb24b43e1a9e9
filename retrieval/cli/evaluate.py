"""`retr eval`: retrieval and recognition on a standard benchmark. Options take their
defaults and help from SearchConf."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from features.core import field_default, field_help
from retrieval.cli.support import (
    DEFAULT_INDEX,
    IndexOpt,
    cli_errors,
    console,
    index_config,
    progress_bar,
)
from retrieval.search_conf import SearchConf


def _search_help(name: str) -> str:
    return field_help(SearchConf, name)


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
        config = index_config(local_method=local)
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
