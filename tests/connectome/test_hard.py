"""Hard connectome vs MRtrix3 tck2connectome: committed fixtures, and live when MRtrix is here."""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from connectome_data import FIXTURES, PARCELLATION_SPECS, build_parcellation

from invtract.cli import main
from invtract.io.image import load_image
from invtract.io.tractogram import load_tractogram
from invtract.losses.connectome import (
    assign_endpoints,
    connectome_matrix,
    csv_delimiter,
    format_connectome,
    radial_search_offsets,
)
from invtract.streamlines import Streamlines

TRACTS = {
    "phantom_whole": ("phantom_cross90", "whole.tck"),
    "phantom_bundleB": ("phantom_cross90", "bundleB_default.tck"),
    "real_whole": ("real_msmt15", "whole.tck"),
    "real_bundleA": ("real_msmt15", "bundleA_default.tck"),
}
#: variant -> invtract CLI options (tck2connectome spelling in make_fixtures.py)
VARIANTS = {
    "r4": [],
    "r2": ["--assignment-radial-search", "2"],
    "r4_symmetric": ["--symmetric"],
    "r4_zerodiag": ["--zero-diagonal"],
    "r4_keep": ["--keep-unassigned"],
    "r2_symmetric_zerodiag_keep": [
        "--assignment-radial-search", "2", "--symmetric", "--zero-diagonal", "--keep-unassigned",
    ],
}  # fmt: skip
HAVE_MRTRIX = shutil.which("tck2connectome") is not None


def _parc(case):
    return FIXTURES / f"{case}_parc.nii.gz"


@pytest.fixture(scope="module")
def tracts(shared_data):
    return {k: load_tractogram(shared_data / c / f) for k, (c, f) in TRACTS.items()}


@pytest.mark.parametrize("case", sorted(PARCELLATION_SPECS))
def test_committed_parcellations_are_reproducible(case, shared_data, parcellations):
    committed = nib.load(str(_parc(case)))
    built = nib.load(str(parcellations[case]))
    assert committed.get_data_dtype() == built.get_data_dtype()
    np.testing.assert_array_equal(np.asanyarray(committed.dataobj), np.asanyarray(built.dataobj))
    np.testing.assert_array_equal(committed.affine, built.affine)
    block, skip, _ = PARCELLATION_SPECS[case]
    mask = np.asanyarray(nib.load(str(shared_data / case / "mask.nii.gz")).dataobj)
    labels = build_parcellation(mask, block, skip)
    assert set(np.unique(labels[mask > 0])).isdisjoint(set(skip) | {0})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("tract", sorted(TRACTS))
def test_cli_matches_tck2connectome_fixture(tract, variant, shared_data, tmp_path):
    case, tck = TRACTS[tract]
    out = tmp_path / "out.csv"
    rc = main(["-q", "connectome", str(shared_data / case / tck), str(_parc(case)), str(out)]
              + VARIANTS[variant])  # fmt: skip
    assert rc == 0
    assert out.read_text() == (FIXTURES / f"{tract}_{variant}.csv").read_text()


@pytest.mark.parametrize(
    ("tract", "variant", "radius"),
    [("phantom_whole", "r4", 4.0), ("phantom_whole", "r2", 2.0), ("real_bundleA", "r2", 2.0)],
)
def test_assignments_match_tck2connectome(tract, variant, radius, tracts):
    ref = np.loadtxt(FIXTURES / f"{tract}_{variant}_assign.txt", dtype=np.int64, comments="#")
    got = assign_endpoints(tracts[tract], load_image(_parc(TRACTS[tract][0])), radius)
    np.testing.assert_array_equal(got, ref)


def test_edge_cases_ties_halves_single_vertex_outside():
    sl = load_tractogram(FIXTURES / "edge_cases.tck")
    labels = load_image(_parc("phantom_cross90"))
    ref = np.loadtxt(FIXTURES / "edge_cases_r4_assign.txt", dtype=np.int64, comments="#")
    np.testing.assert_array_equal(assign_endpoints(sl, labels), ref)
    text = format_connectome(connectome_matrix(sl, labels, keep_unassigned=True))
    assert text == (FIXTURES / "edge_cases_r4_keep.csv").read_text()


@pytest.mark.parametrize("tract", ["phantom_whole", "real_whole"])
def test_library_options_match_fixtures(tract, tracts):
    labels = load_image(_parc(TRACTS[tract][0]))
    m = connectome_matrix(tracts[tract], labels, assignment="end_voxels")
    assert format_connectome(m) == (FIXTURES / f"{tract}_endvoxels.csv").read_text()
    m = connectome_matrix(tracts[tract], labels, scale_invnodevol=True)
    assert format_connectome(m) == (FIXTURES / f"{tract}_invnodevol.csv").read_text()


def test_list_input_weights_and_empty_streamline():
    labels = (np.array([[[0, 1], [2, 0]], [[0, 0], [0, 3]]]), np.eye(4))
    lines = [np.array([[0.0, 0, 1], [1, 1, 1]]), np.zeros((0, 3)), np.array([[0.0, 1, 0]])]
    np.testing.assert_array_equal(assign_endpoints(lines, labels, 0.5), [[1, 3], [0, 0], [2, 2]])
    sl = Streamlines.from_list([lines[0], lines[2]], dtype=torch.float64)
    m = connectome_matrix(sl, labels, 0.5, weights=np.array([2.0, 0.5]), keep_unassigned=True)
    expected = np.zeros((4, 4))
    expected[1, 3], expected[2, 2] = 2.0, 0.5
    np.testing.assert_array_equal(m, expected)
    full = connectome_matrix(lines, labels, 0.5, keep_unassigned=True)
    assert full[0, 0] == 1.0  # the vertex-less streamline is (0, 0)


def test_radial_offsets_order_and_delimiters():
    off = radial_search_offsets((2.0, 2.0, 2.0), 4.0)
    assert off[0].tolist() == [0, 0, 0]
    assert off[1:7].tolist() == [[0, 0, -1], [0, -1, 0], [-1, 0, 0], [1, 0, 0], [0, 1, 0],
                                 [0, 0, 1]]  # fmt: skip
    assert np.all(np.linalg.norm(off * 2.0, axis=1) < 4.0 + np.sqrt(3.0))
    assert [csv_delimiter(p) for p in ("a.csv", "a.tsv", "a.txt")] == [",", "\t", " "]
    assert format_connectome(np.array([[0.0, 2.0], [0.0, 0.25]])) == "0,2\n0,0.25\n"


@pytest.mark.skipif(not HAVE_MRTRIX, reason="MRtrix3 tck2connectome not on PATH")
@pytest.mark.parametrize(
    ("tract", "tool_opts", "cli_opts"),
    [
        (
            "real_whole",
            ["-assignment_radial_search", "3.3"],
            ["--assignment-radial-search", "3.3"],
        ),
        (
            "phantom_whole",
            ["-symmetric", "-keep_unassigned"],
            ["--symmetric", "--keep-unassigned"],
        ),
        ("real_bundleA", ["-zero_diagonal"], ["--zero-diagonal"]),
    ],
)
def test_live_tck2connectome(tract, tool_opts, cli_opts, shared_data, parcellations, tmp_path):
    case, tck = TRACTS[tract]
    ref, out = tmp_path / "ref.csv", tmp_path / "out.csv"
    subprocess.run(
        ["tck2connectome", str(shared_data / case / tck), str(parcellations[case]), str(ref),
         "-quiet", "-nthreads", "0", *tool_opts],
        check=True,
    )  # fmt: skip
    rc = main(["-q", "connectome", str(shared_data / case / tck), str(parcellations[case]),
               str(out), *cli_opts])  # fmt: skip
    assert rc == 0
    assert out.read_text() == ref.read_text()
