"""What every layer of retr shares: the error hierarchy, strict configs, device choice, hashing.

`features`, `index` and `retrieval` all import from here (and nothing here imports them), so an
error raised anywhere is a RetrError that the CLI and the HTTP service turn into one line, and
every config rejects unknown keys the same way.

Errors: library code raises these with the offending path or value in the message; only the
boundaries (CLI, service) turn them into a one-line message and an exit or status code.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    import torch

# --- errors ------------------------------------------------------------------------------------


class RetrError(Exception):
    """Base of every error retr raises on purpose."""


class ConfigError(RetrError, ValueError):
    """An unknown option, a bad value, or an unknown plug-in name."""


class ImageReadError(RetrError):
    """An image could not be decoded or is unusable (corrupt, empty, too small, too big)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsNotFoundError(RetrError, FileNotFoundError):
    """A model checkpoint could not be found or downloaded; the message says where to put it."""


class CheckpointError(RetrError):
    """A checkpoint was found but does not match the model (wrong keys or shapes)."""


class IndexError_(RetrError):
    """An index directory is missing, damaged, or was built with another configuration."""


class StoreMismatchError(IndexError_):
    """A feature store was written with another configuration than the one in use."""


class IndexLockedError(IndexError_):
    """Another process holds the index's write lock."""


class IndexWriteError(IndexError_):
    """A write to an index could not complete (disk full, read-only, a file that exists where a
    new one must be created); what was committed before it is intact."""


class DiskFullError(IndexWriteError):
    """A write ran out of space (or quota); the message names the folder and the space needed."""


class DatasetError(RetrError):
    """A dataset directory is missing files or holds files in an unexpected format."""


class DownloadError(RetrError):
    """An official dataset file could not be downloaded."""


class PlotError(RetrError):
    """A plot cannot be drawn: matplotlib is missing or the result has nothing to show."""


# --- configs -----------------------------------------------------------------------------------


class StrictConf(BaseModel):
    """A frozen config that rejects unknown keys (a typo raises instead of being ignored). The
    docstring under a field is its description (the CLI shows it as the option's help)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), use_attribute_docstrings=True
    )


C = TypeVar("C", bound=StrictConf)


def parse_conf(conf_cls: type[C], values: dict[str, Any], what: str) -> C:
    """Validate `values` against `conf_cls`, turning pydantic's report into one ConfigError line."""
    try:
        return conf_cls.model_validate(values)
    except ValidationError as exc:
        nested = [e["ctx"]["error"] for e in exc.errors() if _is_config_error(e)]
        if nested:  # a nested config already said it in one line
            raise ConfigError(f"{what}: {nested[0]}") from None
        valid = ", ".join(conf_cls.model_fields)
        raise ConfigError(f"{what}: {validation_message(exc)} (valid options: {valid})") from None


def _is_config_error(error: Any) -> bool:
    return isinstance(error.get("ctx", {}).get("error"), ConfigError)


def field_help(conf_cls: type[StrictConf], name: str) -> str:
    """The description of a config field (its docstring), for CLI help."""
    return (conf_cls.model_fields[name].description or "").split("\n\n")[0].replace("\n", " ")


def field_default(conf_cls: type[StrictConf], name: str) -> Any:
    return conf_cls.model_fields[name].default


def validation_message(exc: ValidationError) -> str:
    """pydantic's report as one line: `field: problem; field: problem`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
    )


# --- devices and files -------------------------------------------------------------------------


def pick_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto": CUDA when available, else the CPU."""
    import torch  # here, not at the top: configs and errors load without torch (fast start-up)

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MB blocks (checkpoints, corpus images, index
    files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- secrets -----------------------------------------------------------------------------------

SECRET_OPTIONS = ("--token", "--password", "--api-key")
"""Command-line options whose value is a secret (and `--db`/`--vectors` URLs' passwords)."""
SECRET_ENV = ("RETR_TOKEN",)
MASK = "***"


def mask_secrets(text: str) -> str:
    """`text` (a command line, a URL, a message) with every secret replaced by ***: the value of
    a secret option (`--token X`, `--token=X`), the password of a URL
    (`postgresql://alice:PASSWORD@host` -> `postgresql://alice:***@host`), and the value of
    `$RETR_TOKEN` wherever it appears. Used wherever a command line or a URL is recorded or
    shown (the lock file, error messages, logs)."""
    options = "|".join(re.escape(o) for o in SECRET_OPTIONS)
    text = re.sub(rf"({options})(=|\s+)(\S+)", rf"\1\2{MASK}", text)
    text = re.sub(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^@\s/]+@", rf"\1{MASK}@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    return text
