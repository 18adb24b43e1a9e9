"""Labelled training images: a folder of class sub-folders, or the GLDv2 `train.csv` layout.

- Labelled folder: `DATA/<class>/<image>` (nested folders below a class belong to it).
- Google Landmarks v2: `DATA/train.csv` (id,url,landmark_id) or `DATA/train_clean.csv`
  (landmark_id,images), images at `DATA/train/a/b/c/<id>.jpg` (retrieval.evaluation.datasets).

Every image is decoded once when the set is opened: files that cannot be used (corrupt,
truncated, too small...) are skipped and counted with their reason, as indexing does. A class
folder without images, a class with fewer than `min_images`, and a CSV that names no image on disk
are errors (DatasetError, one line naming the folder or file and the fix).

Batches are a pure function of (seed, step): the epoch's permutation comes from (seed, epoch) and
the augmentation of each image from (seed, step), so a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from features.core import DatasetError, ImageReadError
from features.image import load_image, resize_max
from retrieval.building import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

GLDV2_CSVS = ("train_clean.csv", "train.csv")


@dataclass
class TrainingSet:
    """Training images. images[i] is (h, w, 3) uint8 with longer side <= `keep_side` (None when
    not kept in memory: `image(i)` decodes it again), labels[i] an index into `classes`."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    images: list[np.ndarray | None]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every file left out."""
    keep_side: int = 512

    def image(self, i: int) -> np.ndarray:
        kept = self.images[i]
        return (
            kept if kept is not None else resize_max(load_image(self.paths[i]), self.keep_side)[0]
        )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_training_set(
    root: str | Path,
    *,
    min_images: int = 2,
    keep_side: int = 512,
    classes: list[str] | None = None,
    in_memory: bool = True,
    progress: Progress | None = None,
) -> TrainingSet:
    """The labelled images under `root` (layout detected: a GLDv2 CSV, else class folders).
    classes: keep only these (e.g. a split by group); keep_side: images are kept in memory with
    this longer side at most (twice the training size is plenty for the crops); in_memory=False
    decodes each image again when a batch needs it (sets larger than memory)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; pass a folder of class sub-folders")
    csv_path = next((root / n for n in GLDV2_CSVS if (root / n).is_file()), None)
    listed = _from_gldv2(root, csv_path) if csv_path else _from_folders(root)
    if classes is not None:
        unknown = sorted(set(classes) - set(listed))
        if unknown:
            raise DatasetError(
                f"{root}: no class named {unknown[:5]} (classes: {sorted(listed)[:8]}...)"
            )
        listed = {c: listed[c] for c in classes}
    return _decode(root, listed, min_images, keep_side, in_memory, progress)


def _from_folders(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DatasetError(
                f"{folder}: class folder holds no images; add images or remove the folder"
            )
        out[folder.name] = files
    if not out:
        raise DatasetError(
            f"{root}: no class sub-folders; expected DATA/<class>/<image> or a GLDv2 train.csv"
        )
    return out


def _from_gldv2(root: Path, csv_path: Path) -> dict[str, list[Path]]:
    from retrieval.evaluation.datasets import _read_train_labels, gldv2_path

    labels = _read_train_labels(csv_path)
    out: dict[str, list[Path]] = defaultdict(list)
    missing = 0
    for image_id, landmark in labels.items():
        path = gldv2_path(root, "train", image_id)
        if path.is_file():
            out[landmark].append(path)
        else:
            missing += 1
    if not out:
        raise DatasetError(
            f"{csv_path} does not match the images: none of its {len(labels)} rows has a file "
            f"under {root / 'train'} (expected train/a/b/c/<id>.jpg)"
        )
    if missing:
        logger.warning("%s: %d of %d rows have no image on disk", csv_path, missing, len(labels))
    return dict(sorted(out.items()))


def _decode(
    root: Path,
    listed: dict[str, list[Path]],
    min_images: int,
    keep_side: int,
    in_memory: bool,
    progress: Progress | None,
) -> TrainingSet:
    total = sum(len(v) for v in listed.values())
    out = TrainingSet(root, [], [], [], [], keep_side=keep_side)
    done = 0
    kept: dict[str, list[tuple[str, np.ndarray | None]]] = {}
    for name, files in listed.items():
        kept[name] = []
        for path in files:
            if progress:
                progress(done, total, path.name)
            done += 1
            try:
                image = resize_max(load_image(path), keep_side)[0]
            except ImageReadError as exc:
                out.skipped.append((str(path), exc.reason))
                continue
            kept[name].append((str(path), image if in_memory else None))
    small = {n: len(v) for n, v in kept.items() if len(v) < min_images}
    if small:
        shown = ", ".join(f"{n} ({k})" for n, k in list(small.items())[:5])
        raise DatasetError(
            f"{root}: {len(small)} classes have fewer than {min_images} usable images: {shown}"
            f"{' ...' if len(small) > 5 else ''}; add images, remove them, or lower --min-images"
        )
    for name, items in kept.items():
        out.classes.append(name)
        for file, decoded in items:
            out.paths.append(file)
            out.labels.append(len(out.classes) - 1)
            out.images.append(decoded)
    if out.skipped:
        logger.warning("%s: skipped %d unusable images", root, len(out.skipped))
    if progress:
        progress(total, total, "")
    return out


# --- batches -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """DELG's training augmentation: a random crop (area and aspect ratio in these ranges, as
    the Inception-style distorted bounding box DELG trains with), resized to `size` x `size`,
    and a random horizontal flip."""

    size: int = 512
    area: tuple[float, float] = (0.05, 1.0)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def batch_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """Images of training step `step`: consecutive slices of a per-epoch permutation (the last
    incomplete slice of an epoch is dropped, unless the set is smaller than one batch)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if n < batch:  # tiny sets: sample with wrap-around
        return [int(perm[(k * batch + j) % n]) for j in range(batch)]
    return perm[k * batch : (k + 1) * batch].tolist()


def crop_box(h: int, w: int, aug: Augment, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop; the whole image when no draw fits."""
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        area = h * w * (aug.area[0] + u[0] * (aug.area[1] - aug.area[0]))
        log_r = math.log(aug.aspect[0]) + u[1] * (math.log(aug.aspect[1]) - math.log(aug.aspect[0]))
        ratio = math.exp(log_r)
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(u[2] * (h - ch + 1)) if h > ch else 0
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    return 0, 0, h, w


def augmented(image: np.ndarray, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """(h, w, 3) uint8 -> (3, size, size) float32 RGB in [0, 255], randomly cropped and flipped."""
    top, left, ch, cw = crop_box(image.shape[0], image.shape[1], aug, gen)
    crop = torch.from_numpy(np.ascontiguousarray(image[top : top + ch, left : left + cw]))
    x = crop.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(aug.size, aug.size), mode="bilinear", align_corners=False)[0]
    if aug.flip and bool(torch.rand(1, generator=gen) < 0.5):
        x = x.flip(-1)
    return x


def make_batch(
    data: TrainingSet, aug: Augment, batch: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, size, size) float RGB in [0, 255] and (B,) int64 labels of step `step`."""
    idx = batch_indices(len(data), batch, seed, step)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    images = torch.stack([augmented(data.image(i), aug, gen) for i in idx])
    return images, torch.tensor([data.labels[i] for i in idx], dtype=torch.int64)
