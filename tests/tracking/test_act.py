"""Anatomically-constrained tracking (tckgen -act) against MRtrix3 3.0.3.

The references: ``../shared/data/sift_phantom`` (binary 5TT; ``act_grid_cutoff0.2``,
``act_grid_crop``, ``act_gmwmi``) and ``tests/data/act`` (a partial-volume 5TT with a CSF and a
pathology block, so that streamlines enter CSF and are rejected; a 5TT with sub-cortical GM
blocks, so that streamlines exit SGM and are truncated; ``commands.txt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from invtract.errors import ShapeError
from invtract.io.image import Image, load_fod, save_mif
from invtract.io.tractogram import load_tractogram_header
from invtract.params import TrackingParameters
from invtract.tracking import fused_cpu, rules
from invtract.tracking.act import act_from_header, act_parameters, load_act
from invtract.tracking.types import Reject, Term

from .reference_data import need_data

LOCAL = Path(__file__).resolve().parents[1] / "data" / "act"
numba_only = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")


# ---------------------------------------------------------------- rules (ACT/tissues.h, exec.h)


def test_tissue_classes_follow_tissues_h_ties():
    # ties: CSF wins against everything; CGM wins against SGM and WM but not CSF / path
    assert rules.is_csf(0.5, 0.0, 0.0, 0.5, 0.0) and not rules.is_cgm(0.5, 0.0, 0.0, 0.5, 0.0)
    assert rules.is_cgm(0.5, 0.0, 0.5, 0.0, 0.0) and not rules.is_wm(0.5, 0.0, 0.5, 0.0, 0.0)
    assert rules.is_sgm(0.2, 0.4, 0.4, 0.0, 0.0) and not rules.is_sgm(0.4, 0.4, 0.2, 0.0, 0.0)
    assert rules.is_path(0.0, 0.0, 0.4, 0.2, 0.4) and not rules.is_path(0, 0, 0, 0.5, 0.5)
    # GM = CGM + SGM against WM
    assert rules.is_gm(0.3, 0.2, 0.5, 0.0, 0.0) and not rules.is_gm(0.3, 0.1, 0.5, 0.0, 0.1)


def test_act_seed_test():
    assert rules.act_seed_ok(0.0, 0.0, 1.0, 0.0, 0.0)  # WM
    assert rules.act_seed_ok(0.0, 0.6, 0.4, 0.0, 0.0)  # SGM seeds are allowed
    assert not rules.act_seed_ok(0.0, 0.0, 0.5, 0.5, 0.0)  # CSF (tie)
    assert not rules.act_seed_ok(1.0, 0.0, 0.0, 0.0, 0.0)  # no WM
    assert rules.act_seed_ok(0.505, 0.0, 0.4999, 0.0, 0.0)  # GM - WM < 0.01
    assert not rules.act_seed_ok(0.52, 0.0, 0.48, 0.0, 0.0)  # GM - WM >= 0.01


@pytest.mark.parametrize(
    "term, sgm_depth, path, expected",
    [
        (Term.ENTER_CGM, 0, False, (Term.ENTER_CGM, False)),
        (Term.EXIT_IMAGE, 0, False, (Term.EXIT_IMAGE, False)),
        (Term.ENTER_CSF, 0, False, (Term.ENTER_CSF, True)),
        (Term.LENGTH_EXCEED, 0, False, (Term.LENGTH_EXCEED, True)),
        (Term.MODEL, 0, False, (Term.MODEL, True)),
        (Term.MODEL, 0, True, (Term.MODEL, False)),  # stopping in pathology is fine
        (Term.HIGH_CURVATURE, 2, False, (Term.TERM_IN_SGM, False)),
    ],
)
def test_act_priors(term, sgm_depth, path, expected):
    t, excluded = rules.act_priors(int(term), sgm_depth, path)
    assert (t, excluded) == (int(expected[0]), expected[1])


def test_exclusion_reasons():
    assert rules.act_exclusion_reason(int(Term.ENTER_CSF)) == Reject.ACT_POOR_TERMINATION
    assert rules.act_exclusion_reason(int(Term.MODEL)) == Reject.ACT_POOR_TERMINATION
    assert rules.act_exclusion_reason(int(Term.LENGTH_EXCEED)) == Reject.TRACK_TOO_LONG
    assert rules.act_exclusion_reason(int(Term.ENTER_EXCLUDE)) == Reject.ENTER_EXCLUDE_REGION


def test_act_defaults_match_the_tckgen_header():
    folder = need_data("sift_phantom")
    header = load_tractogram_header(folder / "act_grid_crop.tck")  # tckgen's ACT defaults
    fod = load_fod(folder / "fods.mif")
    p = act_parameters(TrackingParameters(), fod.voxel_sizes).resolve(fod.voxel_sizes)
    assert np.float32(p.cutoff) == np.float32(header["threshold"])
    assert np.float32(p.min_length_mm) == np.float32(header["min_dist"])
    # explicit values win
    q = act_parameters(TrackingParameters(cutoff=0.2, min_length_mm=7.0), fod.voxel_sizes)
    assert (q.cutoff, q.min_length_mm) == (0.2, 7.0)


# ---------------------------------------------------------------- the 5TT image


def test_load_act_keeps_mrtrix_axis_order():
    image = load_act(need_data("sift_phantom", "5tt.mif"))
    assert image.data.shape == (28, 10, 18, 5)  # mrinfo's dimensions (strides 1,3,2)
    assert np.allclose(image.scanner2voxel[:, :3], np.eye(3))  # identity transform
    assert not image.has_sgm


def test_load_act_rejects_non_5tt(tmp_path):
    bad = tmp_path / "four.mif"
    save_mif(bad, Image(np.zeros((3, 3, 3, 4), np.float32), np.eye(4), (1.0, 1.0, 1.0)))
    with pytest.raises(ShapeError, match="5 volumes"):
        load_act(bad)


# ---------------------------------------------------------------- tckgen parity (numba)


def _replay(tck: Path, fod: Path):
    from invtract.tracking.reference import replay_reference

    header = load_tractogram_header(tck)
    act = act_from_header(header, tck.parent)
    assert act is not None
    return replay_reference(tck, fod, 20240601, engine="numba", act=act)


@numba_only
@pytest.mark.parametrize("name", ["act_grid_cutoff0.2", "act_grid_crop"])
def test_shared_grid_references_bit_identical(name):
    folder = need_data("sift_phantom")
    r = _replay(folder / f"{name}.tck", folder / "fods.mif")
    assert (r["kept"], r["generated"]) == (r["ref_kept"], r["ref_generated"])
    assert r["n"] == 389 and r["frac_bit_exact"] == 1.0


@numba_only
@pytest.mark.parametrize("name", ["act_grid_pv", "act_grid_pv_crop"])
def test_partial_volume_references_bit_identical(name):
    r = _replay(LOCAL / f"{name}.tck", need_data("sift_phantom", "fods.mif"))
    assert (r["kept"], r["generated"]) == (r["ref_kept"], r["ref_generated"]) == (36, 43)
    assert r["frac_bit_exact"] == 1.0


@numba_only
@pytest.mark.parametrize(
    "name, kept", [("act_grid_pv_ds3", 36), ("act_grid_pv_crop_ds4_max24", 11)]
)
def test_downsample_references_bit_identical(name, kept):
    """-downsample with ACT: downsampled after tracking (and cropping), then the length check,
    which rejects over-long streamlines under ACT (-maxlength 24.01 keeps 11 of 36)."""
    r = _replay(LOCAL / f"{name}.tck", need_data("sift_phantom", "fods.mif"))
    assert (r["kept"], r["generated"]) == (r["ref_kept"], r["ref_generated"]) == (kept, 43)
    assert r["frac_bit_exact"] == 1.0


@numba_only
@pytest.mark.parametrize(
    "name, kept, generated", [("act_grid_sgm", 47, 47), ("act_grid2_sgm_crop", 376, 389)]
)
def test_subcortical_gm_references_bit_identical(name, kept, generated):
    """tckgen -info: 37.2 % / 34.4 % of the terminations are "Exiting sub-cortical GM"."""
    r = _replay(LOCAL / f"{name}.tck", need_data("sift_phantom", "fods.mif"))
    assert (r["kept"], r["generated"]) == (r["ref_kept"], r["ref_generated"]) == (kept, generated)
    assert r["frac_bit_exact"] == 1.0


@numba_only
def test_fod_amplitude_is_the_sh_series():
    """The EXIT_SGM truncation metric (``PrecomputedAL::value``: Legendre table interpolated
    between 512 elevations) against a float64 SH series (README's basis), to the table's
    interpolation error."""
    from invtract.tracking.act_cpu import _amplitude
    from invtract.tracking.fused_cpu import _FP_INC, _kernel_inputs

    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    params = TrackingParameters().resolve(fod.voxel_sizes)
    one = np.ones((1, 3), np.float32)
    k = _kernel_inputs(fod.data, fod.scanner2voxel, one, one, params, None)
    fp, _, lut, zint, _, pint, _, mstart = k.consts
    rng = np.random.default_rng(3)
    data = np.asarray(fod.data)
    c = np.ascontiguousarray(data.reshape(-1, data.shape[-1])[np.argmax(data[..., 0])])
    assert c[0] > 0.1
    for _ in range(20):
        u = rng.normal(size=3)
        u = (u / np.linalg.norm(u)).astype(np.float32)
        ours = _amplitude(c, u[0], u[1], u[2], lut, fp[_FP_INC], zint, pint, mstart, 8)
        ref = _sh_amplitude(c.astype(np.float64), u.astype(np.float64), 8)
        assert abs(float(ours) - ref) < 5e-4 * max(1.0, abs(ref))


def _sh_amplitude(c: np.ndarray, u: np.ndarray, lmax: int) -> float:
    from math import factorial

    from scipy.special import lpmv

    cos_t, phi = u[2], np.arctan2(u[1], u[0])
    v = 0.0
    for l in range(0, lmax + 1, 2):
        for m in range(-l, l + 1):
            a = abs(m)
            n = np.sqrt((2 * l + 1) / (4 * np.pi) * factorial(l - a) / factorial(l + a))
            y = n * lpmv(a, l, cos_t)
            if m > 0:
                y *= np.sqrt(2) * np.cos(m * phi)
            elif m < 0:
                y *= np.sqrt(2) * np.sin(a * phi)
            v += c[l * (l + 1) // 2 + m] * y
    return float(v)


@numba_only
def test_rejections_in_mrtrix_categories():
    """tckgen -info for act_grid_pv: 101 invalid seeds, 7 poor structural terminations; 83
    terminations: entered cortical GM 91.6 % (76), entered CSF 8.43 % (7)."""
    from invtract.fod.field import FODField
    from invtract.io.image import load_mask
    from invtract.tracking.api import Seeding, track

    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    mask = load_mask(LOCAL / "mask.mif")
    res = track(
        FODField.from_image(fod),
        Seeding("grid", mask=np.asarray(mask.data, bool), affine=mask.affine, count=1),
        TrackingParameters(),
        engine="numba",
        rng_seed=20240601,
        act=load_act(LOCAL / "5tt_pv.mif"),
    )
    assert res.summary["rejected"] == {
        "Invalid seed point": 101,
        "Poor structural termination": 7,
    }
    assert res.summary["terminations"] == {
        "Entered cortical grey matter": 76,
        "Entered CSF": 7,
    }


@numba_only
def test_gmwmi_seeds_replayed_from_their_points():
    """-seed_gmwmi reference re-tracked from its seeds file (directions from the points)."""
    from invtract.tracking.reference import compare_reference

    folder = need_data("sift_phantom")
    tck = folder / "act_gmwmi.tck"
    act = act_from_header(load_tractogram_header(tck), folder)
    r = compare_reference(tck, folder / "act_gmwmi_seeds.txt", folder / "fods.mif",
                          engine="numba", act=act, limit=400)  # fmt: skip
    assert r["frac_same_count"] == 1.0
    assert r["frac_hausdorff_lt_0.1"] == 1.0


# ---------------------------------------------------------------- invtract track --act


@numba_only
def test_cli_track_act_crop_matches_tckgen(tmp_path):
    from invtract.cli import main

    nib = pytest.importorskip("nibabel")
    folder = need_data("sift_phantom")
    out = tmp_path / "act.tck"
    argv = ["track", str(folder / "fods.mif"), str(out), "--act", str(folder / "5tt.mif"),
            "--crop-at-gmwmi", "--seed-grid-per-voxel", str(folder / "mask.mif"), "2",
            "--rng-seed", "20240601"]  # fmt: skip
    assert main(argv) == 0
    ours = nib.streamlines.load(str(out))
    ref = nib.streamlines.load(str(folder / "act_grid_crop.tck"))
    assert len(ours.streamlines) == len(ref.streamlines) == 389
    for a, b in zip(ours.streamlines, ref.streamlines):
        np.testing.assert_array_equal(a, b)
    assert ours.header.get("crop_at_gmwmi") == "1"


def test_cli_crop_without_act_is_refused(tmp_path):
    from invtract.cli import main

    folder = need_data("sift_phantom")
    argv = ["track", str(folder / "fods.mif"), str(tmp_path / "x.tck"), "--crop-at-gmwmi",
            "--seed-grid-per-voxel", str(folder / "mask.mif"), "1"]  # fmt: skip
    assert main(argv) != 0
