"""ACT in the torch engine (:mod:`invtract.tracking.act_torch`) against the numba ACT kernel
(bit-identical to tckgen) on the ACT references of ``tests/data/act``, and its vectorised
tissue tests against the rulebook's scalar ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from invtract.tracking import fused_cpu, rules
from invtract.tracking.act_torch import tissue_classes

from .reference_data import need_data

LOCAL = Path(__file__).resolve().parents[1] / "data" / "act"
numba_only = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not available")


def test_vectorised_tissue_tests_are_the_rulebooks():
    """Random tissues with many exact ties (values from a coarse grid)."""
    rng = np.random.default_rng(0)
    tis = (rng.integers(0, 5, size=(4000, 5)) / 4).astype(np.float32)
    tis[:100] = np.float32([0.3, 0.3, 0.3, 0.0, 0.0])
    tis[100:200, 2] = tis[100:200, 0] + tis[100:200, 1] - np.float32(0.00999)
    k = {n: v.numpy() for n, v in tissue_classes(torch.as_tensor(tis)).items()}
    for i, t in enumerate(tis):
        t = tuple(np.float32(v) for v in t)
        assert k["is_csf"][i] == rules.is_csf(*t)
        assert k["is_sgm"][i] == rules.is_sgm(*t)
        assert k["is_gm"][i] == rules.is_gm(*t)
        assert k["is_path"][i] == rules.is_path(*t)
        assert k["seed_ok"][i] == rules.act_seed_ok(*t)


def _both(tt: str, crop: bool, **params):
    from invtract.fod.field import FODField
    from invtract.io.image import load_fod, load_mask
    from invtract.params import TrackingParameters
    from invtract.tracking.act import load_act
    from invtract.tracking.api import Seeding, track

    fod = load_fod(need_data("sift_phantom", "fods.mif"))
    field = FODField.from_image(fod)
    act = load_act(LOCAL / tt, crop_at_gmwmi=crop)
    seeding = Seeding.from_mask("grid", load_mask(LOCAL / "mask.mif"), 1)
    return [
        track(
            field,
            seeding,
            TrackingParameters(**params),
            engine=e,
            rng_seed=20240601,
            act=act,
        )  # fmt: skip
        for e in ("numba", "torch")
    ]


def _close(a, b) -> int:
    la, lb = a.streamlines.to_list(), b.streamlines.to_list()
    assert len(la) == len(lb)
    return sum(x.shape == y.shape and float(np.abs(x - y).max()) < 1e-5 for x, y in zip(la, lb))


@numba_only
@pytest.mark.slow
def test_partial_volume_crop_reference_within_1e5_mm():
    """act_grid_pv_crop (CSF and pathology blocks, -crop_at_gmwmi): 36 / 36 within 1e-5 mm
    of the numba kernel (so of tckgen), the same rejections and terminations."""
    a, b = _both("5tt_pv.mif", True)
    assert _close(a, b) == 36
    assert a.summary["rejected"] == b.summary["rejected"]
    assert a.summary["terminations"] == b.summary["terminations"]


@numba_only
@pytest.mark.slow
def test_subcortical_reference_within_1e5_mm():
    """act_grid_sgm: the same counts in every ACT category; 45 / 47 within 1e-5 mm. The other
    two end in an EXIT_SGM truncation whose minimum FOD amplitude is a tie decided by the
    last bit (the phantom's FOD is the same in every voxel along the bundle), and the torch
    engine's positions differ from tckgen's by ~1e-8 mm."""
    a, b = _both("5tt_sgm.mif", False)
    assert _close(a, b) >= 45
    assert a.summary["rejected"] == b.summary["rejected"]
    assert a.summary["terminations"] == b.summary["terminations"]


@numba_only
@pytest.mark.slow
def test_cli_torch_engine_with_act(tmp_path):
    """``invtract track --act ... --engine torch``: tckgen's act_grid_pv_crop within 1e-5 mm."""
    from invtract.cli import main
    from invtract.io.tractogram import load_tractogram

    out = tmp_path / "t.tck"
    argv = ["track", str(need_data("sift_phantom", "fods.mif")), str(out), "-act",
            str(LOCAL / "5tt_pv.mif"), "-crop_at_gmwmi", "-seed_grid_per_voxel",
            str(LOCAL / "mask.mif"), "1", "-nthreads", "0", "--rng-seed", "20240601",
            "--engine", "torch", "-quiet"]  # fmt: skip
    assert main(argv) in (0, None)
    ours = load_tractogram(out).to_list()
    refs = load_tractogram(LOCAL / "act_grid_pv_crop.tck").to_list()
    assert len(ours) == len(refs) == 36
    assert all(a.shape == b.shape and np.abs(a - b).max() < 1e-5 for a, b in zip(ours, refs))


@numba_only
@pytest.mark.parametrize(
    "crop, extra, kept",
    [(False, {"downsample": 3}, 36), (True, {"downsample": 4, "max_length_mm": 24.01}, 11)],
)
def test_downsample_with_act_as_numba(crop, extra, kept):
    """-downsample with ACT (references act_grid_pv_ds3 / act_grid_pv_crop_ds4_max24, where the
    numba kernel is bit-identical to tckgen): the torch engine downsamples before the length
    check and rejects over-long streamlines; every streamline within 1e-5 mm of numba's."""
    a, b = _both("5tt_pv.mif", crop, **extra)
    assert len(a.streamlines) == kept
    assert _close(a, b) == kept
    assert a.summary["rejected"] == b.summary["rejected"]
    np.testing.assert_array_equal(a.seed_index, b.seed_index)
