"""Shared fixtures for the io tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"
TEST_DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` relative to the repository root (skip if absent)."""
    if not (SHARED_DATA / "manifest.json").is_file():
        pytest.skip(f"shared reference data not found at {SHARED_DATA}")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The small fixture files in ``tests/data``."""
    return TEST_DATA


@pytest.fixture(scope="session")
def mrtrix():
    """Run an MRtrix3 command (skip the test if MRtrix3 is not installed)."""
    if any(shutil.which(c) is None for c in ("mrconvert", "mrinfo", "tckinfo")):
        pytest.skip("MRtrix3 (mrconvert, mrinfo, tckinfo) not on PATH")

    def run(*args: str) -> str:
        proc = subprocess.run(
            [str(a) for a in args] + ["-quiet"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{proc.stderr}")
        return proc.stdout

    return run
