"""Shared fixtures: the reference data folder (../shared/data) and dtype tolerances."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: rtol/atol per dtype (kornia's _DTYPE_PRECISIONS)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-5, 1e-8)}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when absent (e.g. a user's clone)."""
    if not (SHARED_DATA / "manifest.json").exists():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA
