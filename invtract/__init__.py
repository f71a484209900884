"""invtract: optimisation-based inverse tractography with a differentiable SD_Stream."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, FitDiverged, FormatError, InvtractError, ShapeError
from .params import ResolvedParameters, TrackingParameters
from .streamlines import Streamlines

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
