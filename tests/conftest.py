"""Shared test fixtures. Data and parity fixtures are read in place from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETR_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

# Tests never touch the network: weight resolution must fail fast instead of downloading.
os.environ.setdefault("RETR_OFFLINE", "1")


def fixture_dir(method: str) -> Path:
    """../shared/fixtures/<method>; the test fails (not skips) when the shared folder is missing."""
    path = FIXTURES / method
    assert path.is_dir(), f"parity fixture {path} is missing: check out ../shared beside the repo"
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"{SHARED} is missing: tests read data from ../shared"
    return SHARED
