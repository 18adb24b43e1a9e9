"""Shared test fixtures. Data and parity fixtures are read in place from ../shared."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETR_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

# Tests never touch the network: weight resolution must fail fast instead of downloading.
os.environ.setdefault("RETR_OFFLINE", "1")


def system_package_missing(what: str, fix: str) -> None:
    """A test needs a system program (Debian package) that is absent: skip it, or fail when
    RETR_REQUIRE_SYSTEM=1 (.ci/run sets it after installing them, so CI never skips these)."""
    if os.environ.get("RETR_REQUIRE_SYSTEM") == "1":
        pytest.fail(f"{what} is not installed ({fix}) and RETR_REQUIRE_SYSTEM=1", pytrace=False)
    pytest.skip(f"{what} is not installed ({fix})", allow_module_level=True)


def require_tensorflow() -> Any:
    """TensorFlow, for the converter tests: skipped where it is absent (the project environment
    does not install it), or failed when RETR_REQUIRE_TF=1 (`make test-tf` sets it in its own
    environment with TensorFlow, so CI runs these instead of skipping them)."""
    try:
        import tensorflow
    except ImportError:
        if os.environ.get("RETR_REQUIRE_TF") == "1":
            pytest.fail("tensorflow is not installed and RETR_REQUIRE_TF=1", pytrace=False)
        pytest.skip("tensorflow is not installed (make test-tf runs it)", allow_module_level=True)
    return tensorflow


def fixture_dir(method: str) -> Path:
    """../shared/fixtures/<method>; the test fails (not skips) when the shared folder is missing."""
    path = FIXTURES / method
    assert path.is_dir(), f"parity fixture {path} is missing: check out ../shared beside the repo"
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"{SHARED} is missing: tests read data from ../shared"
    return SHARED


@pytest.fixture(scope="session")
def served_index(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny index the service tests share (tests/serving.py); read-only."""
    from tests.serving import build_served

    return build_served(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A PostgreSQL server on a loopback port for the whole session (tests/postgres.py);
    skipped only when PostgreSQL's server programs are not installed (failed in CI)."""
    from tests.postgres import PostgresServer, server_binaries

    bindir = server_binaries()
    if bindir is None:
        system_package_missing("PostgreSQL", "Debian: apt-get install postgresql")
    server = PostgresServer(bindir)
    server.init()
    server.start()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """The catalog of a test index: None (SQLite inside the index directory) or the URL of a
    fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres").create_database())
