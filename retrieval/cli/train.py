"""`retr train ...`: thin typer wrappers over retrieval.training. Defaults and help come from
the config models (LoopConf, DelgTrainConf, MdaTrainConf, LearnedWhiteningConf)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from features.core import field_default, field_help
from retrieval.cli.support import QuietOpt, cli_errors, console, progress_bar
from retrieval.training.confs import LearnedWhiteningConf, LoopConf

train_app = typer.Typer(
    help="Train retr's models: learned whitening, the DELG global model, MDA.",
    no_args_is_help=True,
)
local_app = typer.Typer(help="Train a local-feature method.", no_args_is_help=True)
train_app.add_typer(local_app, name="local")


LOOP_DEFAULTS = {name: field_default(LoopConf, name) for name in LoopConf.model_fields}


def _loop_help(name: str) -> str:
    return field_help(LoopConf, name)


def _white(name: str) -> Any:
    return field_default(LearnedWhiteningConf, name)


def _white_help(name: str) -> str:
    return field_help(LearnedWhiteningConf, name)


DataArg = Annotated[
    Path, typer.Argument(help="Labelled folder (DATA/<class>/<image>) or a GLDv2 train.csv root.")
]
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Checkpoint to write (and CKPT.train, CKPT.csv).")
]
StepsOpt = Annotated[int, typer.Option(help=_loop_help("steps"))]
BatchOpt = Annotated[int, typer.Option(help=_loop_help("batch_size"))]
LrOpt = Annotated[float, typer.Option(help=_loop_help("lr"))]
SeedOpt = Annotated[int, typer.Option(help=_loop_help("seed"))]
SaveOpt = Annotated[int, typer.Option(help=_loop_help("save_every"))]
DeviceOpt = Annotated[str, typer.Option(help=_loop_help("device"))]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the training state in CKPT.train.")
]
SizeOpt = Annotated[int, typer.Option(help="Side of the square training crops (px).")]
MinOpt = Annotated[int, typer.Option(help="Fewest usable images a class needs.")]
ClassesOpt = Annotated[
    str | None, typer.Option(help="Comma-separated classes to train on (default: all).")
]
StreamOpt = Annotated[
    bool,
    typer.Option(
        "--stream", help="Decode images for every batch instead of keeping them in memory."
    ),
]


def _run(
    task_kind: str,
    data: Path,
    out: Path,
    conf: Any,
    loop: dict[str, Any],
    data_opts: dict[str, Any],
    resume: bool,
    quiet: bool,
) -> None:
    from features.core import parse_conf
    from retrieval.training.data import open_training_set
    from retrieval.training.loop import train

    with cli_errors():
        loop_conf = parse_conf(LoopConf, loop, "training options")
        with progress_bar("reading images", quiet) as update:
            ds = open_training_set(
                data, keep_side=2 * conf.image_size, progress=update, **data_opts
            )
        if task_kind == "delg":
            from retrieval.training.delg import DelgTask

            task: Any = DelgTask(ds, conf, loop_conf.batch_size, loop_conf.seed)
        else:
            from retrieval.training.mda import MdaTask

            task = MdaTask(ds, conf, loop_conf.batch_size, loop_conf.seed)
        with progress_bar("training", quiet) as update:
            report = train(task, loop_conf, out, resume=resume, progress=update)
    console.print(
        f"{len(ds)} images in {ds.num_classes} classes ({len(ds.skipped)} skipped); "
        f"steps {report.resumed_from}->{report.steps} on {report.device}, "
        f"{report.images_per_s:.1f} images/s",
        highlight=False,
    )
    for path, reason in ds.skipped[:10]:
        console.print(f"skipped {path}: {reason}", highlight=False)
    if report.first:
        console.print(
            f"loss {report.first['loss']:.4f} -> {report.last['loss']:.4f}", highlight=False
        )
    console.print(f"wrote {report.out} (log {report.log})", highlight=False)


def _loop_opts(
    steps: int, batch_size: int, lr: float, seed: int, save_every: int, device: str
) -> dict[str, Any]:
    """The training-loop options every `retr train` model command shares."""
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "save_every": save_every,
        "device": device,
    }


def _data_opts(min_images: int, classes: str | None, stream: bool) -> dict[str, Any]:
    return {
        "in_memory": not stream,
        "min_images": min_images,
        "classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
    }


@train_app.command("global")
def train_global(
    data: DataArg,
    out: OutOpt,
    backbone: Annotated[
        str, typer.Option(help="efficientnet-lite0, -lite1 or -lite2.")
    ] = "efficientnet-lite0",
    global_dim: Annotated[int, typer.Option(help="Output of the FC whitening layer.")] = 512,
    image_size: SizeOpt = 512,
    imagenet: Annotated[
        bool, typer.Option(help="Start from the backbone's ImageNet weights.")
    ] = True,
    train_bn: Annotated[
        bool,
        typer.Option("--train-bn", help="Train BatchNorm statistics (large GPU batches only)."),
    ] = False,
    steps: StepsOpt = LOOP_DEFAULTS["steps"],
    batch_size: BatchOpt = LOOP_DEFAULTS["batch_size"],
    lr: LrOpt = LOOP_DEFAULTS["lr"],
    seed: SeedOpt = LOOP_DEFAULTS["seed"],
    save_every: SaveOpt = LOOP_DEFAULTS["save_every"],
    device: DeviceOpt = LOOP_DEFAULTS["device"],
    min_images: MinOpt = 2,
    classes: ClassesOpt = None,
    stream: StreamOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train DELG (GeM + FC whitening + ArcFace, attention + autoencoder local branch); use the
    result with `--global trained:CKPT`."""
    from features.core import parse_conf
    from retrieval.training.delg import DelgTrainConf

    with cli_errors():
        conf = parse_conf(
            DelgTrainConf,
            {
                "arch": {"backbone": backbone, "global_dim": global_dim},
                "image_size": image_size,
                "imagenet": imagenet,
                "freeze_bn": not train_bn,
            },
            "train global options",
        )
    loop = _loop_opts(steps, batch_size, lr, seed, save_every, device)
    _run("delg", data, out, conf, loop, _data_opts(min_images, classes, stream), resume, quiet)


@local_app.command("mda")
def train_mda(
    data: DataArg,
    out: OutOpt,
    architecture: Annotated[str, typer.Option(help="resnet50 or resnet101.")] = "resnet50",
    heads: Annotated[int, typer.Option(help="Attention heads N.")] = 4,
    backbone: Annotated[
        Path | None, typer.Option(help="torchvision ResNet state dict to start the trunk from.")
    ] = None,
    diversity_weight: Annotated[
        float, typer.Option(help="Weight of the attention-diversity loss.")
    ] = 1.0,
    image_size: SizeOpt = 512,
    steps: StepsOpt = LOOP_DEFAULTS["steps"],
    batch_size: BatchOpt = LOOP_DEFAULTS["batch_size"],
    lr: LrOpt = LOOP_DEFAULTS["lr"],
    seed: SeedOpt = LOOP_DEFAULTS["seed"],
    save_every: SaveOpt = LOOP_DEFAULTS["save_every"],
    device: DeviceOpt = LOOP_DEFAULTS["device"],
    min_images: MinOpt = 2,
    classes: ClassesOpt = None,
    stream: StreamOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train MDA (per-head classification + attention diversity); use the result with
    `--local mda --local-conf '{"weights": "CKPT"}'`."""
    from features.core import parse_conf
    from retrieval.training.mda import MdaTrainConf

    with cli_errors():
        conf = parse_conf(
            MdaTrainConf,
            {
                "arch": {"architecture": architecture, "num_heads": heads},
                "image_size": image_size,
                "diversity_weight": diversity_weight,
                "backbone": str(backbone) if backbone else None,
            },
            "train local mda options",
        )
    loop = _loop_opts(steps, batch_size, lr, seed, save_every, device)
    _run("mda", data, out, conf, loop, _data_opts(min_images, classes, stream), resume, quiet)


@train_app.command("whitening")
def train_whitening_cmd(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory.")] = Path(
        "retr-index"
    ),
    shortlist: Annotated[int, typer.Option(help=_white_help("shortlist"))] = _white("shortlist"),
    shrinkage: Annotated[float, typer.Option(help=_white_help("shrinkage"))] = _white("shrinkage"),
    mix: Annotated[float, typer.Option(help=_white_help("mix"))] = _white("mix"),
    min_pairs: Annotated[int, typer.Option(help=_white_help("min_pairs"))] = _white("min_pairs"),
    matcher: Annotated[str | None, typer.Option(help=_white_help("matcher"))] = None,
    use: Annotated[
        str | None,
        typer.Option(help="Only switch the index to its 'pca' or 'learned' whitening (both kept)."),
    ] = None,
    revert: Annotated[bool, typer.Option("--revert", help="Same as --use pca.")] = False,
    wait: Annotated[float | None, typer.Option(help="Seconds to wait for another writer.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Learn the whitening from the index's own verified pairs (no labels), re-project its
    vectors, and keep the PCA whitening to switch back to."""
    from features.core import parse_conf
    from retrieval.training.whitening import train_whitening, use_whitening

    with cli_errors():
        if revert or use:
            report = use_whitening(index, "pca" if revert else str(use), wait=wait)
            console.print(
                f"{index}: now uses its {'pca' if revert else use} whitening "
                f"(generation {report.generation}, {report.images} vectors re-projected)",
                highlight=False,
            )
            return
        conf = parse_conf(
            LearnedWhiteningConf,
            {
                "shortlist": shortlist,
                "shrinkage": shrinkage,
                "mix": mix,
                "min_pairs": min_pairs,
                "matcher": matcher,
            },
            "train whitening options",
        )
        with progress_bar("mining pairs", quiet) as update:
            done = train_whitening(index, conf, wait=wait, progress=update)
    console.print(
        f"{index}: learned whitening from {done.pairs} verified pairs among {done.searched} "
        f"images (generation {done.generation}); `retr train whitening --revert` switches back",
        highlight=False,
    )
