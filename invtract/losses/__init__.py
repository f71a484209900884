"""Tractogram losses (differentiable, for fitting) and evaluation metrics (for people).

Losses take :class:`~invtract.streamlines.Streamlines` in scanner mm and return tensors with
gradients; metrics return plain numbers. Each metric is defined once and shared by both.
"""

from __future__ import annotations

from .density import (
    density_correlation,
    density_map,
    soft_dice,
    soft_occupancy,
    track_density,
    world_to_voxel,
)
from .distances import chamfer_loss, mdf, min_mdf, paired_coverage, paired_loss, paired_mdf
from .lengths import arc_lengths, length_loss, wasserstein_1d
from .metrics import (
    EmptyTractogramError,
    SpaceError,
    bounding_grid,
    bundle_adjacency,
    bundle_minima,
    compare_tractograms,
    connectome_correlation,
    dice,
    mam_distances,
    overlap_overreach,
    paired_hausdorff,
    weighted_dice,
)
from .resample import resample, resample_padded

__all__ = [
    "resample",
    "resample_padded",
    "arc_lengths",
    "mdf",
    "min_mdf",
    "chamfer_loss",
    "paired_mdf",
    "paired_coverage",
    "paired_loss",
    "track_density",
    "density_map",
    "world_to_voxel",
    "density_correlation",
    "soft_occupancy",
    "soft_dice",
    "wasserstein_1d",
    "length_loss",
    "paired_hausdorff",
    "mam_distances",
    "bundle_minima",
    "bundle_adjacency",
    "dice",
    "weighted_dice",
    "overlap_overreach",
    "connectome_correlation",
    "bounding_grid",
    "compare_tractograms",
    "EmptyTractogramError",
    "SpaceError",
]

try:  # the soft connectome is another module, possibly absent
    from .connectome import connectome_matrix  # noqa: F401
except ImportError:
    pass
else:
    __all__.append("connectome_matrix")
