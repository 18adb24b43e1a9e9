"""The training loop every `retr train` model shares.

- Seeded: the batch of step s and its augmentation are a function of (seed, s) (training.data),
  and the global torch RNG (dropout, drop-connect) is re-seeded from (seed, s) before each step,
  so a run resumed from a checkpoint continues bit for bit as the uninterrupted run would have
  (on the same machine and software).
- Resumable: every `save_every` steps and at the end, the training state (model, optimiser,
  scaler, step) goes to CKPT.train and the inference checkpoint to CKPT, both atomically
  (training.checkpoint); `resume=True` continues from CKPT.train, refusing one written with
  other settings.
- Mixed precision (float16 autocast + gradient scaling) on a CUDA device, off on the CPU.
- SGD with momentum, learning rate decayed linearly to 0 over `steps` (DELG's schedule).
- Metrics: one CSV row per step (CKPT.csv): step, lr, each loss, images/s; a progress
  callback gets (step, steps, "loss ... img/s").
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from features.core import CheckpointError, pick_device
from retrieval.training import checkpoint
from retrieval.training.confs import LoopConf

logger = logging.getLogger(__name__)

STATE_FORMAT = "retr-train-state-v1"
Progress = Callable[[int, int, str], None]


class Task(Protocol):
    """What the loop trains: a module holding every trained parameter, its losses on a batch,
    the batch of a step, the inference checkpoint, and what must match on resume."""

    meta: dict[str, Any]

    @property
    def model(self) -> nn.Module: ...

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named losses; "loss" is the total that is minimised."""
        ...

    def set_train(self) -> None: ...

    def export(self) -> dict[str, Any]: ...


@dataclass
class TrainReport:
    out: Path
    log: Path
    steps: int
    resumed_from: int
    seconds: float
    images_per_s: float
    first: dict[str, float] = field(default_factory=dict)
    """Losses of the first step this run made."""
    last: dict[str, float] = field(default_factory=dict)
    """Losses of the last step."""
    device: str = "cpu"


def train(
    task: Task,
    conf: LoopConf,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainReport:
    """Run `task` to `conf.steps`, writing CKPT = `out`, CKPT.train and CKPT.csv."""
    out = Path(out)
    device = pick_device(conf.device)
    amp = device.type == "cuda" if conf.amp is None else conf.amp and device.type == "cuda"
    task.model.to(device)
    opt = torch.optim.SGD(
        task.model.parameters(), conf.lr, momentum=conf.momentum, weight_decay=conf.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    meta = {**task.meta, "loop": conf.model_dump(exclude={"steps", "save_every", "device"})}
    start = _start(out, resume, meta, task.model, opt, scaler)
    log = out.with_name(out.name + ".csv")
    writer = _CsvLog(log, start)
    report = TrainReport(out, log, conf.steps, start, 0.0, 0.0, device=str(device))
    try:
        for step in range(start, conf.steps):
            lr = conf.lr * (1 - step / conf.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            values = _step(task, opt, scaler, conf.seed, step, device, amp)
            dt = time.perf_counter() - t0
            report.seconds += dt
            report.last = values
            report.first = report.first or values
            writer.row(step, lr, values, conf.batch_size / dt)
            if progress:
                rate = f"{conf.batch_size / dt:.1f} img/s"
                progress(step + 1, conf.steps, f"loss {values['loss']:.4f}  {rate}")
            if (step + 1) % conf.save_every == 0 or step + 1 == conf.steps:
                _save(out, task, opt, scaler, meta, step + 1)
    finally:
        writer.close()
    done = (conf.steps - start) * conf.batch_size
    report.images_per_s = done / report.seconds if report.seconds else 0.0
    return report


def _step(
    task: Task,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    seed: int,
    step: int,
    device: torch.device,
    amp: bool,
) -> dict[str, float]:
    torch.manual_seed(seed * 7919 + step)
    images, labels = task.batch(step)
    images, labels = images.to(device), labels.to(device)
    task.set_train()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        losses = task.losses(images, labels)
    scaler.scale(losses["loss"]).backward()
    scaler.step(opt)
    scaler.update()
    return {k: float(v.detach()) for k, v in losses.items()}


def _start(
    out: Path,
    resume: bool,
    meta: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> int:
    state_path = checkpoint.train_state_path(out)
    if not resume:
        if out.exists() or state_path.exists():
            raise CheckpointError(
                f"{out} already exists; pass --resume to continue its training, or choose "
                "another --out"
            )
        return 0
    if not state_path.exists():
        raise CheckpointError(f"cannot resume: {state_path} does not exist (drop --resume)")
    state = checkpoint.load(state_path, "training state")
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_path} is not a retr training state")
    if state["meta"] != meta:
        diff = sorted(
            k for k in set(meta) | set(state["meta"]) if meta.get(k) != state["meta"].get(k)
        )
        raise CheckpointError(
            f"cannot resume {state_path}: it was trained with other settings ({', '.join(diff)}); "
            "use the same options or another --out"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    logger.info("resuming %s at step %d", out, state["step"])
    return int(state["step"])


def _save(
    out: Path,
    task: Task,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    meta: dict[str, Any],
    step: int,
) -> None:
    """The training state first, then the inference checkpoint: a crash in between leaves a
    state one save ahead, which resuming simply continues from."""
    state = {
        "format": STATE_FORMAT,
        "meta": meta,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
    }
    checkpoint.save(state, checkpoint.train_state_path(out))
    checkpoint.save(task.export(), out)


class _CsvLog:
    """CKPT.csv: one row per step; rows past the resumed step (a killed run's) are dropped."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.header: list[str] | None = None
        kept: list[list[str]] = []
        if start and path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.header = rows[0]
                kept = [r for r in rows[1:] if r and int(r[0]) < start]
        self.file = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self.csv = csv.writer(self.file)
        if self.header:
            self.csv.writerows([self.header, *kept])

    def row(self, step: int, lr: float, values: dict[str, float], rate: float) -> None:
        if self.header is None:
            self.header = ["step", "lr", *values, "images_per_s"]
            self.csv.writerow(self.header)
        self.csv.writerow(
            [step, f"{lr:.6g}", *(f"{v:.6g}" for v in values.values()), f"{rate:.3f}"]
        )
        self.file.flush()

    def close(self) -> None:
        self.file.close()
