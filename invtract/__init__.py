"""invtract: optimisation-based inverse tractography with a differentiable SD_Stream."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, FitDiverged, FormatError, InvtractError, ShapeError
from .params import ResolvedParameters, TrackingParameters

__all__ = [
    "__version__",
    "Streamlines",
    "TrackingParameters",
    "ResolvedParameters",
    "InvtractError",
    "FormatError",
    "ConfigError",
    "ShapeError",
    "FitDiverged",
]


def __getattr__(name: str):
    # Streamlines holds torch tensors; importing torch takes about a second, which the
    # compiled ``invtract track`` path never needs.
    if name == "Streamlines":
        from .streamlines import Streamlines

        return Streamlines
    raise AttributeError(f"module 'invtract' has no attribute {name!r}")
