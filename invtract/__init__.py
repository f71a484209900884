"""invtract: optimisation-based inverse tractography with a differentiable SD_Stream.

The front door::

    import invtract as it
    fod = it.load_fod("fod.nii.gz", sh_basis="descoteaux07_legacy")  # -> MRtrix3 basis
    sft = it.track(fod, seed_image="mask.nii.gz", select=1000, rng_seed=1)
    # sft: a DIPY StatefulTractogram, RAS+ mm; sft.data_per_streamline["seed_point"]

``it.from_sft(sft)`` turns a StatefulTractogram into :class:`Streamlines`;
``it.fit_target(sft)`` gives a fit target and its paired seeds (``seed_index`` per streamline).
"""

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
    "load_fod",
    "track",
    "from_sft",
    "fit_target",
    "SH_BASES",
]

#: public name -> "module:attribute", imported on first use (``import invtract`` stays light)
_LAZY = {
    "Streamlines": "invtract.streamlines:Streamlines",
    "load_fod": "invtract.io.image:load_fod",
    "track": "invtract.tracking.api:track_tractogram",
    "from_sft": "invtract.tracking.api:from_sft",
    "fit_target": "invtract.tracking.api:fit_target",
    "SH_BASES": "invtract.io.sh_basis:SH_BASES",
}


def __getattr__(name: str):
    # Streamlines and track import torch (about a second), which the compiled
    # ``invtract track`` path never needs.
    if name in _LAZY:
        import importlib

        module, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'invtract' has no attribute {name!r}")
