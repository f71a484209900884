"""Bundled example data: a small phantom FOD, its masks and a tckgen target bundle.

``example_path(name)`` returns the path of a bundled file (see ``README.md`` beside this file).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["example_path", "EXAMPLE_FILES"]

EXAMPLE_FILES = {
    "fod": "phantom_fod.nii.gz",
    "mask": "phantom_mask.nii.gz",
    "roi": "phantom_roi.nii.gz",
    "target": "phantom_target.tck",
    "target_seeds": "phantom_target_seeds.txt",
}


def example_path(name: str) -> Path:
    """Path of a bundled example file: one of ``EXAMPLE_FILES`` (``fod``, ``mask``, ...)."""
    if name not in EXAMPLE_FILES:
        raise KeyError(f"unknown example file {name!r}; valid: {', '.join(EXAMPLE_FILES)}")
    return Path(str(resources.files(__package__).joinpath(EXAMPLE_FILES[name])))
