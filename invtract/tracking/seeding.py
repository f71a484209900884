"""Seed mechanisms with tckgen's semantics: grid / random per voxel, seed image, seed lists.

Convention (spec §4.1, §8.1; ``seeding/basic.cpp``, ``roi.cpp``, ``core/adapter/subset.h``):
seed masks are realigned to MRtrix's near-RAS axes and cropped to the bounding box of their
true voxels plus a one-voxel margin (the crop's translation computed as ``Adapter::Subset``
does); voxels are visited with axis 2 fastest; grid voxel coordinates are
``(i + offset) + a * step`` with ``offset``/``step`` rounded to float from double; positions
are computed in float32 and mapped with the cropped mask's voxel->scanner transform cast to
float32. All positions are scanner mm (RAS+).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..io.geometry import (
    norm3,
    realign,
    sanitise_transform,
    subset_transform,
    true_voxel_box,
    voxel2scanner,
)
from .rng import MRtrixRNG

__all__ = [
    "MaskGrid",
    "grid_per_voxel",
    "random_per_voxel",
    "SeedImageSampler",
]

f32 = np.float32


@dataclass
class MaskGrid:
    """A seed mask, realigned and cropped as tckgen traverses it.

    Attributes:
        mask: ``[n0, n1, n2]`` bool in traversal axes (realigned, cropped).
        vox2scanner: ``[3, 4]`` float32, traversal voxel coordinates -> scanner mm (MRtrix's
            ``voxel2scanner.cast<float>()`` of the cropped image).
    """

    mask: np.ndarray
    vox2scanner: np.ndarray

    @classmethod
    def from_image(
        cls,
        mask: np.ndarray,
        affine: np.ndarray,
        transform: np.ndarray | None = None,
        voxel_sizes=None,
    ) -> MaskGrid:
        """Realign to near-RAS (``Header::realign_transform``) and crop to the bounding box
        of the true voxels plus a one-voxel margin (``Mask::__get_mask`` in ``roi.cpp``).

        Args:
            mask: ``[X, Y, Z]`` bool.
            affine: ``[4, 4]`` voxel index -> scanner mm.
            transform: ``[3, 4]`` MRtrix unit-column header transform and ``voxel_sizes``
                ``(3,)`` mm, as :class:`~invtract.io.image.Image` carries them for images read
                from a file (then ``affine`` is not used and the seeds are tckgen's bit for
                bit); when None they are derived from ``affine`` (column norms).
        """
        mask = np.asarray(mask, bool)
        if mask.ndim != 3:
            raise ConfigError(f"seed mask must be 3-D, got shape {mask.shape}")
        if not mask.any():
            raise ConfigError("seed mask has no true voxel")
        if transform is None or voxel_sizes is None:
            transform, voxel_sizes = _split_affine(affine)
        T, spacing = sanitise_transform(transform, voxel_sizes)
        geo = realign(T, spacing, mask.shape)
        data = geo.reorient(mask)
        lo, size = true_voxel_box(data)
        data = data[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]]
        sub = subset_transform(geo.transform, geo.spacing, lo)
        M = voxel2scanner(sub, geo.spacing)[:3].astype(np.float32)
        return cls(np.ascontiguousarray(data), M)

    def to_scanner(self, v: np.ndarray) -> np.ndarray:
        """Float32 voxel coordinates ``[N, 3]`` -> scanner mm, in tckgen's compiled order
        ``(m0 v0 + m1 v1) + (m2 v2 + t)`` per row (as for float32 image ROIs in ``fused_cpu``);
        with it the grid seeds equal tckgen's ``-output_seeds`` positions bit for bit."""
        M = self.vox2scanner
        v = v.astype(np.float32)
        out = np.empty_like(v)
        for r in range(3):
            out[:, r] = (M[r, 0] * v[:, 0] + M[r, 1] * v[:, 1]) + (M[r, 2] * v[:, 2] + M[r, 3])
        return out

    def true_voxels(self) -> np.ndarray:
        """``[V, 3]`` true voxel indices in traversal order (axis 2 fastest)."""
        return np.argwhere(self.mask)  # C order: last axis fastest


def _split_affine(affine: np.ndarray) -> tuple[np.ndarray, tuple]:
    """``(unit-column transform [3, 4], voxel sizes (3,))`` of a ``[4, 4]`` affine."""
    A = np.asarray(affine, np.float64)
    sizes = tuple(norm3(A[:3, i]) for i in range(3))
    T = A[:3, :4].copy()
    for i in range(3):
        T[:, i] = T[:, i] / sizes[i]
    return T, sizes


def grid_per_voxel(grid: MaskGrid, per_axis: int) -> np.ndarray:
    """``-seed_grid_per_voxel``: ``per_axis^3`` seeds per true voxel, ``[N, 3]`` scanner mm.

    Voxel coordinates are ``(index + offset) + pos * step`` in float32 with
    ``offset = float(-0.5 + 1 / (2 G))`` and ``step = float(1 / G)`` (both rounded from
    double), ``pos`` = 0..G-1 with the last axis fastest; tckgen's traversal starts one step
    after voxel (0, 0, 0), which it never seeds (``Grid_per_voxel::get_seed``).
    """
    if per_axis < 1:
        raise ConfigError(f"grid size must be >= 1, got {per_axis}")
    G = per_axis
    vox = grid.true_voxels()
    if vox.shape[0] and (vox[0] == 0).all():
        vox = vox[1:]
    offset = f32(-0.5 + 1.0 / (2 * G))
    step = f32(1.0 / G)
    a = np.arange(G, dtype=np.float32) * step
    ga, gb, gc = np.meshgrid(a, a, a, indexing="ij")
    sub = np.stack([ga.ravel(), gb.ravel(), gc.ravel()], -1)  # c fastest
    v = (vox.astype(np.float32)[:, None, :] + offset) + sub[None, :, :]
    return grid.to_scanner(v.reshape(-1, 3))


def random_per_voxel(
    grid: MaskGrid, per_voxel: int, rng: MRtrixRNG, dir_draw=None
) -> Iterator[tuple[np.ndarray, bool]]:
    """``-seed_random_per_voxel``: yields one seed at a time (position [3], scanner mm).

    The caller draws the direction right after each position (tckgen's order), so this is a
    generator consumed in lockstep with direction draws.
    """
    half = f32(0.5)
    for i, j, k in grid.true_voxels():
        for _ in range(per_voxel):
            v = np.array(
                [
                    (f32(i) + rng.uniform()) - half,
                    (f32(j) + rng.uniform()) - half,
                    (f32(k) + rng.uniform()) - half,
                ],
                dtype=np.float32,
            )
            yield grid.to_scanner(v[None])[0]


class SeedImageSampler:
    """``-seed_image``: random voxel (uniform over the cropped grid, retried until true), then
    a uniform position inside it."""

    def __init__(self, grid: MaskGrid, rng: MRtrixRNG) -> None:
        self.grid = grid
        self.rng = rng

    def next(self) -> np.ndarray:
        n0, n1, n2 = self.grid.mask.shape
        while True:
            i = self.rng.randint(n0)
            j = self.rng.randint(n1)
            k = self.rng.randint(n2)
            if self.grid.mask[i, j, k]:
                break
        half = f32(0.5)
        v = np.array(
            [
                (f32(i) + self.rng.uniform()) - half,
                (f32(j) + self.rng.uniform()) - half,
                (f32(k) + self.rng.uniform()) - half,
            ],
            dtype=np.float32,
        )
        return self.grid.to_scanner(v[None])[0]
