"""`retr features ...`: the local-feature methods."""

from __future__ import annotations

import typer
from rich.table import Table

from retrieval.cli.support import console

features_app = typer.Typer(help="Local-feature methods.", no_args_is_help=True)


@features_app.command("list")
def features_list() -> None:
    """Every local-feature method, its licence, and whether its weights were found (nothing is
    downloaded, and no plug-in is loaded: the registry holds what this shows)."""
    from features.registry import LOCAL_METHODS
    from features.weights import cache_dir, find_weights

    table = Table(title="local-feature methods")
    for col in ("method", "licence", "weights"):
        table.add_column(col)
    for name, method in LOCAL_METHODS.items():
        spec = method.weights
        if spec is None:
            status = "none needed"
        elif (found := find_weights(spec)) is not None:
            status = f"[green]found[/green] {found}"
        elif spec.url:
            status = (
                f"[yellow]not downloaded[/yellow]: fetched on first use, or put {spec.filename} "
                f"in {cache_dir()}"
            )
        else:
            status = f"[yellow]missing[/yellow]: put {spec.filename} in {cache_dir()}"
        table.add_row(name, method.licence, status)
    console.print(table)
