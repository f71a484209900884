"""The tracking front door: seeding with tckgen's semantics, chunked engine runs, a summary.

``track(fod, seeding, params, ...)`` reproduces ``tckgen -algorithm SD_Stream`` (single-threaded,
``MRTRIX_RNG_SEED=rng_seed``) for the seeding mechanisms of :class:`Seeding`, on an
:class:`~invtract.fod.field.FODField`, and returns :class:`~invtract.streamlines.Streamlines`.
The seeding and selection rules themselves are in :mod:`invtract.tracking.runner` (torch-free).
Positions are scanner mm (RAS+).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from ..fod.field import FODField, as_fod_field
from ..params import ResolvedParameters, TrackingParameters
from ..streamlines import Streamlines
from .engines import run_engine
from .runner import SeedChecker, Seeding, default_engine, run_seeding, seed_vertices
from .types import RoiSet

__all__ = [
    "Seeding",
    "TrackingResult",
    "track",
    "SeedChecker",
    "track_tractogram",
    "from_sft",
    "fit_target",
]


@dataclass
class TrackingResult:
    """Output of :func:`track`.

    Attributes:
        streamlines: accepted streamlines (scanner mm), in seed order.
        seed_index: ``[S]`` index of the seed vertex in each streamline.
        seed_ids: ``[S]`` index of the seed (in generation order) each streamline came from.
        params: resolved parameters used.
        summary: counts in MRtrix's categories (see :func:`summarise`).
        engine: the engine name used.
    """

    streamlines: Streamlines
    seed_index: np.ndarray
    seed_ids: np.ndarray
    params: ResolvedParameters
    summary: dict
    engine: str
    header: dict = field(default_factory=dict)

    @property
    def seed_points(self) -> np.ndarray:
        """``[S, 3]`` the seed vertex of each streamline (scanner mm)."""
        points = self.streamlines.points.detach().cpu().numpy()
        return seed_vertices(points, self.streamlines.lengths.cpu().numpy(), self.seed_index)


def track(
    fod: FODField,
    seeding: Seeding,
    params: TrackingParameters | ResolvedParameters,
    *,
    rois: RoiSet | None = None,
    engine: str = "auto",
    select: int | None = None,
    max_seeds: int | None = None,
    rng_seed: int | None = None,
    batch_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    act=None,
) -> TrackingResult:
    """Track streamlines as ``tckgen -algorithm SD_Stream -nthreads 0`` does.

    Args:
        fod: the FOD (scanner-frame SH, MRtrix3 basis): an
            :class:`~invtract.fod.field.FODField`, or an :class:`~invtract.io.image.Image`
            (tracked as :meth:`~invtract.fod.field.FODField.from_image`).
        seeding: the seed mechanism.
        params: tracking parameters; unresolved defaults are resolved with the FOD's header
            voxel sizes (:attr:`~invtract.fod.field.FODField.header_voxel_sizes`), as tckgen
            resolves them.
        rois: include / exclude / mask regions.
        engine: ``"auto"`` (fastest for the device), ``"torch"`` or ``"numba"``.
        select: stop once this many streamlines are accepted (infinite seeders; tckgen default
            5000). Ignored for finite seeders, which track every seed.
        max_seeds: stop after this many seeds (tckgen ``-seeds``; default 1000 x select).
        rng_seed: seed of the MRtrix-compatible random stream (``MRTRIX_RNG_SEED``); random
            when None.
        batch_size: seeds per engine call.
        progress: called as ``progress(seeds_done, selected)``.
        act: anatomically-constrained tracking (``-act``): an
            :class:`~invtract.tracking.act.ActImage`. Unresolved ``params`` then get ACT's
            defaults (cutoff x 0.5, minimum length 2 x voxel); tracked by the numba engine
            (or the torch / triton engine when asked for; torch without numba).

    Returns:
        A :class:`TrackingResult`.
    """
    fod = as_fod_field(fod)
    voxel_sizes = fod.header_voxel_sizes
    if act is not None:
        engine = _act_engine(engine)
        if isinstance(params, TrackingParameters):
            from .act import act_parameters

            params = act_parameters(params, voxel_sizes)
    if isinstance(params, TrackingParameters):
        params = params.resolve(voxel_sizes)
    rois = rois or RoiSet()
    if engine == "auto":
        engine = default_engine(fod.device)
    sh = fod.sh_flat.detach().cpu().numpy().reshape(*fod.shape, -1)
    s2v = fod.scanner2voxel.cpu().numpy()
    extra, seed_check = {}, None
    if act is not None:
        from .runner import numba_available

        if numba_available():
            from .act_cpu import act_seed_checker

            seed_check = act_seed_checker(sh, s2v, rois, act)
        else:
            from .act_torch import act_seed_checker_torch

            seed_check = act_seed_checker_torch(fod, rois, act)
        extra = {"act": act}
    out = run_seeding(
        sh,
        s2v,
        seeding,
        params,
        lambda pos, dirs: run_engine(engine, fod, pos, dirs, params, rois, **extra),
        seed_check=seed_check,
        rois=rois,
        select=select,
        max_seeds=max_seeds,
        rng_seed=rng_seed,
        batch_size=batch_size,
        progress=progress,
    )
    sl = Streamlines(torch.from_numpy(out.points), torch.from_numpy(out.lengths))
    return TrackingResult(
        streamlines=sl,
        seed_index=out.seed_index,
        seed_ids=out.seed_ids,
        params=params,
        summary=out.summary,
        engine=engine,
    )


# ------------------------------------------------------------------------------------------
# the public front door: invtract.track(fod, seeds=...) -> StatefulTractogram
# ------------------------------------------------------------------------------------------
def _as_image(x, what: str):
    """An :class:`~invtract.io.image.Image` from a path, an Image, a nibabel image or
    ``(array, affine)``."""
    from ..io.image import Image, load_mask

    if isinstance(x, Image):
        return x
    if isinstance(x, (str, os.PathLike)):
        return load_mask(x)
    if isinstance(x, tuple) and len(x) == 2:
        data, affine = np.asarray(x[0]), np.asarray(x[1], np.float64)
        return Image(data, affine, tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    if hasattr(x, "affine") and hasattr(x, "dataobj"):
        return Image(
            np.asarray(x.dataobj), np.asarray(x.affine, np.float64), x.header.get_zooms()[:3]
        )
    raise ConfigError(f"{what}: expected a path, an Image, a nibabel image or (array, affine)")


def _as_roi(x, what: str):
    """A region from an image-like (see :func:`_as_image`) or a sphere ``(x, y, z, r)`` mm."""
    from .types import SphereRoi

    if isinstance(x, str) and x.count(",") == 3 and not os.path.exists(x):
        x = tuple(float(v) for v in x.split(","))
    if isinstance(x, (tuple, list)) and len(x) == 4 and np.isscalar(x[0]):
        return SphereRoi(tuple(float(v) for v in x[:3]), float(x[3]), ",".join(map(str, x)))
    from .rois import image_roi  # tckgen's Mask: cropped, MRtrix's exact inverse

    img = _as_image(x, what)
    return image_roi(img, str(img.path or what))


def _rois(value, what: str) -> tuple:
    if value is None:
        return ()
    many = isinstance(value, list) or (
        isinstance(value, tuple)
        and not (len(value) == 4 and np.isscalar(value[0]))
        and not (len(value) == 2 and hasattr(value[0], "shape"))
    )
    return tuple(_as_roi(v, what) for v in (value if many else [value]))


def _seeding(seeds, seed_image, seed_grid_per_voxel, seed_random_per_voxel, seed_sphere):
    given = [k for k, v in dict(
        seeds=seeds, seed_image=seed_image, seed_grid_per_voxel=seed_grid_per_voxel,
        seed_random_per_voxel=seed_random_per_voxel, seed_sphere=seed_sphere,
    ).items() if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ConfigError(f"give exactly one seeding argument; got {given or 'none'}")
    if seeds is not None:
        if isinstance(seeds, (str, os.PathLike)):
            from ..io.seeds import load_seeds

            table = load_seeds(seeds)
            return Seeding("list", positions=table.positions, directions=table.directions)
        arr = np.asarray(seeds, np.float32)
        if arr.ndim != 2 or arr.shape[1] not in (3, 6):
            raise ConfigError(f"seeds must be [N, 3] or [N, 6] (mm), got shape {arr.shape}")
        dirs = arr[:, 3:] if arr.shape[1] == 6 else None
        return Seeding("list", positions=arr[:, :3], directions=dirs)
    if seed_sphere is not None:
        return Seeding("sphere", sphere=tuple(float(v) for v in seed_sphere))
    if seed_image is not None:
        mask, kind, count = seed_image, "image", 1
    else:
        kind = "grid" if seed_grid_per_voxel is not None else "random_per_voxel"
        mask, count = seed_grid_per_voxel if kind == "grid" else seed_random_per_voxel
    return Seeding.from_mask(kind, _as_image(mask, kind), int(count))  # the mask's MRtrix geometry


def _fod_image(fod, sh_basis: str):
    from ..io.image import Image, load_fod
    from ..io.sh_basis import to_mrtrix_basis

    if isinstance(fod, (str, os.PathLike)):
        return load_fod(fod, sh_basis=sh_basis)
    if isinstance(fod, FODField):  # its coefficients (a view when float32 on the CPU)
        sh = fod.sh.detach().to("cpu", torch.float32).numpy()
        fod = Image(sh, fod.voxel2scanner, fod.header_voxel_sizes)
    img = _as_image(fod, "fod") if not isinstance(fod, Image) else fod
    if sh_basis not in ("mrtrix", "tournier07"):
        img = Image(to_mrtrix_basis(np.asarray(img.data, np.float32), sh_basis), img.affine,
                    img.voxel_sizes, img.path)  # fmt: skip
    return img


def track_tractogram(
    fod,
    *,
    seeds=None,
    seed_image=None,
    seed_grid_per_voxel=None,
    seed_random_per_voxel=None,
    seed_sphere=None,
    select: int | None = None,
    max_seeds: int | None = None,
    mask=None,
    include=None,
    exclude=None,
    step: float | None = None,
    angle: float | None = None,
    cutoff: float | None = None,
    minlength: float | None = None,
    maxlength: float | None = None,
    rk4: bool = False,
    downsample: int = 1,
    seed_direction=None,
    unidirectional: bool = False,
    stop: bool = False,
    sh_basis: str = "mrtrix",
    rng_seed: int | None = None,
    engine: str = "auto",
    return_summary: bool = False,
):
    """Track SD_Stream streamlines as ``tckgen -algorithm SD_Stream -nthreads 0`` does and
    return them as a DIPY ``StatefulTractogram`` (``invtract.track``).

    Args:
        fod: FOD image: a path (``.nii[.gz]``, ``.mif``), ``invtract.load_fod``'s result, an
            :class:`~invtract.fod.field.FODField`, a nibabel image or ``(sh [X, Y, Z, K],
            affine [4, 4])``; its header voxel sizes resolve tckgen's defaults.
        seeds / seed_image / seed_grid_per_voxel / seed_random_per_voxel / seed_sphere:
            exactly one: ``[N, 3]`` (or ``[N, 6]`` with directions) seed points in scanner
            mm or a seed file (tckgen ``-output_seeds``, CSV, text); a mask (path, image, or
            ``(array, affine)``) with ``select``; ``(mask, G)``; ``(mask, K)``;
            ``(x, y, z, r)`` mm.
        select, max_seeds: tckgen's ``-select`` (default 5000) and ``-seeds`` (infinite
            seeders only).
        mask, include, exclude: a region or a list of regions: image-likes as above, or
            spheres ``(x, y, z, r)`` mm.
        step, angle, cutoff, minlength, maxlength, rk4, downsample, seed_direction,
            unidirectional, stop: tckgen's options (mm, degrees; None = tckgen's default).
        sh_basis: the FOD's SH basis (DIPY / scilpy names, see
            :data:`~invtract.io.sh_basis.SH_BASES`; DIPY's fits write
            ``descoteaux07_legacy``); a warning is emitted when the FOD looks like another.
        rng_seed: replays ``MRTRIX_RNG_SEED=rng_seed`` (random when None).
        engine: ``"auto"``, ``"numba"`` or ``"torch"`` (CPU).
        return_summary: also return the run's counts in MRtrix's categories.

    Returns:
        A ``dipy.io.stateful_tractogram.StatefulTractogram`` in RAS+ mm (``Space.RASMM``),
        referenced to the FOD's grid, with ``data_per_streamline`` ``seed_point`` ``[S, 3]``
        (mm) and ``seed_index`` ``[S, 1]``; with ``return_summary``, ``(sft, summary)``.
    """
    from dipy.io.stateful_tractogram import Space, StatefulTractogram

    from ..io.sh_basis import warn_if_other_basis
    from ..io.tractogram_meta import per_streamline_seeds

    img = _fod_image(fod, sh_basis)
    warn_if_other_basis(img.data, sh_basis, source=str(img.path or "the FOD"))
    seeding = _seeding(seeds, seed_image, seed_grid_per_voxel, seed_random_per_voxel,
                       seed_sphere)  # fmt: skip
    params = TrackingParameters(
        step_mm=step, angle_deg=angle, cutoff=cutoff, min_length_mm=minlength,
        max_length_mm=maxlength, rk4=rk4, downsample=downsample, unidirectional=unidirectional,
        stop=stop, seed_direction=None if seed_direction is None else tuple(seed_direction),
    ).resolve(img.voxel_sizes)  # fmt: skip
    rois = RoiSet(include=_rois(include, "include"), exclude=_rois(exclude, "exclude"),
                  mask=_rois(mask, "mask"))  # fmt: skip
    sh = img.data  # float32, voxel-major (or mapped): tracked in place, not copied
    s2v = img.scanner2voxel  # MRtrix's own inverse (Eigen's), as invtract track uses
    engine = default_engine("cpu") if engine == "auto" else engine
    if engine == "numba":
        from .fused_cpu import track_fused_cpu

        def run(pos, dirs):
            return track_fused_cpu(sh, s2v, pos, dirs, params, rois)
    else:
        field = FODField.from_image(img)

        def run(pos, dirs):
            return run_engine(engine, field, pos, dirs, params, rois)

    out = run_seeding(sh, s2v, seeding, params, run, rois=rois, select=select,
                      max_seeds=max_seeds, rng_seed=rng_seed)  # fmt: skip
    lines = np.split(out.points, np.cumsum(out.lengths)[:-1]) if out.lengths.size else []
    sft = StatefulTractogram(
        lines, _nifti_reference(img), Space.RASMM,
        data_per_streamline=per_streamline_seeds(out.seed_points, out.seed_index),
    )  # fmt: skip
    return (sft, out.summary) if return_summary else sft


def _nifti_reference(img):
    """A NIfTI header with the image's grid (DIPY's reference for a tractogram)."""
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape(tuple(int(s) for s in img.data.shape[:3]))
    h.set_zooms(tuple(float(z) for z in img.voxel_sizes))
    h.set_sform(np.asarray(img.affine, np.float64), code=1)
    h.set_qform(np.asarray(img.affine, np.float64), code=1)
    return h


def from_sft(sft) -> Streamlines:
    """:class:`~invtract.streamlines.Streamlines` (RAS+ mm, float32) from a DIPY
    ``StatefulTractogram`` in any space (e.g. a fit target)."""
    from dipy.io.stateful_tractogram import Origin, Space

    sft = sft.__class__.from_sft(sft.streamlines, sft)  # a copy: to_space moves in place
    sft.to_space(Space.RASMM)
    sft.to_origin(Origin.NIFTI)  # voxel centres at integers, as MRtrix and .tck
    return Streamlines.from_list([np.asarray(s, np.float32) for s in sft.streamlines])


def fit_target(target, *, unidirectional: bool = False):
    """A fit target with the seeds that pair each streamline with its re-tracked one.

    Args:
        target: a DIPY ``StatefulTractogram`` (any space / origin; e.g. ``it.track``'s
            result), a tractogram file (``.tck`` / ``.trk`` / ``.trx``) or
            :class:`~invtract.streamlines.Streamlines` (scanner mm).
        unidirectional: the target was tracked in one direction only.

    Returns:
        ``(streamlines, positions [S, 3] float32 mm, directions [S, 3] float32 unit)``: when
        the target carries a ``seed_index`` per streamline (``it.track``, and ``.trk`` /
        ``.trx`` written by ``invtract track``) the seed is that vertex and the direction the
        first tracking step (:func:`~invtract.io.seeds.seeds_at_vertices`, as with a tckgen
        seeds file); otherwise each streamline's midpoint (``midpoint_seeds``).
    """
    from ..io.seeds import midpoint_seeds, seeds_at_vertices

    sl, seed_index = _target_streamlines(target)
    if len(sl) == 0:
        raise ConfigError("the fit target has no streamlines")
    if seed_index is None:
        pos, dirs = midpoint_seeds(sl)
        return sl, pos, dirs
    idx = np.asarray(seed_index).reshape(-1).astype(np.int64)
    if idx.shape[0] != len(sl):
        raise ShapeError(f"seed_index has {idx.shape[0]} values for {len(sl)} streamlines")
    pos, dirs = seeds_at_vertices(sl, np.arange(len(sl)), idx, unidirectional,
                                  names=("the fit target", "its seed_index"))  # fmt: skip
    return sl, pos, dirs


def _target_streamlines(target):
    """``(Streamlines, seed_index [S] or None)`` of any fit target."""
    if isinstance(target, Streamlines):
        return target, None
    if hasattr(target, "streamlines") and hasattr(target, "space"):  # StatefulTractogram
        return from_sft(target), target.data_per_streamline.get("seed_index")
    from ..io.tractogram import load_tractogram

    path = str(target)
    seed_index = None
    if path.lower().endswith((".trk", ".trx")):
        from ..io.tractogram_meta import read_tracking_metadata

        seed_index = read_tracking_metadata(path)[1].get("seed_index")
    return load_tractogram(path), seed_index


def _act_engine(engine: str) -> str:
    """The engine that tracks with ACT: numba (bit-exact) unless ``"torch"`` or ``"triton"``
    is asked for (the triton engine falls back by itself where it cannot run), or numba is
    absent (torch)."""
    from .runner import numba_available

    if engine == "triton":
        return "triton"
    if engine == "torch" or not numba_available():
        return "torch"
    return "numba"
