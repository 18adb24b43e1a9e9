"""The `retr` command: thin typer wrappers over the library, one module per command group.

- `support`: consoles, the error boundary (RetrError -> one red line, exit 1), progress bars
  and the options every group shares;
- `index`, `query` (`query`, `match`), `features`, `evaluate` (`eval`), `convert`, `serve`,
  `train`: the commands.

Start-up is part of the interface: these modules import typer, rich and the config models only;
each command imports its implementation inside its function, so `--help` and the commands that
run no network never import torch or a plug-in (tests/test_startup.py).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from retrieval.cli import convert, evaluate, features, index, query, serve, train
from retrieval.cli.support import err_console

app = typer.Typer(
    help="retr: landmark image retrieval with a DELG shortlist and local-feature reranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(index.index_app, name="index")
app.add_typer(features.features_app, name="features")
app.add_typer(convert.convert_app, name="convert")
app.add_typer(train.train_app, name="train")
app.command("query")(query.query)
app.command("serve")(serve.serve)
app.command("match")(query.match)
app.command("eval")(evaluate.evaluate)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


__all__ = ["app"]
