"""Evaluation metrics against DIPY and scipy on real tractograms, and compare_tractograms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff

from invtract.errors import InvtractError, ShapeError
from invtract.evaluation import metrics as ev
from invtract.evaluation.compare import compare_tractograms
from invtract.io.seeds import load_seeds
from invtract.losses import (
    EmptyTractogramError,
    SpaceError,
    bounding_grid,
    bundle_minima,
    connectome_correlation,
    dice,
    mam_distances,
    overlap_overreach,
    paired_hausdorff,
    weighted_dice,
)
from invtract.losses import bundle_adjacency as losses_bundle_adjacency
from invtract.streamlines import Streamlines


def _lines(path, dtype=np.float64):
    import nibabel as nib

    return [np.asarray(s, dtype) for s in nib.streamlines.load(str(path)).streamlines]


def _sl(lines):
    return Streamlines.from_list(lines, dtype=torch.float64)


def _hausdorff(x, y):
    return max(directed_hausdorff(x, y)[0], directed_hausdorff(y, x)[0])


def _seeds(path, count):
    table = load_seeds(path)
    out = np.empty((count, 3))
    out[table.track_index] = table.positions
    return out


@pytest.fixture(scope="module")
def real(shared_data):
    d = shared_data / "real_msmt15"
    return _lines(d / "bundleA_default.tck"), _lines(d / "bundleA_step0.5.tck")


def test_hausdorff_matches_scipy_different_steps(shared_data):
    d = shared_data / "phantom_cross90"
    a, b = _lines(d / "bundleB_default.tck")[:40], _lines(d / "bundleB_step1.0.tck")[:40]
    assert np.mean([len(x) for x in a]) > 2 * np.mean([len(x) for x in b])  # 0.2 vs 1 mm steps
    ref = np.array([_hausdorff(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(ev.paired_hausdorff(a, b), ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(paired_hausdorff(_sl(a), _sl(b)), ref, rtol=0, atol=1e-9)
    full = np.array([[_hausdorff(x, y) for y in b[:7]] for x in a[:9]])
    got = ev.hausdorff_distances(a[:9], b[:7], max_points=700)  # blocks split streamlines sets
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-9)
    with pytest.raises(ShapeError):
        ev.paired_hausdorff(a[:3], b[:2])


def test_mam_and_mdf_minima_match_dipy(real):
    from dipy.tracking.distances import bundles_distances_mam, bundles_distances_mdf

    a, b = real
    a, b = a[:30], b[:25]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dipy warns on unequal point counts (fine for MAM)
        mam = bundles_distances_mam(a, b)
        np.testing.assert_array_equal(ev.mam_minima(a, b, max_pairs=100), mam.min(1))
        for metric in ("avg", "min", "max"):
            ref = bundles_distances_mam(a, b, metric=metric)
            np.testing.assert_array_equal(mam_distances(_sl(a), _sl(b), metric=metric), ref)
    ra, rb = ev.resample_lines(a, 12), ev.resample_lines(b, 12)
    mdf = bundles_distances_mdf(ra, rb)
    ab, ba = ev.mdf_minima(ra, rb, block=7)
    np.testing.assert_array_equal(ab, mdf.min(1))
    np.testing.assert_array_equal(ba, mdf.min(0))
    m = bundle_minima(np.stack(ra), np.stack(rb), point_metrics=True)
    np.testing.assert_array_equal(m["mam_ab"], bundles_distances_mam(ra, rb).min(1))
    h = np.array([[_hausdorff(x, y) for y in rb] for x in ra])
    np.testing.assert_allclose(m["hausdorff_ba"], h.min(0), atol=1e-12)


@pytest.mark.parametrize("threshold", [1.0, 5.0])
def test_bundle_adjacency_matches_dipy(shared_data, threshold):
    from dipy.segment.bundles import bundle_adjacency as dipy_ba
    from dipy.tracking.streamline import set_number_of_points

    d = shared_data / "real_msmt15"
    a, b = _lines(d / "bundleA_default.tck"), _lines(d / "bundleA_cutoff0.3.tck")
    ref = dipy_ba(set_number_of_points(a, 20), set_number_of_points(b, 20), threshold)
    assert ev.bundle_adjacency(a, b, threshold, 20) == ref
    assert losses_bundle_adjacency(_sl(a), _sl(b), threshold, 20) == ref


def test_buan_matches_dipy(real):
    from dipy.segment.bundles import bundle_shape_similarity

    a, b = real
    ref = bundle_shape_similarity(a, b, np.random.default_rng(3), threshold=6)
    assert ev.buan_shape_similarity(a, b, seed=3) == ref
    assert ev.buan_shape_similarity(a, a) == 1.0
    assert ev.buan_shape_similarity(a, [s + 30.0 for s in a]) == 0.0


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
    res = compare_tractograms(_sl(a[:n]), b[:n], reference=ref, buan=False)
    assert res["count_a"] == res["count_b"] == n
    assert res["dice"] == pytest.approx(_dipy_dice(a[:n], b[:n], ref.data.shape, ref.affine))
    ba = dipy_ba(set_number_of_points(a[:n], 20), set_number_of_points(b[:n], 20), 5.0)
    assert res["bundle_adjacency"] == ba
    ph = np.array([_hausdorff(x, y) for x, y in zip(a[:n], b[:n])])
    assert res["paired_hausdorff_median_mm"] == pytest.approx(np.median(ph))
    assert res["paired_hausdorff_frac_within_1mm"] == pytest.approx(np.mean(ph <= 1.0))
    assert res["pairing"] == "index" and res["paired_count"] == n
    assert res["reference_grid"]["source"] == "reference image"
    assert res["resample"] == 20 and res["n_points"] == 20 and "mam" in res["methods"]
    for key, unit in res["units"].items():
        assert key in res and unit
        assert not key.endswith("_mm") or unit == "mm"
    assert res["units"]["dice"] == "ratio" and res["buan_shape_similarity"] is None
    same = compare_tractograms(a[:50], a[:50], reference=ref)
    assert same["dice"] == 1.0 and same["bundle_adjacency"] == 1.0
    assert same["paired_hausdorff_max_mm"] == 0.0 and same["overreach"] == 0.0
    assert same["buan_shape_similarity"] == 1.0


def test_compare_raw_vertices_is_dipy_on_the_vertices(real):
    """--resample none: bundle-level MAM is DIPY's bundles_distances_mam on the raw vertices."""
    from dipy.tracking.distances import bundles_distances_mam

    a, b = real[0][:40], real[1][:30]
    raw = compare_tractograms(a, b, resample=None, buan=False)
    mam = bundles_distances_mam(a, b)
    assert raw["resample"] is None
    assert raw["bundle_mam_a_to_b_mean_mm"] == pytest.approx(mam.min(1).mean(), rel=1e-12)
    assert raw["bundle_mam_b_to_a_median_mm"] == pytest.approx(np.median(mam.min(0)))
    h = np.array([[_hausdorff(x, y) for y in b] for x in a])
    assert raw["bundle_hausdorff_a_to_b_mean_mm"] == pytest.approx(h.min(1).mean(), rel=1e-12)
    sampled = compare_tractograms(a, b, resample=20, buan=False)
    assert sampled["bundle_mam_a_to_b_mean_mm"] != raw["bundle_mam_a_to_b_mean_mm"]


def test_seed_pairing_with_unequal_counts(shared_data):
    d = shared_data / "real_msmt15"
    a, b = _lines(d / "bundleA_default.tck"), _lines(d / "bundleA_cutoff0.3.tck")
    assert (len(a), len(b)) == (214, 210)
    sa = _seeds(d / "bundleA_default_seeds.txt", len(a))
    sb = _seeds(d / "bundleA_cutoff0.3_seeds.txt", len(b))
    ia, ib = ev.pair_by_seeds(sa, sb)
    assert len(ia) >= 200 and np.all(np.abs(sa[ia] - sb[ib]) < 1e-4)
    res = compare_tractograms(a, b, seeds=(sa, sb), buan=False)
    assert res["pairing"] == "seeds" and res["paired_count"] == len(ia)
    ph = np.array([_hausdorff(a[i], b[j]) for i, j in zip(ia, ib)])
    assert res["paired_hausdorff_median_mm"] == pytest.approx(np.median(ph))
    assert res["paired_hausdorff_max_mm"] == pytest.approx(ph.max())
    unpaired = compare_tractograms(a, b, buan=False)
    assert unpaired["paired_hausdorff_median_mm"] is None and unpaired["pairing"] is None
    with pytest.raises(SpaceError, match="seeds of B"):
        compare_tractograms(a, b, seeds=(sa, sb[:5]), buan=False)


def test_compare_without_reference_and_sample(shared_data):
    d = shared_data / "phantom_cross90"
    a, b = _lines(d / "bundleB_default.tck")[:40], _lines(d / "bundleB_cutoff1.0.tck")[:30]
    res = compare_tractograms(_sl(a), _sl(b), bundle_sample=10, buan=False)
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
    with pytest.raises(EmptyTractogramError):
        compare_tractograms([line], Streamlines.empty(dtype=torch.float64))
    with pytest.raises(SpaceError, match="do not overlap"):
        compare_tractograms([line], [line + 500.0])
    from invtract.io.image import load_image

    ref = load_image(shared_data / "real_msmt15" / "mask.nii.gz")
    with pytest.raises(SpaceError, match="does not cover"):
        compare_tractograms([line + 300.0], [line + 300.0], reference=ref)
    assert issubclass(SpaceError, InvtractError)
    assert issubclass(EmptyTractogramError, InvtractError)
