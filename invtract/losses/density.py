"""Track-density maps: a hard one (as dipy) and a soft, differentiable splat; density losses.

Voxel convention: ``affine`` maps voxel indices to scanner mm (RAS+) and an integer index is
the voxel *centre* (nibabel/MRtrix), so a point belongs to voxel ``round(inv(affine) @ p)``.

* :func:`density_map`: number of distinct streamlines visiting each voxel (a streamline counts
  once per voxel however many of its vertices fall there), exactly
  ``dipy.tracking.utils.density_map``.
* :func:`track_density`: every vertex is splatted onto the 8 surrounding voxel centres, with
  trilinear weights or, given a temperature, with sharpened weights that tend to the nearest
  voxel as the temperature goes to 0. Vertices can be weighted by per-streamline or per-vertex
  soft survival weights, and by their share of arc length (``per_point="length"``) so that the
  map does not depend on the step size.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from ..streamlines import Streamlines
from .resample import safe_norm

__all__ = [
    "world_to_voxel",
    "density_map",
    "track_density",
    "density_correlation",
    "soft_occupancy",
    "soft_dice",
]

_CORNERS = torch.tensor(
    [[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int64
)  # [8, 3]


def _check_grid(shape, affine) -> tuple[tuple[int, int, int], np.ndarray]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or min(shape[:3]) < 1:
        raise ShapeError(f"shape must give 3 positive sizes, got {shape}")
    aff = np.asarray(affine.detach().cpu() if torch.is_tensor(affine) else affine, np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff)) < 1e-12:
        raise ShapeError(f"affine must be an invertible [4, 4] matrix, got shape {aff.shape}")
    return shape[:3], aff


def world_to_voxel(points: torch.Tensor, affine) -> torch.Tensor:
    """Scanner mm -> continuous voxel coordinates (integers = voxel centres).

    Args:
        points: ``[N, 3]`` scanner mm.
        affine: ``[4, 4]`` voxel -> scanner mm (array or tensor).

    Returns:
        ``[N, 3]`` voxel coordinates, dtype of ``points``.

    Shape:
        ``(N, 3)`` -> ``(N, 3)``.

    Gradients:
        Differentiable w.r.t. ``points`` (the affine is a constant).
    """
    _, aff = _check_grid((1, 1, 1), affine)
    inv = torch.as_tensor(np.linalg.inv(aff), dtype=points.dtype, device=points.device)
    return points @ inv[:3, :3].T + inv[:3, 3]


def density_map(
    streamlines: Streamlines, shape, affine, *, outside: str = "error"
) -> torch.Tensor:
    """Hard track-density map: distinct streamlines per voxel.

    Matches ``dipy.tracking.utils.density_map(streamlines, affine, shape)``; like it, a
    streamline is only counted in the voxels that contain one of its vertices.

    Args:
        streamlines: ``S`` streamlines (mm).
        shape: grid size ``(X, Y, Z)``.
        affine: ``[4, 4]`` voxel -> scanner mm.
        outside: what to do with vertices outside the grid: ``"error"`` (as dipy) or ``"drop"``.

    Returns:
        ``[X, Y, Z]`` int64 counts, on the device of the streamlines.

    Shape:
        ``(P, 3)`` points -> ``(X, Y, Z)``.

    Gradients:
        None (integer output).

    Raises:
        ShapeError: a vertex lies outside the grid and ``outside == "error"``.
    """
    shape, aff = _check_grid(shape, affine)
    if outside not in ("error", "drop"):
        raise ConfigError(f"outside must be 'error' or 'drop', got {outside!r}")
    dev = streamlines.device
    out = torch.zeros(shape, dtype=torch.int64, device=dev)
    if len(streamlines) == 0:
        return out
    with torch.no_grad():
        vox = world_to_voxel(streamlines.points.detach().to(torch.float64), aff)
        ijk = torch.floor(vox + 0.5).to(torch.int64)
        dims = torch.tensor(shape, device=dev)
        inside = ((ijk >= 0) & (ijk < dims)).all(1)
        n_out = int((~inside).sum())
        if n_out and outside == "error":
            raise ShapeError(f"{n_out} streamline vertices lie outside the {shape} voxel grid")
        sid = torch.repeat_interleave(
            torch.arange(len(streamlines), device=dev), streamlines.lengths
        )
        lin = (ijk[:, 0] * shape[1] + ijk[:, 1]) * shape[2] + ijk[:, 2]
        n_vox = shape[0] * shape[1] * shape[2]
        key = torch.unique(sid[inside] * n_vox + lin[inside])
        out.view(-1).index_add_(0, key % n_vox, torch.ones_like(key))
    return out


def _corner_weights(vox: torch.Tensor, shape, temperature: float | None):
    """Flat voxel indices ``[N, 8]`` and weights ``[N, 8]`` of the 8 corners around ``vox``.

    Corner order: ``(di, dj, dk)`` in ``{0, 1}^3`` with ``dk`` fastest. Weights factorise over
    the axes for both kernels (the sharpened one is a product of per-axis softmaxes), so they
    are built from ``[N, 3, 2]`` per-axis factors.
    """
    base = torch.floor(vox.detach())
    frac = vox - base  # [N, 3], differentiable
    if temperature is None:
        f = torch.stack([1.0 - frac, frac], -1)  # [N, 3, 2]
    else:
        # softmax over corners of -|x - c|^2 / T factorises: prod_axis softmax_d(-(x_a - d)^2/T)
        f = torch.softmax(torch.stack([-(frac**2), -((1.0 - frac) ** 2)], -1) / temperature, -1)
    n = vox.shape[0]
    w = (f[:, 0, :, None, None] * f[:, 1, None, :, None] * f[:, 2, None, None, :]).reshape(n, 8)
    b = base.to(torch.int64)
    dims = torch.tensor(shape, device=vox.device)
    ax = b[:, :, None] + torch.arange(2, device=vox.device)  # [N, 3, 2]
    ok = (ax >= 0) & (ax < dims[:, None])  # [N, 3, 2]
    inside = ok[:, 0, :, None, None] & ok[:, 1, None, :, None] & ok[:, 2, None, None, :]
    inside = inside.reshape(n, 8)
    stride = torch.tensor([shape[1] * shape[2], shape[2], 1], device=vox.device)
    lin = (b * stride).sum(-1, keepdim=True) + (_CORNERS.to(vox.device) * stride).sum(-1)
    lin = torch.where(inside, lin, 0)
    return lin, torch.where(inside, w, 0.0 * w)


class _Splat(torch.autograd.Function):
    """Chunked splatting whose backward recomputes each chunk (memory ``O(chunk)``)."""

    @staticmethod
    def forward(ctx, vox, weights, shape, temperature, chunk):
        n_vox = shape[0] * shape[1] * shape[2]
        out = vox.new_zeros(n_vox)
        with torch.no_grad():
            for s in range(0, vox.shape[0], chunk):
                lin, w = _corner_weights(vox[s : s + chunk], shape, temperature)
                out.index_add_(0, lin.reshape(-1), (w * weights[s : s + chunk, None]).reshape(-1))
        ctx.save_for_backward(vox, weights)
        ctx.shape, ctx.temperature, ctx.chunk = shape, temperature, chunk
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, grad_out):
        vox, weights = ctx.saved_tensors
        need_v, need_w = ctx.needs_input_grad[:2]
        g = grad_out.reshape(-1)
        gv = torch.zeros_like(vox) if need_v else None
        gw = torch.zeros_like(weights) if need_w else None
        for s in range(0, vox.shape[0], ctx.chunk):
            v = vox[s : s + ctx.chunk].detach().requires_grad_(need_v)
            with torch.enable_grad():
                lin, w = _corner_weights(v, ctx.shape, ctx.temperature)
            gl = g[lin]  # [c, 8]
            if need_w:
                gw[s : s + ctx.chunk] = (gl * w.detach()).sum(-1)
            if need_v:
                go = gl * weights[s : s + ctx.chunk, None]
                (gv[s : s + ctx.chunk],) = torch.autograd.grad(w, v, grad_outputs=go)
        return gv, gw, None, None, None


def _point_weights(
    streamlines: Streamlines,
    weights: torch.Tensor | None,
    point_weights: torch.Tensor | None,
    per_point: str,
) -> torch.Tensor:
    pts = streamlines.points
    S, P = len(streamlines), pts.shape[0]
    w = pts.new_ones(P)
    if per_point == "length":
        sid = torch.repeat_interleave(torch.arange(S, device=pts.device), streamlines.lengths)
        seg = safe_norm(pts[1:] - pts[:-1])
        seg = torch.where(sid[1:] == sid[:-1], seg, 0.0 * seg)
        half = 0.5 * seg
        zero = pts.new_zeros(1)
        w = torch.cat([half, zero]) + torch.cat([zero, half])  # arc length owned by each vertex
    elif per_point != "count":
        raise ConfigError(f"per_point must be 'count' or 'length', got {per_point!r}")
    if weights is not None:
        if tuple(weights.shape) != (S,):
            raise ShapeError(f"weights must be [S={S}], got {tuple(weights.shape)}")
        w = w * torch.repeat_interleave(weights.to(pts.dtype), streamlines.lengths)
    if point_weights is not None:
        if tuple(point_weights.shape) != (P,):
            raise ShapeError(f"point_weights must be [P={P}], got {tuple(point_weights.shape)}")
        w = w * point_weights.to(pts.dtype)
    return w


def track_density(
    streamlines: Streamlines,
    shape,
    affine,
    *,
    weights: torch.Tensor | None = None,
    point_weights: torch.Tensor | None = None,
    per_point: str = "count",
    temperature_vox: float | None = None,
    chunk_size: int = 1 << 18,
) -> torch.Tensor:
    """Soft track-density map by splatting every vertex onto the voxel grid.

    Args:
        streamlines: ``S`` streamlines (mm).
        shape: grid size ``(X, Y, Z)``.
        affine: ``[4, 4]`` voxel -> scanner mm.
        weights: optional ``[S]`` per-streamline weights (e.g. the tracker's soft survival).
        point_weights: optional ``[P]`` per-vertex weights (e.g. soft survival along a track).
        per_point: ``"count"`` (each vertex adds 1: vertices per voxel) or ``"length"`` (each
            vertex adds the arc length it owns, half of each adjacent segment: mm of
            streamline per voxel, independent of the step size).
        temperature_vox: ``None`` = trilinear weights; ``T > 0`` = weights
            ``softmax(-|x - c|^2 / T)`` over the 8 corners ``c`` (voxel units squared), which tend
            to nearest-voxel assignment as ``T -> 0``.
        chunk_size: vertices per chunk (forward and recomputing backward).

    Returns:
        ``[X, Y, Z]`` density, dtype of the points. Mass falling outside the grid is dropped.

    Shape:
        ``(P, 3)`` points -> ``(X, Y, Z)``.

    Gradients:
        Differentiable w.r.t. ``streamlines.points``, ``weights`` and ``point_weights``.
        Trilinear weights are piecewise linear (kinks at voxel centres).
    """
    shape, aff = _check_grid(shape, affine)
    if temperature_vox is not None and not float(temperature_vox) > 0:
        raise ConfigError(f"temperature_vox must be > 0 or None, got {temperature_vox}")
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(streamlines) == 0:
        return streamlines.points.new_zeros(shape)
    vox = world_to_voxel(streamlines.points, aff)
    w = _point_weights(streamlines, weights, point_weights, per_point)
    t = None if temperature_vox is None else float(temperature_vox)
    return _Splat.apply(vox, w, shape, t, int(chunk_size))


def density_correlation(
    density_a: torch.Tensor, density_b: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pearson correlation between two density maps (over all voxels or a mask).

    Args:
        density_a: ``[X, Y, Z]`` density (e.g. from :func:`track_density`).
        density_b: ``[X, Y, Z]`` density on the same grid.
        mask: optional ``[X, Y, Z]`` bool mask of voxels to use.

    Returns:
        Scalar in ``[-1, 1]`` (0 when either map is constant). ``1 - corr`` is a loss.

    Shape:
        ``(X, Y, Z)``, ``(X, Y, Z)`` -> ``()``.

    Gradients:
        Differentiable w.r.t. both maps.
    """
    if density_a.shape != density_b.shape:
        raise ShapeError(
            f"density maps differ in shape: {tuple(density_a.shape)} vs {tuple(density_b.shape)}"
        )
    dtype = density_a.dtype if density_a.is_floating_point() else torch.float64
    a = density_a.to(dtype).reshape(-1)
    b = density_b.to(dtype).reshape(-1)
    if mask is not None:
        m = mask.reshape(-1).bool()
        a, b = a[m], b[m]
    a = a - a.mean()
    b = b - b.mean()
    den = torch.sqrt((a * a).sum() * (b * b).sum())
    eps = torch.finfo(dtype).tiny
    return (a * b).sum() / torch.clamp(den, min=eps) if den.detach() > 0 else (a * b).sum() * 0.0


def soft_occupancy(density: torch.Tensor, temperature: float) -> torch.Tensor:
    """``1 - exp(-density / T)``: a soft "visited" indicator in ``[0, 1)``.

    Args:
        density: ``[X, Y, Z]`` non-negative density (any unit).
        temperature: ``T > 0`` in the unit of ``density``; as ``T -> 0`` the result tends to
            ``density > 0``.

    Returns:
        ``[X, Y, Z]`` occupancy; a bool map is returned as 0/1 floats.

    Shape:
        ``(X, Y, Z)`` -> ``(X, Y, Z)``.

    Gradients:
        Differentiable w.r.t. ``density``.
    """
    if density.dtype == torch.bool:
        return density.to(torch.get_default_dtype())
    if not float(temperature) > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    d = density if density.is_floating_point() else density.to(torch.float64)
    return -torch.expm1(-d.clamp_min(0) / float(temperature))


def soft_dice(
    density_a: torch.Tensor, density_b: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Soft Dice ``2 sum(o_a o_b) / (sum o_a + sum o_b)`` of soft occupancies.

    Args:
        density_a: ``[X, Y, Z]`` density (or bool mask).
        density_b: ``[X, Y, Z]`` density (or bool mask) on the same grid.
        temperature: occupancy temperature (unit of the densities), see :func:`soft_occupancy`;
            as ``T -> 0`` the value tends to the hard Dice of the non-zero voxel sets.

    Returns:
        Scalar in ``[0, 1]``; ``1 - soft_dice`` is a loss.

    Shape:
        ``(X, Y, Z)``, ``(X, Y, Z)`` -> ``()``.

    Gradients:
        Differentiable w.r.t. both maps.
    """
    if density_a.shape != density_b.shape:
        raise ShapeError(
            f"density maps differ in shape: {tuple(density_a.shape)} vs {tuple(density_b.shape)}"
        )
    oa = soft_occupancy(density_a, temperature)
    ob = soft_occupancy(density_b, temperature).to(oa.dtype)
    den = oa.sum() + ob.sum()
    if den.detach() <= 0:
        warnings.warn("soft_dice of two empty maps is defined as 0", stacklevel=2)
        return den * 0.0
    return 2.0 * (oa * ob).sum() / den
