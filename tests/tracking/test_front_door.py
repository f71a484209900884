"""The public front door: ``invtract.load_fod`` / ``invtract.track`` -> DIPY
StatefulTractogram in RAS+ mm, reproducing tckgen; ``invtract.from_sft``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.io.stateful_tractogram import Space, StatefulTractogram

import invtract as it
from invtract.data import example_path
from invtract.io.seeds import load_seeds
from invtract.io.sh_basis import SHBasisWarning, from_mrtrix_basis


@pytest.fixture(scope="module")
def reference(shared_data):
    d = shared_data / "phantom_cross90"
    ref = nib.streamlines.load(str(d / "bundleB_default.tck")).streamlines
    return d, list(ref), load_seeds(d / "bundleB_default_seeds.txt")


def _same(sft, ref):
    assert len(sft) == len(ref) > 0
    for a, b in zip(sft.streamlines, ref):
        np.testing.assert_array_equal(a, b)


def test_track_returns_statefultractogram_equal_to_tckgen(reference):
    d, ref, seeds = reference
    fod = it.load_fod(d / "fod.nii.gz")
    sft = it.track(fod, seed_grid_per_voxel=(d / "roi_B.nii.gz", 2), seed_direction=(1, 0, 0))
    assert isinstance(sft, StatefulTractogram) and sft.space == Space.RASMM
    np.testing.assert_allclose(sft.affine, fod.affine)
    _same(sft, ref)
    np.testing.assert_array_equal(sft.data_per_streamline["seed_index"][:, 0], seeds.seed_index)
    np.testing.assert_allclose(sft.data_per_streamline["seed_point"], seeds.positions, atol=1e-5)


def test_seed_file_and_array_and_dipy_basis(reference):
    """Seeds from tckgen's seed file (path or [N, 3] array), and the FOD handed over as
    (array, affine) in DIPY's legacy descoteaux basis: the same streamlines."""
    d, ref, seeds = reference
    img = nib.load(str(d / "fod.nii.gz"))
    mr = np.asarray(img.dataobj, np.float32)
    dipy_fod = (from_mrtrix_basis(mr, "descoteaux07_legacy"), img.affine)
    _same(it.track(d / "fod.nii.gz", seeds=d / "bundleB_default_seeds.txt",
                   seed_direction=(1, 0, 0)), ref)  # fmt: skip
    sft = it.track(dipy_fod, sh_basis="descoteaux07_legacy", seeds=seeds.positions,
                   seed_direction=(1, 0, 0))  # fmt: skip
    for a, b in zip(sft.streamlines, ref):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.warns(SHBasisWarning):
        it.track(dipy_fod, seeds=seeds.positions[:2], seed_direction=(1, 0, 0))


def test_regions_spheres_and_errors():
    fod = it.load_fod(example_path("fod"))
    sft = it.track(fod, seed_sphere=(-10, 0, 0, 6), select=5, rng_seed=2,
                   include=(0, 0, 0, 50), mask=example_path("mask"))  # fmt: skip
    assert len(sft) == 5
    with pytest.raises(it.ConfigError, match="exactly one seeding"):
        it.track(fod, seed_sphere=(0, 0, 0, 5), seeds=np.zeros((1, 3)))
    with pytest.raises(it.ConfigError, match=r"\[N, 3\]"):
        it.track(fod, seeds=np.zeros((4, 2)))


def test_from_sft_any_space(reference):
    d, ref, _ = reference
    sft = StatefulTractogram(ref, str(d / "fod.nii.gz"), Space.RASMM)
    sft.to_vox()
    sl = it.from_sft(sft)
    assert sft.space == Space.VOX  # the caller's object is left as it was
    for a, b in zip(sl.to_list(), ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_readme_python_example_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "96 Space.RASMM"


def test_front_door_is_tckgen_on_a_flipped_nifti_with_image_regions():
    """``it.track`` reads geometry as ``invtract track`` does (MRtrix's transform and inverse,
    tckgen's ROI masks): bit-identical to tckgen on a NIfTI with a flipped axis, a uint8
    include region on another grid, an exclude sphere and a strided mask (``rois_grid``)."""
    import invtract as it
    from invtract.io.tractogram import load_tractogram

    d = Path(__file__).resolve().parents[1] / "data" / "tckgen_refs"
    sft = it.track(
        str(d / "fod_l4_s4321.mif.gz"),
        seed_grid_per_voxel=(str(d / "roi_A.mif"), 3),
        seed_direction=(0.55, 0.8, 0.23),
        include=str(d / "roi_incl_u8.nii.gz"),
        exclude=(27, -56, -25, 2.5),
        mask=str(d / "mask.mif"),
        minlength=5,
    )
    ref = load_tractogram(d / "rois_grid.tck").to_list()
    assert len(sft) == len(ref) > 0
    for a, b in zip(sft.streamlines, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    las = it.track(
        str(d / "fod_l8_las.nii.gz"),
        seed_grid_per_voxel=(str(d / "roi_A.mif"), 2),
        seed_direction=(0.55, 0.8, 0.23),
    )
    ref = load_tractogram(d / "las_grid.tck").to_list()
    assert len(las) == len(ref) > 0
    for a, b in zip(las.streamlines, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)


def test_from_sft_corner_origin(reference):
    """A TrackVis-origin (voxel corner) tractogram comes back at MRtrix's voxel centres."""
    d, ref, _ = reference
    sft = StatefulTractogram(ref, str(d / "fod.nii.gz"), Space.RASMM)
    sft.to_corner()
    assert not np.allclose(sft.streamlines[0], ref[0], atol=0.1)  # corner shifts the points
    for a, b in zip(it.from_sft(sft).to_list(), ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_fit_target_pairs_seeds_like_the_tckgen_seeds_file(reference):
    """``it.fit_target(it.track(...))`` gives the seeds a tckgen -output_seeds file gives."""
    from invtract.io.seeds import midpoint_seeds, seeds_from_reference

    d, ref, _ = reference
    fod = it.load_fod(d / "fod.nii.gz")
    sft = it.track(fod, seed_grid_per_voxel=(d / "roi_B.nii.gz", 2), seed_direction=(1, 0, 0))
    sft.to_vox()  # any space
    sl, pos, dirs = it.fit_target(sft)
    want_pos, want_dirs, ti = seeds_from_reference(d / "bundleB_default.tck",
                                                   d / "bundleB_default_seeds.txt")  # fmt: skip
    np.testing.assert_array_equal(ti, np.arange(len(sl)))
    np.testing.assert_allclose(pos, want_pos, atol=1e-4)
    np.testing.assert_allclose(dirs, want_dirs, atol=1e-4)
    # a plain .tck has no seed indices: midpoints, as `invtract fit` without --target-seeds
    sl2, pos2, dirs2 = it.fit_target(d / "bundleB_default.tck")
    mid_pos, mid_dirs = midpoint_seeds(sl2)
    np.testing.assert_array_equal(pos2, mid_pos)
    assert len(sl2) == len(sl) and not np.allclose(pos2, pos)
    with pytest.raises(it.ConfigError, match="no streamlines"):
        it.fit_target(StatefulTractogram([], str(d / "fod.nii.gz"), Space.RASMM))


def test_api_track_resolves_defaults_with_the_fields_voxel_sizes(reference):
    """``tracking.api.track`` without ``voxel_sizes``: the field's own (the header's), so the
    FOD type alone carries what resolving tckgen's defaults needs; same streamlines as tckgen."""
    from invtract.fod.field import FODField
    from invtract.params import TrackingParameters
    from invtract.tracking.api import Seeding, track

    d, ref, seeds = reference
    img = it.load_fod(d / "fod.nii.gz")
    field = FODField.from_image(img)
    dirs = np.tile(np.float32([1, 0, 0]), (len(seeds.positions), 1))  # -seed_direction 1,0,0
    seeding = Seeding("list", positions=seeds.positions, directions=dirs)
    res = track(field, seeding, TrackingParameters(), rng_seed=0)
    assert len(res.streamlines) == len(ref)
    pts, _ = res.streamlines.to_padded()
    for k, t in enumerate(seeds.track_index):
        n = int(res.streamlines.lengths[k])
        np.testing.assert_array_equal(pts[k, :n].numpy(), ref[int(t)])
