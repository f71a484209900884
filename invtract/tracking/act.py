"""Anatomically-constrained tracking (``tckgen -act``): the five-tissue-type image and its options.

The ACT rules themselves (tissue classes, seed test, ``apply_priors``, rejection reasons,
constants, SD_Stream's ACT defaults) live in :mod:`invtract.tracking.rules`; the compiled
tracking with them in :mod:`invtract.tracking.act_cpu`. This module loads and checks the 5TT
image in MRtrix3's own voxel-axis order (so that trilinear sums are added in tckgen's order),
and resolves SD_Stream's parameters under ACT (cutoff x 0.5, minimum length 2 x voxel).

Sources (MRtrix3 3.0.3): ``src/dwi/tractography/ACT/act.cpp`` (``verify_5TT_image``),
``ACT/shared.h``, ``tracking/shared.cpp`` (``set_step_and_angle``), ``algorithms/sd_stream.h``
(``set_cutoff``), ``tracking/tractography.h`` (defaults).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ShapeError
from ..io.image import load_image
from ..params import DEFAULTS, TrackingParameters, geometric_voxel_size
from .rules import ACT_MIN_LENGTH_VOXELS, TISSUES_5TT, act_default_cutoff

__all__ = ["ActImage", "load_act", "act_parameters", "act_from_header"]


@dataclass(frozen=True)
class ActImage:
    """A five-tissue-type image for ``-act``, in MRtrix3's voxel-axis order.

    Attributes:
        data: ``[X, Y, Z, 5]`` float32 partial volumes (cgm, sgm, wm, csf, path), any values
            (tckgen clamps each to [0, 1] after interpolation; NaN = no tissue data).
        scanner2voxel: ``[3, 4]`` float64, scanner mm -> voxel coordinates of ``data``.
        voxel_sizes: ``(3,)`` mm.
        crop_at_gmwmi: ``-crop_at_gmwmi``: move a cortical-GM endpoint onto the GM-WM interface.
        path: source file, if any.
    """

    data: np.ndarray
    scanner2voxel: np.ndarray
    voxel_sizes: tuple
    crop_at_gmwmi: bool = False
    path: str | None = None

    @property
    def has_sgm(self) -> bool:
        """Whether any voxel has sub-cortical grey matter (volume 1 > 0)."""
        return bool(np.any(self.data[..., 1] > 0))


def load_act(path: str | os.PathLike, crop_at_gmwmi: bool = False) -> ActImage:
    """Load and check a 5TT image (``verify_5TT_image``: 4-D with 5 volumes).

    Raises:
        ShapeError: not 4-D with exactly 5 volumes.
        FormatError: unreadable file (from the image reader).
    """
    image = load_image(path)
    data = np.asarray(image.data, np.float32)
    if data.ndim != 4 or data.shape[3] != len(TISSUES_5TT):
        raise ShapeError(
            f"{path}: a 5TT image must be 4-D with 5 volumes ({', '.join(TISSUES_5TT)}), "
            f"got shape {data.shape}"
        )
    # load_image returns MRtrix3's voxel order (realigned, any strides) and its transform
    affine = np.asarray(image.affine, np.float64)
    s2v = np.asarray(image.scanner2voxel, np.float64)[:3, :4]
    vox = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return ActImage(data, np.ascontiguousarray(s2v), vox, bool(crop_at_gmwmi), str(path))


def act_parameters(params: TrackingParameters, voxel_sizes_mm) -> TrackingParameters:
    """SD_Stream's parameters under ``-act``: the cutoff defaults to 0.5 x 0.1 and the minimum
    length to 2 x voxel (float32, as ``set_step_and_angle`` / ``set_cutoff``); explicit values
    are kept. ``voxel_sizes_mm`` are the FOD's."""
    f32 = np.float32
    changes = {}
    if params.cutoff is None:
        changes["cutoff"] = act_default_cutoff(DEFAULTS["cutoff"])
    if params.min_length_mm is None:
        vox = f32(geometric_voxel_size(voxel_sizes_mm))
        changes["min_length_mm"] = float(f32(f32(ACT_MIN_LENGTH_VOXELS) * vox))
    return dataclasses.replace(params, **changes) if changes else params


def act_from_header(header: dict, folder: str | os.PathLike) -> ActImage | None:
    """The 5TT image of a ``tckgen -act`` tractogram (its header's ``act`` and
    ``crop_at_gmwmi`` keys; the image looked up in ``folder``), or None without ACT."""
    name = header.get("act")
    if not name:
        return None
    crop = header.get("crop_at_gmwmi", "0") not in ("0", "false", "")
    return load_act(os.path.join(str(folder), os.path.basename(name)), crop_at_gmwmi=crop)
