"""`retr convert ...`: official checkpoints to retr's PyTorch format (TensorFlow: the `tf`
extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli.support import cli_errors, console

convert_app = typer.Typer(
    help="Convert official checkpoints to retr's PyTorch format.", no_args_is_help=True
)


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
