"""Seed mechanisms with tckgen's semantics: grid / random per voxel, seed image, seed lists.

Convention (spec §4.1, §8.1; ``seeding/basic.cpp``): seed masks are cropped to the bounding box
of their true voxels plus a one-voxel margin; voxels are visited in MRtrix's near-RAS axis
order with axis 2 fastest; grid offsets are -0.5 + 1/(2G) + a/G; positions are computed in
float32 and mapped with the mask's voxel->scanner transform cast to float32. All positions are
scanner mm (RAS+).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import io_orientation

from ..errors import ConfigError
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
    """A seed mask, cropped and realigned as MRtrix traverses it.

    Attributes:
        mask: ``[n0, n1, n2]`` bool in traversal axes (realigned, cropped).
        vox2scanner: ``[3, 4]`` float32, traversal voxel coordinates -> scanner mm.
    """

    mask: np.ndarray
    vox2scanner: np.ndarray

    @classmethod
    def from_image(cls, mask: np.ndarray, affine: np.ndarray) -> MaskGrid:
        """Realign to near-RAS (``Header::realign_transform``) and crop with a 1-voxel margin."""
        mask = np.asarray(mask, bool)
        if mask.ndim != 3:
            raise ConfigError(f"seed mask must be 3-D, got shape {mask.shape}")
        if not mask.any():
            raise ConfigError("seed mask has no true voxel")
        affine = np.asarray(affine, np.float64)
        ornt = io_orientation(affine)  # for each input axis: (output axis, flip)
        perm = np.argsort(ornt[:, 0]).astype(int)  # output axis j <- input axis perm[j]
        data = np.transpose(mask, perm)
        A = affine.copy()
        lin = A[:3, :3][:, perm].copy()
        trans = A[:3, 3].copy()
        for j in range(3):
            if ornt[perm[j], 1] < 0:
                n = data.shape[j]
                data = np.flip(data, axis=j)
                trans = trans + lin[:, j] * (n - 1)
                lin[:, j] = -lin[:, j]
        idx = np.argwhere(data)
        lo = np.maximum(idx.min(0) - 1, 0)
        hi = np.minimum(idx.max(0) + 2, data.shape)
        data = data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        trans = trans + lin @ lo
        M = np.concatenate([lin, trans[:, None]], 1).astype(np.float32)
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
        idx = np.argwhere(self.mask)  # C order: last axis fastest
        if idx.shape[0] and (idx[0] == 0).all():
            idx = idx[1:]  # MRtrix's traversal starts one step after index (0,0,0)
        return idx


def grid_per_voxel(grid: MaskGrid, per_axis: int) -> np.ndarray:
    """``-seed_grid_per_voxel``: ``per_axis^3`` seeds per true voxel, ``[N, 3]`` scanner mm."""
    if per_axis < 1:
        raise ConfigError(f"grid size must be >= 1, got {per_axis}")
    G = per_axis
    vox = grid.true_voxels().astype(np.float32)
    off = f32(-0.5) + f32(1.0) / f32(2 * G)
    a = np.arange(G, dtype=np.float32) / f32(G)
    ga, gb, gc = np.meshgrid(a, a, a, indexing="ij")
    sub = np.stack([ga.ravel(), gb.ravel(), gc.ravel()], -1)  # c fastest
    v = (vox[:, None, :] + off)[:, :, :] + sub[None, :, :]
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
