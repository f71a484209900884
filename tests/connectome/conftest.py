"""Fixtures for the connectome tests (data helpers live in ``connectome_data.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the helpers module beside this file (pytest runs with --import-mode=importlib)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from connectome_data import FIXTURES, PARCELLATION_SPECS, SHARED, make_parcellation_nifti


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; skips the test when the shared data are not present."""
    if not (SHARED / "phantom_cross90" / "whole.tck").is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def parcellations(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Case name -> path of its freshly built parcellation NIfTI (session-scoped)."""
    out = tmp_path_factory.mktemp("parcellations")
    return {c: make_parcellation_nifti(c, out / f"{c}_parc.nii.gz") for c in PARCELLATION_SPECS}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/data/connectome`` (committed parcellations and tck2connectome outputs)."""
    return FIXTURES
