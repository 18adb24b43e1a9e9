"""`retr serve`: the HTTP service (FastAPI and uvicorn: the `serve` extra). Options take their
defaults and help from ServerSettings."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from features.core import ConfigError, field_default, field_help
from retrieval.cli.support import DEFAULT_INDEX, DbOpt, DeviceOpt, IndexOpt, cli_errors, err_console
from retrieval.server.settings import ServerSettings


def _serve_help(name: str) -> str:
    return field_help(ServerSettings, name)


def _serve_default(name: str) -> Any:
    return field_default(ServerSettings, name)


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
    private_reads: Annotated[
        bool, typer.Option("--private-reads", help=_serve_help("private_reads"))
    ] = False,
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
                "private_reads": private_reads,
                "concurrency": concurrency,
                "queue": queue,
                "timeout": timeout,
                **body,
            },
            "serve options",
        )
        err_console.print(f"serving {index} on http://{host}:{port}", highlight=False)
        run(settings, host, port, workers)
