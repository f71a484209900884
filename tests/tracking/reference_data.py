"""Helpers for tests that read tckgen references in ``../shared/data`` (skip when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def need_data(*parts: str) -> Path:
    """``DATA / parts``; skips the calling test when it does not exist."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def load_reference(case: str, name: str):
    """``(header, streamlines [float32 arrays], seeds table [track, seed vertex])``."""
    nib = pytest.importorskip("nibabel")
    tck = nib.streamlines.load(str(need_data(case, f"{name}.tck")))
    table = np.loadtxt(
        need_data(case, f"{name}_seeds.txt"), delimiter=",", comments="#", usecols=(0, 1)
    ).astype(int)
    return tck.header, [np.asarray(s, dtype=np.float32) for s in tck.streamlines], table


def split(res):
    """An EngineResult's packed points as one array per seed."""
    offsets = np.concatenate([[0], np.cumsum(res.lengths)])
    return [res.points[offsets[i] : offsets[i + 1]] for i in range(len(res.lengths))]
