"""Trilinear interpolation of SH coefficients with MRtrix3's boundary and zero-voxel rules.

Convention (spec §2; ``core/interp/linear.h``, ``core/interp/masked.h``,
``tracking/method.h: get_data``): voxel coordinates v = scanner2voxel @ [p, 1] in float64; a
point is outside the field of view if any v_i <= -0.5 or v_i >= n_i - 0.5; the nearest voxel
(rounded half away from zero) must have at least one non-zero coefficient (NaN counts as
non-zero); per-axis fractions are zeroed in the outer half-voxel; weights are float
w = wx * (wy * wz) with values below 1e-6 set to 0, not renormalised; corners are summed in the
order x fastest, then y, then z; a NaN l=0 coefficient means "no data".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tracking.rules import FOV_HALF_VOXEL, WEIGHT_THRESHOLD

__all__ = ["VoxelGrid", "world_to_voxel", "corner_weights", "sample_fod", "nonzero_rows"]

#: rows tested at a time by :func:`nonzero_rows` (a ``[rows, K]`` bool temporary: ~45 MB)
NONZERO_CHUNK = 1 << 20


def nonzero_rows(flat: torch.Tensor, after_chunk=None) -> torch.Tensor:
    """``[N]`` bool: the rows of ``flat [N, K]`` with any non-zero value (no gradient).

    Computed :data:`NONZERO_CHUNK` rows at a time: on a whole-brain FOD (10 M voxels x 45)
    the one-shot ``(flat != 0).any(-1)`` would hold a 432 MB ``[N, K]`` bool temporary beside
    the coefficients. ``after_chunk()``, if given, is called after each chunk (e.g. to release
    a memory-mapped ``flat``'s pages: :func:`invtract.io.scratch.release`)."""
    flat = flat.detach()
    out = torch.empty(flat.shape[0], dtype=torch.bool, device=flat.device)
    for a in range(0, flat.shape[0], NONZERO_CHUNK):
        torch.any(flat[a : a + NONZERO_CHUNK] != 0, -1, out=out[a : a + NONZERO_CHUNK])
        if after_chunk is not None:
            after_chunk()
    return out


@dataclass(frozen=True)
class VoxelGrid:
    """The geometry of an FOD on a device.

    Attributes:
        shape: (n0, n1, n2) voxel counts.
        scanner2voxel: ``[3, 4]`` float64 tensor, scanner mm -> voxel coordinates.
    """

    shape: tuple
    scanner2voxel: torch.Tensor


def world_to_voxel(pos_mm: torch.Tensor, scanner2voxel: torch.Tensor) -> torch.Tensor:
    """Scanner mm ``[N, 3]`` -> voxel coordinates ``[N, 3]`` (float64; integer = voxel centre).

    Gradients: linear, differentiable w.r.t. ``pos_mm``.
    """
    M = scanner2voxel.to(dtype=torch.float64, device=pos_mm.device)
    return pos_mm.to(torch.float64) @ M[:, :3].T + M[:, 3]


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(torch.abs(v) + 0.5)


def corner_weights(v: torch.Tensor, shape, weight_dtype: torch.dtype = torch.float32):
    """Corner indices and weights of trilinear interpolation at voxel coordinates ``v``.

    Args:
        v: ``[N, 3]`` float64 voxel coordinates.
        shape: (n0, n1, n2).
        weight_dtype: dtype of the weights (float32 reproduces MRtrix).

    Returns:
        ``(flat_index [N, 8] int64, weights [N, 8], inside [N] bool)``; corner c = x + 2y + 4z.
        ``flat_index`` indexes the volume flattened over its 3 spatial axes (C order).

    Gradients:
        ``weights`` are differentiable w.r.t. ``v`` (piecewise linear; kinks at voxel centres).
    """
    n = torch.tensor(shape, dtype=v.dtype, device=v.device)
    inside = ((v > -FOV_HALF_VOXEL) & (v < n - FOV_HALF_VOXEL)).all(-1)
    fl = torch.floor(v.detach())
    f = v - fl
    edge = (v.detach() < 0) | (v.detach() > n - 1)
    f = torch.where(edge, torch.zeros_like(f), f)
    f = f.to(weight_dtype)
    one = torch.ones_like(f)
    w0 = one - f  # [N, 3] weight of the lower corner per axis
    w1 = f
    flo = fl.to(torch.int64)
    nmax = torch.tensor(shape, device=v.device, dtype=torch.int64) - 1
    i0 = flo.clamp(min=0)
    i0 = torch.minimum(i0, nmax)
    i1 = torch.minimum((flo + 1).clamp(min=0), nmax)
    weights = []
    index = []
    stride1 = shape[2]
    stride0 = shape[1] * shape[2]
    for c in range(8):
        x, y, z = c & 1, (c >> 1) & 1, (c >> 2) & 1
        wx = w1[:, 0] if x else w0[:, 0]
        wy = w1[:, 1] if y else w0[:, 1]
        wz = w1[:, 2] if z else w0[:, 2]
        w = wx * (wy * wz)
        w = torch.where(w.detach() < WEIGHT_THRESHOLD, torch.zeros_like(w), w)
        weights.append(w)
        ix = i1[:, 0] if x else i0[:, 0]
        iy = i1[:, 1] if y else i0[:, 1]
        iz = i1[:, 2] if z else i0[:, 2]
        index.append(ix * stride0 + iy * stride1 + iz)
    return torch.stack(index, -1), torch.stack(weights, -1), inside


def sample_fod(
    sh_flat: torch.Tensor,
    shape,
    scanner2voxel: torch.Tensor,
    pos_mm: torch.Tensor,
    nonzero_flat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SH coefficients at scanner points, with MRtrix's "no data" rules.

    Args:
        sh_flat: ``[X*Y*Z, K]`` coefficients (the ``[X, Y, Z, K]`` volume reshaped, C order).
        shape: (X, Y, Z).
        scanner2voxel: ``[3, 4]`` float64.
        pos_mm: ``[N, 3]`` scanner mm (RAS+).
        nonzero_flat: optional ``[X*Y*Z]`` bool, voxel has any non-zero (or NaN) coefficient;
            computed when not given.

    Returns:
        ``(coeffs [N, K], valid [N] bool)``. Rows where ``valid`` is False are zero.

    Gradients:
        ``coeffs`` is linear in ``sh_flat`` (exact gradients) and piecewise linear in ``pos_mm``.
        ``valid`` is discrete (no gradient).
    """
    N = pos_mm.shape[0]
    K = sh_flat.shape[-1]
    if N == 0:
        return sh_flat.new_zeros((0, K)), torch.zeros(0, dtype=torch.bool, device=pos_mm.device)
    if nonzero_flat is None:
        nonzero_flat = nonzero_rows(sh_flat)
    v = world_to_voxel(pos_mm, scanner2voxel)
    index, weights, inside = corner_weights(v, shape, weight_dtype=sh_flat.dtype)
    n = torch.tensor(shape, device=v.device, dtype=torch.int64)
    r = _round_half_away(v.detach()).to(torch.int64)
    r = torch.minimum(r.clamp(min=0), n - 1)
    near = (r[:, 0] * shape[1] + r[:, 1]) * shape[2] + r[:, 2]
    valid = inside & nonzero_flat[near]
    out = None
    for c in range(8):
        term = sh_flat[index[:, c]] * weights[:, c : c + 1]
        out = term if out is None else out + term
    valid = valid & ~torch.isnan(out[:, 0].detach())
    out = torch.where(valid[:, None], out, torch.zeros_like(out))
    return out, valid
