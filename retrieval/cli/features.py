"""`retr features ...`: the local-feature methods."""

from __future__ import annotations

import typer
from rich.table import Table

from features.core import RetrError
from retrieval.cli.support import console

features_app = typer.Typer(help="Local-feature methods.", no_args_is_help=True)


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
