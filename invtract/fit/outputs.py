"""What a finished fit writes besides its logs: ``fitted.tck`` with tckgen's header keys.

:func:`save_fitted_tck` is the Python API's way to write a fit's tractogram (the command
tracks with :func:`track_fitted`, scores that tracking and writes it with
:func:`write_fitted_tck`): the streamlines hard-tracked from every target seed with the selected
parameters, and the header tckgen would write for them (``step_size``, ``max_angle``,
``threshold``, ``min_dist``, ``max_dist``, ... via
:meth:`~invtract.params.ResolvedParameters.header`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..params import TrackingParameters

__all__ = ["track_fitted", "write_fitted_tck", "save_fitted_tck"]


def track_fitted(field, params: TrackingParameters, positions, directions):
    """Hard tracking (tckgen's rules) of the FOD ``field`` (an
    :class:`~invtract.fod.field.FODField` or Image; its header voxel sizes resolve the
    defaults) from ``positions [N, 3]`` (scanner mm) with initial ``directions [N, 3]``;
    returns the tracking result."""
    from ..tracking.api import Seeding, track

    seeding = Seeding(
        "list",
        positions=np.asarray(positions, np.float32),
        directions=np.asarray(directions, np.float32),
    )
    with torch.no_grad():
        return track(field, seeding, params, rng_seed=0)


def save_fitted_tck(
    path: str | os.PathLike,
    field,
    params: TrackingParameters,
    positions,
    directions,
    *,
    source: str | None = None,
):
    """Track with the fitted ``params`` (see :func:`track_fitted`) and write ``path`` (.tck)
    with tckgen's header keys for those parameters (``source``: the FOD file, optional).

    Returns:
        The tracking result (its ``streamlines`` are what was written).
    """
    res = track_fitted(field, params, positions, directions)
    write_fitted_tck(path, res, source=source)
    return res


def write_fitted_tck(path: str | os.PathLike, res, *, source: str | None = None) -> None:
    """Write ``path`` (.tck): the streamlines of the hard tracking ``res`` (:func:`track_fitted`)
    with tckgen's header keys for its parameters (``source``: the FOD file, optional)."""
    from ..io.tractogram import save_tractogram

    header = dict(getattr(res, "header", {}) or {})
    header.update(res.params.header())
    if source:
        header["source"] = str(source)
    save_tractogram(path, res.streamlines, header=header, overwrite=True)
