"""tck2connectome's scaling, statistic, weight and assignment-output options, byte for byte.

Fixtures: ``tests/data/connectome/{real_whole,sift_gmwmi}_*.csv`` made by
``make_fixtures.py --options-only`` (commands in the README there); the live tests rerun
tck2connectome when MRtrix3 is installed.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from connectome_data import FIXTURES, REPO

from invtract.cli import main
from invtract.errors import ConfigError, FormatError
from invtract.evaluation.connectome import (
    connectome_matrix,
    format_connectome,
    mrtrix_lengths,
    read_vector,
)
from invtract.evaluation.tracks import Packed, load_packed

sys.path.insert(0, str(FIXTURES))
from make_fixtures import OPTION_TRACTS, OPTION_VARIANTS  # noqa: E402

HAVE_MRTRIX = shutil.which("tck2connectome") is not None


def _ours(mrtrix_opts: list[str]) -> list[str]:
    """tck2connectome options in invtract's spelling (``-stat_edge`` -> ``--stat-edge``)."""
    out = []
    for o in mrtrix_opts:
        is_flag = o.startswith("-") and not o[1:2].isdigit()
        out.append("--" + o[1:].replace("_", "-") if is_flag else o)
    return out


def _case(prefix: str, shared: Path):
    case, tck, parc = OPTION_TRACTS[prefix]
    vectors = {
        "w": str(FIXTURES / f"{prefix}_weights.txt"),
        "v": str(FIXTURES / f"{prefix}_scale.txt"),
    }
    return shared / case / tck, (REPO / parc).resolve(), vectors


@pytest.mark.parametrize("variant", sorted(OPTION_VARIANTS))
@pytest.mark.parametrize("prefix", sorted(OPTION_TRACTS))
def test_cli_options_match_tck2connectome(prefix, variant, shared_data, tmp_path):
    tck, parc, vectors = _case(prefix, shared_data)
    opts = [o.format(**vectors) for o in OPTION_VARIANTS[variant]]
    out = tmp_path / "out.csv"
    assert main(["-q", "connectome", str(tck), str(parc), str(out), *_ours(opts)]) == 0
    assert out.read_bytes() == (FIXTURES / f"{prefix}_{variant}.csv").read_bytes()


@pytest.mark.parametrize("prefix", sorted(OPTION_TRACTS))
def test_out_assignments_match(prefix, shared_data, tmp_path):
    tck, parc, vectors = _case(prefix, shared_data)
    out, assign = tmp_path / "c.csv", tmp_path / "a.txt"
    args = ["connectome", str(tck), str(parc), str(out), "--out-assignments", str(assign)]
    assert main(["-q", *args, "--tck-weights-in", vectors["w"]]) == 0
    got = assign.read_text().splitlines()
    ref = (FIXTURES / f"{prefix}_assign.txt").read_text().splitlines()
    assert got[0].startswith("# invtract -q connectome ") and ref[0].startswith("# tck2connectome")
    assert got[1:] == ref[1:] and len(got) == len(load_packed(tck)) + 1
    assert out.read_bytes() == (FIXTURES / f"{prefix}_weights.csv").read_bytes()


def test_lengths_are_mrtrix_float32_sums():
    """One segment of known length, and the Eigen summation order on a case it matters."""
    pts = np.array([[0, 0, 0], [3, 4, 0], [3, 4, 12]], np.float32)
    lens = mrtrix_lengths(Packed(pts, np.array([3])))
    assert lens.dtype == np.float32 and lens[0] == 17.0
    assert np.isnan(mrtrix_lengths(Packed(pts[:0], np.array([0])))[0])
    assert mrtrix_lengths(Packed(pts[:1], np.array([1])))[0] == 0.0
    # the float32 norm order sqrt(x^2 + (y^2 + z^2)) vs ((x^2 + y^2) + z^2) differ here
    d = np.array([-0.12, -0.05, -0.28], np.float32)
    x, y, z = d * d
    assert np.sqrt(x + (y + z)) != np.sqrt((x + y) + z)
    two = Packed(np.stack([np.zeros(3, np.float32), d]), np.array([2]))
    assert mrtrix_lengths(two)[0] == np.sqrt(x + (y + z))


def test_statistics_and_weights_by_hand():
    labels = (np.array([[[1, 0, 2]]]), np.eye(4))
    lines = [np.array([[0.0, 0, 0], [0, 0, 2]]), np.array([[0.0, 0, 0], [0, 0, 1], [0, 0, 2]])]
    lines.append(np.array([[0.0, 0, 0], [0, 0, 0.5]]))  # node 1 <-> 0 (end 0.5 mm away)
    kw = {"radius_mm": 0.4, "keep_unassigned": False}
    w = np.array([2.0, 0.5, 1.0])
    total = connectome_matrix(lines, labels, **kw, weights=w, scale="length")
    assert total[0, 1] == 2 * 2.0 + 0.5 * 2.0 and total[0, 0] == 0.0  # 0.5 mm end: unassigned
    mean = connectome_matrix(lines, labels, **kw, weights=w, statistic="mean")
    assert mean[0, 1] == 1.0
    lo = connectome_matrix(lines, labels, **kw, scale_values=[3.0, 1.5, 9.0], statistic="min")
    assert lo[0, 1] == 1.5 and np.isnan(lo[0, 0]) and lo[1, 0] == 0.0
    assert format_connectome(lo) == "nan,1.5\n0,nan\n"
    big = connectome_matrix(lines, (np.array([[[1, 0, 1030]]]), np.eye(4)), 0.4)
    assert big.dtype == np.float32 and format_connectome(big[:1, -1:]) == "2\n"


def test_read_vector_formats(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("# c\n1, 2;3\t4\n")
    np.testing.assert_array_equal(read_vector(p), [1, 2, 3, 4])
    p.write_text("1\n2 # two\n\n3\n")
    np.testing.assert_array_equal(read_vector(p), [1, 2, 3])
    for bad in ("1 2\n3 4\n", "1 2\n3\n", "# nothing\n", "1 x\n"):
        p.write_text(bad)
        with pytest.raises(FormatError):
            read_vector(p)


def test_option_errors(tmp_path, capsys, shared_data):
    tck, parc, vectors = _case("sift_gmwmi", shared_data)
    out = tmp_path / "o.csv"
    short = tmp_path / "short.txt"
    short.write_text("1 2 3\n")
    base = ["-q", "connectome", str(tck), str(parc), str(out)]
    assert main([*base, "--tck-weights-in", str(short)]) == 1
    assert "3 values for 2000 streamlines" in capsys.readouterr().err
    assert main([*base, "--scale-file", str(tmp_path / "none.txt")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--out-assignments", str(out)]) == 1
    assert not out.exists()
    for clash in (["--scale-length", "--scale-invlength"],
                  ["--assignment-end-voxels", "--assignment-radial-search", "3"]):  # fmt: skip
        with pytest.raises(SystemExit):
            main([*base, *clash])
    with pytest.raises(ConfigError):
        connectome_matrix([np.zeros((2, 3))], (np.ones((1, 1, 1)), np.eye(4)), statistic="median")


def _all_combinations():
    assignment = [[], ["-assignment_radial_search", "2.7"], ["-assignment_end_voxels"]]
    scale = [[], ["-scale_length"], ["-scale_invlength"]]
    invnodevol = [[], ["-scale_invnodevol"]]
    scale_file = [[], ["-scale_file", "{v}"]]
    weights = [[], ["-tck_weights_in", "{w}"]]
    stat = [["-stat_edge", s] for s in ("sum", "mean", "min", "max")]
    layout = [[], ["-symmetric", "-zero_diagonal"], ["-keep_unassigned"]]
    for parts in itertools.product(assignment, scale, invnodevol, scale_file, weights, stat,
                                   layout):  # fmt: skip
        yield [o for part in parts for o in part]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MRTRIX, reason="MRtrix3 tck2connectome not on PATH")
@pytest.mark.parametrize("prefix", sorted(OPTION_TRACTS))
def test_live_every_option_combination(prefix, shared_data, tmp_path):
    """All 864 combinations of assignment x scaling x file x weights x statistic x layout."""
    tck, parc, vectors = _case(prefix, shared_data)
    ref, out = tmp_path / "ref.csv", tmp_path / "out.csv"
    failed = []
    for opts in _all_combinations():
        opts = [o.format(**vectors) for o in opts]
        subprocess.run(["tck2connectome", str(tck), str(parc), str(ref), "-quiet", "-force",
                        "-nthreads", "0", *opts], check=True)  # fmt: skip
        rc = main(["-q", "connectome", str(tck), str(parc), str(out), "--force", *_ours(opts)])
        if rc != 0 or out.read_bytes() != ref.read_bytes():
            failed.append(" ".join(opts))
    assert not failed, failed[:5]


@pytest.mark.skipif(not HAVE_MRTRIX, reason="MRtrix3 tck2connectome not on PATH")
def test_live_float32_matrix_from_1024_nodes(shared_data, tmp_path):
    """tck2connectome stores the matrix in float32 (printed to 6 digits) from 1024 nodes."""
    import nibabel as nib

    tck, parc, _ = _case("sift_gmwmi", shared_data)
    from invtract.io.image import load_image

    image = load_image(parc)
    labels = np.asarray(image.data).astype(np.int32)
    labels[labels > 0] += 1100
    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(labels, image.affine), str(path))
    ref, out = tmp_path / "ref.csv", tmp_path / "out.csv"
    opts = ["-scale_length", "-stat_edge", "mean", "-symmetric"]
    subprocess.run(["tck2connectome", str(tck), str(path), str(ref), "-quiet", *opts], check=True)
    assert main(["-q", "connectome", str(tck), str(path), str(out), *_ours(opts)]) == 0
    assert out.read_bytes() == ref.read_bytes()
