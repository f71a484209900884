"""Make the small tckgen references in this folder (inputs, tractograms, seed files).

Every input is derived from ``../shared/data/real_msmt15`` (MRtrix3 test data, lmax 8 CSD
FOD, 15 x 15 x 11 voxels of 2.5 mm, oblique transform): with MRtrix3 3.0.3 commands, or with
nibabel where a header MRtrix would not write is wanted (qform only, permuted/flipped axes,
ROIs on their own oblique grids, float ROIs). Every tractogram is
``MRTRIX_RNG_SEED=20240601 tckgen ... -algorithm SD_Stream -nthreads 0 -output_seeds``, run in
this folder so that the ``.tck`` header's ``command_history`` names the files here; the parity
harness (``benchmarks/parity.py``) and ``tests/tracking/test_refs_parity.py`` replay those
command lines with invtract's own seeding.

Usage (MRtrix3 3.0.3 on PATH; rewrites every file it makes, deterministically)::

    python tests/data/tckgen_refs/make_refs.py [--shared ../shared/data]

``REFS`` below lists each reference with what it exercises.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
RNG_SEED = "20240601"

#: shell commands that derive inputs with MRtrix3 (run in this folder; $SRC = real_msmt15)
MRTRIX_INPUTS = [
    # lmax 8 NIfTI stored left-to-right flipped (MRtrix realigns it to RAS on reading)
    "mrconvert $SRC/fod.mif fod_l8_las.nii.gz -strides -1,2,3,4",
    # lmax 4 .mif.gz with the SH axis fastest in memory and reversed spatial strides
    "mrconvert $SRC/fod.mif fod_l4_s4321.mif.gz -coord 3 0:14 -strides 4,3,2,1",
    # lmax 6, header rotated by an oblique rigid transform (no regridding)
    "mrconvert $SRC/fod.mif _l6.mif -coord 3 0:27",
    "mrtransform _l6.mif fod_l6_oblique.nii.gz -linear oblique.txt -reorient_fod no",
    # lmax 6 regridded to anisotropic voxels (new grid, interpolated coefficients)
    "mrgrid _l6.mif regrid fod_l6_aniso.mif.gz -voxel 3.1,2.7,2.9",
    "mrconvert $SRC/mask.mif mask.mif -datatype bit",
    "mrconvert $SRC/roi_A.mif roi_A.mif -datatype bit",
    # a crop whose voxel (0, 0, 0) has data, and an ROI true at that corner
    "mrconvert $SRC/fod.mif fod_corner_l4.mif.gz -coord 0 5:14 -coord 1 5:14 -coord 2 3:10 "
    "-coord 3 0:14",
    "mrconvert fod_corner_l4.mif.gz _c0.mif -coord 3 0 -axes 0,1,2",
    "mrcalc _c0.mif 0 -mul _zero.mif -datatype bit",
    "mredit _zero.mif -voxel 0,0,0 1 -voxel 0,0,1 1 -voxel 1,0,0 1 roi_corner.mif",
]

#: (name, tckgen arguments after ``tckgen``, what it exercises)
REFS = [
    (
        "las_grid",
        "fod_l8_las.nii.gz las_grid.tck -seed_grid_per_voxel roi_A.mif 2 "
        "-seed_direction 0.55,0.8,0.23",
        "NIfTI FOD with a flipped axis (realigned), grid seeding from a bit ROI, bundle",
    ),
    (
        "las_replay",
        "fod_l8_las.nii.gz las_replay.tck -seed_grid_per_voxel mask_box.nii.gz 1",
        "whole-volume replay (random initial directions) on a NIfTI, uint8 mask",
    ),
    (
        "s4321_random",
        "fod_l4_s4321.mif.gz s4321_random.tck -seed_random_per_voxel roi_oblique_u8.nii.gz 4",
        "lmax 4 .mif.gz with strides 4,3,2,1; random-per-voxel seeds from a uint8 ROI on "
        "its own oblique grid",
    ),
    (
        "oblique_image",
        "fod_l6_oblique.nii.gz oblique_image.tck -seed_image roi_lps_f32.nii.gz "
        "-select 150 -step 0.4 -angle 40",
        "lmax 6 on a rotated header; -seed_image from a float ROI (values 0.3-1, NaN) on a "
        "permuted, flipped grid; non-default step and angle",
    ),
    (
        "qform_l10_grid",
        "fod_l10_qform.nii.gz qform_l10_grid.tck -seed_grid_per_voxel roi_lps_f32.nii.gz 2",
        "lmax 10 NIfTI with only a qform (qfac -1); grid seeds from a float ROI on another "
        "grid, random directions",
    ),
    (
        "rois_grid",
        "fod_l4_s4321.mif.gz rois_grid.tck -seed_grid_per_voxel roi_A.mif 3 "
        "-seed_direction 0.55,0.8,0.23 -include roi_incl_u8.nii.gz -exclude 27,-56,-25,2.5 "
        "-mask mask.mif -minlength 5",
        "include ROI (uint8, own oblique grid), exclude sphere, bit mask ROI (cropped grids "
        "and float32 transforms as tckgen's Mask)",
    ),
    (
        "aniso_replay",
        "fod_l6_aniso.mif.gz aniso_replay.tck -seed_grid_per_voxel mask_box.nii.gz 1",
        "whole-volume replay on a regridded FOD with a seed mask on another grid",
    ),
    (
        "corner_grid",
        "fod_corner_l4.mif.gz corner_grid.tck -seed_grid_per_voxel roi_corner.mif 2 -minlength 2",
        "grid seeding never visits voxel (0, 0, 0) of the (cropped) seed mask",
    ),
    (
        "corner_random",
        "fod_corner_l4.mif.gz corner_random.tck -seed_random_per_voxel roi_corner.mif 3 "
        "-minlength 2",
        "random-per-voxel seeding does visit voxel (0, 0, 0)",
    ),
    (
        "aniso_grid",
        "fod_l6_aniso.mif.gz aniso_grid.tck -seed_grid_per_voxel roi_oblique_u8.nii.gz 2 "
        "-seed_direction 0.55,0.8,0.23 -cutoff 0.15 -step 0.5 -minlength 20 -maxlength 60",
        "regridded FOD with anisotropic voxels; grid seeds from an ROI on a third grid; "
        "length limits (truncation at the maximum length)",
    ),
]

#: world centroid of real_msmt15 roi_A (mm)
CENTRE = np.array([32.3, -49.1, -22.6])


def _rotation(axis, degrees) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _grid_affine(R, vox, shape) -> np.ndarray:
    """Affine of a grid with rotation R, voxel sizes vox, centred on CENTRE."""
    A = np.eye(4)
    A[:3, :3] = R * np.asarray(vox)[None, :]
    A[:3, 3] = CENTRE - A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return A


def _distance(affine, shape, centre=CENTRE) -> np.ndarray:
    """``[shape]`` distance (mm) of each voxel centre to ``centre``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return np.linalg.norm(world - centre, axis=-1)


def make_python_inputs(src: Path) -> None:
    """Inputs written with nibabel (headers MRtrix would not produce)."""
    # ROI on an oblique 1.7 x 1.9 x 1.6 mm grid, uint8
    shape = (10, 9, 8)
    A = _grid_affine(_rotation([1, 2, 3], 25), (1.7, 1.9, 1.6), shape)
    roi = (_distance(A, shape) <= 3.5).astype(np.uint8)
    img = nib.Nifti1Image(roi, A)
    img.set_sform(A, code=2)
    img.set_qform(A, code=1)
    nib.save(img, HERE / "roi_oblique_u8.nii.gz")
    # ROI on a permuted + flipped grid (axis i -> -z, j -> -x, k -> y), float32 with
    # values 1 inside 3 mm, 0.7 / 0.3 in shells, a NaN voxel (false for MRtrix)
    shape = (7, 8, 9)
    P = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], float)
    A = _grid_affine(_rotation([0.3, -0.2, 1], 12) @ P, (2.2, 2.0, 2.4), shape)
    d = _distance(A, shape)
    val = np.where(d <= 3.0, 1.0, np.where(d <= 4.5, 0.7, np.where(d <= 6.0, 0.3, 0.0)))
    val = val.astype(np.float32)
    val[3, 3, 3] = np.nan
    img = nib.Nifti1Image(val, A)
    img.set_sform(A, code=1)
    img.set_qform(A, code=1)
    nib.save(img, HERE / "roi_lps_f32.nii.gz")
    # include ROI: ball of 4.5 mm, 8 mm along the bundle from CENTRE, on a rotated 1.5 mm grid
    shape = (9, 9, 9)
    ahead = CENTRE + 8.0 * np.array([0.55, 0.8, 0.23]) / np.linalg.norm([0.55, 0.8, 0.23])
    A = _grid_affine(_rotation([2, 1, -1], 33), (1.5, 1.5, 1.5), shape)
    A[:3, 3] += ahead - CENTRE
    incl = (_distance(A, shape, ahead) <= 4.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(incl, A), HERE / "roi_incl_u8.nii.gz")
    # whole-volume replay mask: brain mask inside a box around roi_A, uint8 NIfTI
    mask = nib.load(src / "mask.nii.gz")
    m = np.asarray(mask.dataobj).astype(np.uint8)
    box = np.zeros_like(m)
    box[6:13, 8:15, 4:10] = 1
    nib.save(nib.Nifti1Image(m * box, mask.affine, mask.header), HERE / "mask_box.nii.gz")
    # lmax 10 FOD with only a qform, stored with x flipped (qfac = -1): crop of real_msmt15,
    # l = 10 coefficients a small deterministic pattern
    fod = nib.load(src / "fod.nii.gz")
    sh = np.asarray(fod.dataobj, np.float32)[3:15, 3:15, :, :]
    extra = 0.004 * np.sin(np.arange(21) * 1.7 + 0.3)[None, None, None, :]
    l10 = np.where(sh[..., :1] != 0, extra * sh[..., :1], 0.0).astype(np.float32)
    sh10 = np.concatenate([sh, l10], -1)[::-1]  # store x reversed
    A = fod.affine.copy()
    A[:3, 3] = A[:3, :3] @ np.array([3.0 + 11, 3.0, 0.0]) + A[:3, 3]
    A[:3, 0] = -A[:3, 0]
    img = nib.Nifti1Image(np.ascontiguousarray(sh10), A)
    img.set_sform(None, code=0)
    img.set_qform(A, code=1)
    nib.save(img, HERE / "fod_l10_qform.nii.gz")
    # rigid rotation by 100 degrees about an oblique axis through CENTRE (+ a small shift):
    # the FOD's axes end up permuted relative to scanner axes (MRtrix realigns them)
    R = _rotation([1, -1, 2], 100)
    t = CENTRE - R @ CENTRE + np.array([0.7, -0.4, 0.3])
    np.savetxt(HERE / "oblique.txt", np.vstack([np.c_[R, t], [0, 0, 0, 1]]), fmt="%.10f")


def run(cmd: str, env: dict) -> None:
    print("+", cmd, flush=True)
    subprocess.run(cmd, shell=True, check=True, cwd=HERE, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=str(HERE.parents[2].parent / "shared" / "data"))
    args = p.parse_args(argv)
    src = Path(args.shared).resolve() / "real_msmt15"
    env = dict(os.environ, SRC=str(src), MRTRIX_RNG_SEED=RNG_SEED)
    make_python_inputs(src)
    for cmd in MRTRIX_INPUTS:
        run(cmd + " -force -quiet", env)
    for name, tck_args, _ in REFS:
        run(
            f"tckgen {tck_args} -algorithm SD_Stream -output_seeds {name}_seeds.txt "
            "-nthreads 0 -force -quiet",
            env,
        )
    for tmp in HERE.glob("_*"):
        tmp.unlink()
    for name, *_ in REFS:
        tck = nib.streamlines.load(str(HERE / f"{name}.tck"), lazy_load=True)
        print(f"{name}: {tck.header['count']} streamlines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
