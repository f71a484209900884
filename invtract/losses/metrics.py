"""Evaluation metrics between two tractograms (no gradients): the names ``invtract.losses`` has
always exported, now computed by DIPY / scipy in :mod:`invtract.evaluation.metrics`.

The differentiable losses stay in this package (:mod:`.distances`, :mod:`.density`,
:mod:`.lengths`); the hard metrics people report are library calls. Inputs may be
:class:`~invtract.streamlines.Streamlines`, resampled ``[S, n, 3]`` arrays/tensors or lists of
``[L, 3]`` arrays (scanner mm); outputs are numpy arrays or floats.
"""

from __future__ import annotations

import numpy as np

from ..arrays import to_numpy
from ..evaluation.compare import compare_tractograms
from ..evaluation.metrics import (
    EmptyTractogramError,
    SpaceError,
    as_lines,
    bounding_grid,
    connectome_correlation,
    dice,
    hausdorff_distances,
    mam_minima,
    mdf_minima,
    overlap_overreach,
    weighted_dice,
)
from ..evaluation.metrics import (
    bundle_adjacency as _bundle_adjacency,
)
from ..evaluation.metrics import (
    paired_hausdorff as _paired_hausdorff,
)

__all__ = [
    "EmptyTractogramError",
    "SpaceError",
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
]


def _lines(x) -> list[np.ndarray]:
    """Streamlines / packed / list -> list of float64 arrays; ``[S, n, 3]`` -> its rows."""
    if hasattr(x, "points") or isinstance(x, list):
        return as_lines(x)
    arr = np.asarray(to_numpy(x), np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        return as_lines(x)
    return list(arr)


def paired_hausdorff(a, b) -> np.ndarray:
    """Symmetric Hausdorff distance of streamline i of ``a`` and i of ``b`` on their raw
    vertices; ``[S]`` float64 mm (see :func:`invtract.evaluation.metrics.paired_hausdorff`)."""
    return _paired_hausdorff(_lines(a), _lines(b))


def mam_distances(a, b, *, metric: str = "avg") -> np.ndarray:
    """All-pairs MAM distances on the vertices given: ``dipy.tracking.distances.
    bundles_distances_mam``; ``[Sa, Sb]`` float64 mm."""
    from dipy.tracking.distances import bundles_distances_mam

    return np.asarray(bundles_distances_mam(_lines(a), _lines(b), metric=metric), np.float64)


def bundle_minima(ra, rb, *, point_metrics: bool = False) -> dict[str, np.ndarray]:
    """Each streamline's nearest MDF (and, with ``point_metrics``, MAM and Hausdorff) distance
    to the other set, both ways, on the given (resampled) points; mm.

    Returns:
        ``{"mdf_ab": [Sa], "mdf_ba": [Sb]}`` plus ``mam_ab/ba`` and ``hausdorff_ab/ba``.
    """
    la, lb = _lines(ra), _lines(rb)
    ab, ba = mdf_minima(la, lb)
    out = {"mdf_ab": ab, "mdf_ba": ba}
    if point_metrics:
        h = hausdorff_distances(la, lb)
        out.update(mam_ab=mam_minima(la, lb), mam_ba=mam_minima(lb, la))
        out.update(hausdorff_ab=h.min(1), hausdorff_ba=h.min(0))
    return out


def bundle_adjacency(a, b, threshold_mm: float = 5.0, n_points: int = 20) -> float:
    """Bundle adjacency (``dipy.segment.bundles.bundle_adjacency``) of two sets, resampled to
    ``n_points`` unless given as ``[S, n, 3]`` arrays already."""
    resampled = not (hasattr(a, "points") or isinstance(a, list))
    return _bundle_adjacency(_lines(a), _lines(b), threshold_mm, None if resampled else n_points)
