"""The one error hierarchy of retr.

Library code raises these with the offending path or value in the message; only the CLI turns
them into a one-line message and exit code 1.
"""

from __future__ import annotations


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
