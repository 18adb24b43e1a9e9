"""What every `retr` command group shares: the consoles, the error boundary, the progress bar,
the common options, and the parsing of JSON and config options.

Library errors (RetrError) become one red line and exit code 1 here, and only here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from features.core import ConfigError, RetrError

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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

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


def json_option(name: str, value: str | None) -> dict[str, Any]:
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


def index_config(**given: Any) -> Any:
    """IndexConfig from the options the user gave (None = not given)."""
    from index.layout import IndexConfig

    return IndexConfig.parse({k: v for k, v in given.items() if v not in (None, {})})
