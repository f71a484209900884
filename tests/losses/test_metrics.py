"""Evaluation metrics vs scipy/dipy on real tractograms, and compare_tractograms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff

from invtract.errors import InvtractError, ShapeError
from invtract.losses import (
    EmptyTractogramError,
    SpaceError,
    bounding_grid,
    bundle_adjacency,
    bundle_minima,
    compare_tractograms,
    connectome_correlation,
    dice,
    mam_distances,
    overlap_overreach,
    paired_hausdorff,
    resample,
    weighted_dice,
)
from invtract.streamlines import Streamlines


def _lines(path, dtype=np.float64):
    import nibabel as nib

    return [np.asarray(s, dtype) for s in nib.streamlines.load(str(path)).streamlines]


def _sl(lines):
    return Streamlines.from_list(lines, dtype=torch.float64)


def _hausdorff(x, y):
    return max(directed_hausdorff(x, y)[0], directed_hausdorff(y, x)[0])


@pytest.fixture(scope="module")
def real(shared_data):
    d = shared_data / "real_msmt15"
    return _lines(d / "bundleA_default.tck"), _lines(d / "bundleA_step0.5.tck")


def test_paired_hausdorff_matches_scipy_different_steps(shared_data):
    d = shared_data / "phantom_cross90"
    a, b = _lines(d / "bundleB_default.tck"), _lines(d / "bundleB_step1.0.tck")
    assert len(a) == len(b) == 96
    assert np.mean([len(x) for x in a]) > 2 * np.mean([len(x) for x in b])  # steps 0.2 vs 1 mm
    ref = np.array([_hausdorff(x, y) for x, y in zip(a, b)])
    got = paired_hausdorff(_sl(a), _sl(b), max_elements=1 << 20).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


def test_paired_hausdorff_real_and_float32(real):
    a, b = real
    n = 120
    ref = np.array([_hausdorff(x, y) for x, y in zip(a[:n], b[:n])])
    sa = Streamlines.from_list(a[:n])  # float32 in, float64 out
    got = paired_hausdorff(sa, Streamlines.from_list(b[:n]))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    with pytest.raises(ShapeError):
        paired_hausdorff(sa, sa.select(range(3)))


def test_mam_matches_dipy(real):
    from dipy.tracking.distances import bundles_distances_mam

    a, b = real
    a32, b32 = [x.astype(np.float32) for x in a[:30]], [x.astype(np.float32) for x in b[:25]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dipy warns on unequal point counts (fine for MAM)
        for metric in ("avg", "min", "max"):
            ref = bundles_distances_mam(a32, b32, metric=metric)
            got = mam_distances(_sl(a[:30]), _sl(b[:25]), metric=metric, max_elements=1 << 20)
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("threshold", [1.0, 5.0])
def test_bundle_adjacency_matches_dipy(shared_data, threshold):
    from dipy.segment.bundles import bundle_adjacency as dipy_ba
    from dipy.tracking.streamline import set_number_of_points

    d = shared_data / "real_msmt15"
    a, b = _lines(d / "bundleA_default.tck"), _lines(d / "bundleA_cutoff0.3.tck")
    ref = dipy_ba(set_number_of_points(a, 20), set_number_of_points(b, 20), threshold)
    assert bundle_adjacency(_sl(a), _sl(b), threshold, 20, chunk_size=50) == pytest.approx(ref)


def test_bundle_minima_point_metrics_match_references(real):
    from dipy.tracking.distances import bundles_distances_mam, bundles_distances_mdf

    a, b = real
    ra, rb = resample(_sl(a[:24]), 12), resample(_sl(b[:18]), 12)
    m = bundle_minima(ra, rb, point_metrics=True, chunk_size=8)
    la, lb = list(ra.numpy()), list(rb.numpy())
    np.testing.assert_allclose(
        m["mdf_ab"].numpy(), bundles_distances_mdf(la, lb).min(1), atol=1e-5
    )
    np.testing.assert_allclose(
        m["mdf_ba"].numpy(), bundles_distances_mdf(la, lb).min(0), atol=1e-5
    )
    mam = bundles_distances_mam(la, lb)
    np.testing.assert_allclose(m["mam_ab"].numpy(), mam.min(1), atol=1e-5)
    np.testing.assert_allclose(m["mam_ba"].numpy(), mam.min(0), atol=1e-5)
    h = np.array([[_hausdorff(x, y) for y in lb] for x in la])
    np.testing.assert_allclose(m["hausdorff_ab"].numpy(), h.min(1), atol=1e-9)
    np.testing.assert_allclose(m["hausdorff_ba"].numpy(), h.min(0), atol=1e-9)


def test_voxel_set_metrics():
    a = torch.zeros(4, 4, 4, dtype=torch.int64)
    b = torch.zeros(4, 4, 4, dtype=torch.int64)
    a[0, :2, 0] = torch.tensor([1, 3])  # voxels {0, 1}
    b[0, 1:4, 0] = torch.tensor([2, 2, 2])  # voxels {1, 2, 3}
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert weighted_dice(a, b) == pytest.approx((3 + 2) / (4 + 6))
    ol, orr = overlap_overreach(a, b)
    assert (ol, orr) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert math.isnan(dice(a * 0, b * 0))
    assert connectome_correlation(np.eye(3), np.eye(3)) == pytest.approx(1.0)
    assert connectome_correlation(np.eye(3), 2 - np.eye(3)) == pytest.approx(-1.0)


def _dipy_dice(la, lb, shape, affine):
    """The contract: Dice of non-zero dipy density maps (vertices outside the grid removed)."""
    from dipy.tracking.utils import density_map

    inv = np.linalg.inv(affine)

    def inside(lines):
        out = []
        for s in lines:
            ijk = np.floor(s @ inv[:3, :3].T + inv[:3, 3] + 0.5)
            keep = ((ijk >= 0) & (ijk < np.asarray(shape))).all(1)
            if keep.any():
                out.append(s[keep])
        return out

    da = density_map(inside(la), affine, shape) > 0
    db = density_map(inside(lb), affine, shape) > 0
    return 2 * (da & db).sum() / (da.sum() + db.sum())


def test_compare_contract_with_reference(shared_data, real):
    from dipy.segment.bundles import bundle_adjacency as dipy_ba
    from dipy.tracking.streamline import set_number_of_points

    from invtract.io.image import load_image

    a, b = real
    n = min(len(a), len(b))
    ref = load_image(shared_data / "real_msmt15" / "mask.nii.gz")
    res = compare_tractograms(_sl(a[:n]), _sl(b[:n]), reference=ref)
    assert res["count_a"] == res["count_b"] == n
    assert res["dice"] == pytest.approx(_dipy_dice(a[:n], b[:n], ref.data.shape, ref.affine))
    ba = dipy_ba(set_number_of_points(a[:n], 20), set_number_of_points(b[:n], 20), 5.0)
    assert res["bundle_adjacency"] == pytest.approx(ba)
    ph = np.array([_hausdorff(x, y) for x, y in zip(a[:n], b[:n])])
    assert res["paired_hausdorff_median_mm"] == pytest.approx(np.median(ph))
    assert res["paired_hausdorff_frac_within_1mm"] == pytest.approx(np.mean(ph <= 1.0))
    assert res["reference_grid"]["source"] == "reference image"
    for key, unit in res["units"].items():
        assert key in res and unit
        assert not key.endswith("_mm") or unit == "mm"
    assert res["units"]["dice"] == "ratio"
    # self comparison is perfect
    same = compare_tractograms(_sl(a[:50]), _sl(a[:50]), reference=ref)
    assert same["dice"] == 1.0 and same["bundle_adjacency"] == 1.0
    assert same["paired_hausdorff_max_mm"] == 0.0 and same["overreach"] == 0.0


def test_compare_without_reference_and_unequal_counts(shared_data):
    d = shared_data / "phantom_cross90"
    a, b = _lines(d / "bundleB_default.tck")[:40], _lines(d / "bundleB_cutoff1.0.tck")[:30]
    res = compare_tractograms(_sl(a), _sl(b), bundle_sample=10)
    assert "bounding box" in res["reference_grid"]["source"]
    assert res["reference_grid"]["voxel_size_mm"] == pytest.approx([1.0, 1.0, 1.0])
    shape, affine = bounding_grid(_sl(a), _sl(b))
    assert res["dice"] == pytest.approx(_dipy_dice(a, b, shape, affine))
    assert res["paired_hausdorff_median_mm"] is None
    assert res["overlap"] == 1.0 and res["overreach"] > 0.5  # cutoff 1.0 stops at the crossing
    assert res["length_mean_a_mm"] > res["length_mean_b_mm"]
    assert any("sample" in n for n in res["notes"])


def test_compare_errors(shared_data):
    line = np.array([[0.0, 0, 0], [10, 0, 0]])
    a = _sl([line])
    with pytest.raises(EmptyTractogramError):
        compare_tractograms(a, Streamlines.empty(dtype=torch.float64))
    with pytest.raises(SpaceError, match="do not overlap"):
        compare_tractograms(a, _sl([line + 500.0]))
    from invtract.io.image import load_image

    ref = load_image(shared_data / "real_msmt15" / "mask.nii.gz")
    with pytest.raises(SpaceError, match="does not cover"):
        compare_tractograms(_sl([line + 300.0]), _sl([line + 300.0]), reference=ref)
    assert issubclass(SpaceError, InvtractError)
    assert issubclass(EmptyTractogramError, InvtractError)
