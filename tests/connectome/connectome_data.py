"""Data helpers for the connectome tests: deterministic block parcellations of the shared masks.

The parcellations are pure functions of ``<repo>/../shared/data/<case>/mask.nii.gz`` (same grid
and affine). Their ``.nii.gz`` copies and the ``tck2connectome`` outputs computed from them are
committed under ``tests/data/connectome/`` (see the README there); ``build_parcellation`` is the
code that produced them, and a test checks that it still does.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
FIXTURES = REPO / "tests" / "data" / "connectome"

#: case -> (block size in voxels along i, j, k; labels to skip (left missing); on-disk dtype)
PARCELLATION_SPECS: dict[str, tuple[tuple[int, int, int], tuple[int, ...], str]] = {
    # 40 x 40 x 6 voxels, 2 mm: 4 x 2 x 1 blocks -> labels 1..8, all present.
    "phantom_cross90": ((10, 20, 6), (), "uint8"),
    # 15 x 15 x 11 voxels, 2.5 mm: 3 x 2 x 2 blocks -> 12 regions, relabelled to 1..13 with
    # label 7 missing (tests the empty row/column tck2connectome keeps for it).
    "real_msmt15": ((5, 8, 6), (7,), "int16"),
}


def build_parcellation(mask: np.ndarray, block: tuple[int, int, int], skip: tuple[int, ...]):
    """Split the non-zero voxels of ``mask`` into axis-aligned blocks of ``block`` voxels.

    Blocks are numbered in C order of their (i, j, k) block index, keeping only blocks that hold
    mask voxels; labels listed in ``skip`` are left unused (the later blocks shift up).

    Args:
        mask: ``[X, Y, Z]`` array; voxels ``> 0`` are labelled, the rest stay 0.
        block: block edge lengths in voxels along the three voxel axes.
        skip: label values never assigned.

    Returns:
        ``[X, Y, Z]`` int64 label volume (0 = background).
    """
    inside = np.asarray(mask) > 0
    grid = np.indices(inside.shape)
    nb = [-(-n // b) for n, b in zip(inside.shape, block)]
    block_id = np.ravel_multi_index(tuple(g // b for g, b in zip(grid, block)), nb)
    used = np.unique(block_id[inside])
    values = []
    label = 1
    while len(values) < used.size:
        if label not in skip:
            values.append(label)
        label += 1
    lut = np.zeros(int(np.prod(nb)), np.int64)
    lut[used] = values
    return np.where(inside, lut[block_id], 0)


def make_parcellation_nifti(case: str, out: Path, shared: Path = SHARED) -> Path:
    """Write the parcellation of ``case`` (see :data:`PARCELLATION_SPECS`) to ``out``."""
    block, skip, dtype = PARCELLATION_SPECS[case]
    mask_img = nib.load(str(shared / case / "mask.nii.gz"))
    labels = build_parcellation(np.asanyarray(mask_img.dataobj), block, skip).astype(dtype)
    img = nib.Nifti1Image(labels, mask_img.affine)
    img.set_qform(mask_img.affine, code=1)
    img.set_sform(mask_img.affine, code=1)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(out))
    return out
