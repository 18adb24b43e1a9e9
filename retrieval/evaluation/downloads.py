"""Downloads of the official evaluation files, for real users (never called at import time, never
by the tests): the Revisited Oxford / Paris ground truth and images, the revisitop 1M
distractors, and Google Landmarks v2. Offline (`RETR_OFFLINE=1`) or when a server is out of
reach, each fails with one line naming the URL and where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from features.core import DatasetError, DownloadError

logger = logging.getLogger(__name__)

REVISITOP_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
REVISITED_IMAGES = {
    "roxford5k": ["http://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz"],
    "rparis6k": [
        "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz",
        "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2.tgz",
    ],
}
REVISITOP1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
REVISITOP1M_PARTS = 100
GLDV2_URL = "https://s3.amazonaws.com/google-landmark/"
GLDV2_METADATA = {
    "train.csv": "metadata/train.csv",
    "train_clean.csv": "metadata/train_clean.csv",
    "test.csv": "metadata/test.csv",
    "recognition_solution_v2.1.csv": "ground_truth/recognition_solution_v2.1.csv",
}
GLDV2_TARS = {"train": 500, "index": 100, "test": 20}


# --- downloads -----------------------------------------------------------------------------------


def _open_url(url: str) -> BinaryIO:
    """The one place that touches the network (tests replace it)."""
    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - fixed official http(s) URLs


def fetch(url: str, dest: Path) -> Path:
    """Download `url` to `dest` (kept if already there) through a temp file and os.replace."""
    if dest.is_file():
        return dest
    if os.environ.get("RETR_OFFLINE", "") in ("1", "true", "yes"):
        raise DownloadError(f"offline (RETR_OFFLINE=1): cannot fetch {url}; put the file at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with _open_url(url) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url} ({reason}); put the file at {dest}") from None
    os.replace(tmp, dest)
    return dest


def _extract_flat(archive: Path, dest: Path) -> None:
    """Extract the regular files of a tar archive into `dest`, dropping their folders (as
    revisitop does); member paths are never joined, so nothing can escape `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(dest / Path(member.name).name, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _extract_tree(archive: Path, dest: Path) -> None:
    """Extract keeping folders, refusing members that would land outside `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(archive) as tar:
        for member in tar:
            target = (dest / member.name).resolve()
            if not member.isfile() or not target.is_relative_to(root):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is not None:
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def _download_revisited(name: str, data_dir: str | Path) -> Path:
    root = Path(data_dir) / name
    fetch(REVISITOP_GND_URL.format(name=name), root / f"gnd_{name}.pkl")
    jpg = root / "jpg"
    if not jpg.is_dir() or not any(jpg.iterdir()):
        for url in REVISITED_IMAGES[name]:
            archive = fetch(url, root / url.rsplit("/", 1)[-1])
            _extract_flat(archive, jpg)
            archive.unlink()
    return root


def download_roxford5k(data_dir: str | Path) -> Path:
    """Fetch Revisited Oxford5k into `<data_dir>/roxford5k` (jpg/ + gnd pickle); returns it."""
    return _download_revisited("roxford5k", data_dir)


def download_rparis6k(data_dir: str | Path) -> Path:
    """Fetch Revisited Paris6k into `<data_dir>/rparis6k` (jpg/ + gnd pickle); returns it."""
    return _download_revisited("rparis6k", data_dir)


def download_revisitop1m(data_dir: str | Path, parts: Iterable[int] | None = None) -> Path:
    """Fetch the 1M distractors (100 archives of ~4 GB) into `<data_dir>/revisitop1m`."""
    root = Path(data_dir) / "revisitop1m"
    fetch(REVISITOP1M_URL + "revisitop1m.txt", root / "revisitop1m.txt")
    for n in parts if parts is not None else range(1, REVISITOP1M_PARTS + 1):
        name = f"revisitop1m.{n}.tar.gz"
        done = root / "jpg" / f".{name}.done"
        if done.is_file():
            continue
        archive = fetch(f"{REVISITOP1M_URL}jpg/{name}", root / name)
        _extract_tree(archive, root / "jpg")
        archive.unlink()
        done.touch()
    return root


def download_gldv2(data_dir: str | Path, tars: dict[str, Iterable[int]] | None = None) -> Path:
    """Fetch the GLDv2 metadata and ground truth into `data_dir`, plus the image archives
    `tars` = {split: archive numbers}, e.g. {"test": range(20), "train": range(5)} (md5-checked
    against the official md5 files, extracted to `<split>/a/b/c/<id>.jpg`)."""
    root = Path(data_dir)
    for name, rel in GLDV2_METADATA.items():
        fetch(GLDV2_URL + rel, root / name)
    for split, numbers in (tars or {}).items():
        if split not in GLDV2_TARS:
            valid = ", ".join(GLDV2_TARS)
            raise DatasetError(f"unknown GLDv2 split '{split}' (available: {valid})")
        for n in numbers:
            _fetch_gldv2_tar(root, split, int(n))
    return root


def _fetch_gldv2_tar(root: Path, split: str, n: int) -> None:
    name = f"images_{n:03d}.tar"
    done = root / split / f".{name}.done"
    if done.is_file():
        return
    archive = fetch(f"{GLDV2_URL}{split}/{name}", root / f"{split}_{name}")
    md5_file = fetch(f"{GLDV2_URL}md5sum/{split}/md5.{name[:-4]}.txt", root / f"{split}_{name}.md5")
    expected = md5_file.read_text().split()[0]
    h = hashlib.md5()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        archive.unlink()
        raise DownloadError(f"{archive}: md5 mismatch (expected {expected}); download it again")
    _extract_tree(archive, root / split)
    archive.unlink()
    done.touch()
