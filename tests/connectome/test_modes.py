"""tck2connectome's reverse / forward / all-voxels assignment and ``-vector``, byte for byte.

Fixtures: ``tests/data/connectome/{real_whole,sift_gmwmi}_<mode variant>.csv`` (and
``sift_gmwmi_*_assign.txt``) made by ``make_fixtures.py --modes-only``; ``sift_gmwmi`` is the
ACT phantom's ``act_gmwmi.tck`` with its parcellation.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from connectome_data import FIXTURES, REPO

from invtract.cli import main
from invtract.errors import ConfigError
from invtract.evaluation.connectome import assign_nodes, connectome_matrix, format_assignments
from invtract.evaluation.connectome_modes import node_list_pairs
from invtract.evaluation.tracks import Packed

sys.path.insert(0, str(FIXTURES))
from make_fixtures import MODE_ASSIGNMENTS, MODE_VARIANTS, OPTION_TRACTS  # noqa: E402

HAVE_MRTRIX = shutil.which("tck2connectome") is not None


def _inputs(prefix, shared):
    case, tck, parc = OPTION_TRACTS[prefix]
    weights = str(FIXTURES / f"{prefix}_weights.txt")
    return shared / case / tck, (REPO / parc).resolve(), weights


def _run(prefix, variant, shared, tmp_path, spelling="mrtrix"):
    """Run ``invtract connectome`` with the variant's options; ``(matrix, assignments)``."""
    tck, parc, weights = _inputs(prefix, shared)
    opts = [o.format(w=weights) for o in MODE_VARIANTS[variant]]
    if spelling == "ours":
        opts = ["--" + o[1:].replace("_", "-") if o.startswith("-") else o for o in opts]
    out, assign = tmp_path / "out.csv", tmp_path / "assign.txt"
    argv = ["-q", "connectome", str(tck), str(parc), str(out), *opts]
    assert main([*argv, "--out-assignments", str(assign)]) == 0
    return out, assign


@pytest.mark.parametrize("variant", sorted(MODE_VARIANTS))
@pytest.mark.parametrize("prefix", sorted(OPTION_TRACTS))
def test_modes_match_tck2connectome(prefix, variant, shared_data, tmp_path):
    out, assign = _run(prefix, variant, shared_data, tmp_path)
    ref = FIXTURES / f"{prefix}_{variant}.csv"
    if "vector" in variant:  # first line: "# command_history: <the command>"
        got, want = out.read_text().splitlines(), ref.read_text().splitlines()
        assert got[0].startswith("# command_history: invtract ")
        assert got[1:] == want[1:] and len(want) == 2
    else:
        assert out.read_bytes() == ref.read_bytes()
    if prefix == "sift_gmwmi" and variant in MODE_ASSIGNMENTS:
        ref_assign = (FIXTURES / f"{prefix}_{variant}_assign.txt").read_text().splitlines()
        assert assign.read_text().splitlines()[1:] == ref_assign[1:]


def test_modes_in_our_spelling(shared_data, tmp_path):
    out, _ = _run("real_whole", "reverse3_symmetric", shared_data, tmp_path, spelling="ours")
    assert out.read_bytes() == (FIXTURES / "real_whole_reverse3_symmetric.csv").read_bytes()


def test_modes_differ_from_radial(shared_data):
    """The fixtures discriminate: each mode assigns differently from the default search."""
    tck, parc, _ = _inputs("real_whole", shared_data)
    from invtract.evaluation.tracks import load_packed
    from invtract.io.image import load_image

    tracks, labels = load_packed(tck), load_image(parc)
    radial = assign_nodes(tracks, labels, 4.0)
    for mode, dist in (("reverse", 0.0), ("reverse", 3.0), ("forward", 2.0)):
        nodes = assign_nodes(tracks, labels, dist, assignment=mode)
        assert nodes.shape == radial.shape and (nodes != radial).any(), mode
    lists = assign_nodes(tracks, labels, assignment="all_voxels")
    assert len(lists) == len(tracks) and max(n.size for n in lists) > 2


def _line(*points):
    return np.asarray(points, dtype=np.float32)


def test_reverse_search_by_hand():
    """Labels along x: voxel 1 -> node 1, voxel 5 -> node 2; unit voxels, identity affine."""
    labels = np.zeros((8, 1, 1), np.int64)
    labels[1], labels[5] = 1, 2
    line = _line(*[[x, 0, 0] for x in range(8)])  # vertices in voxels 0..7
    tracks = Packed(line, np.array([8]))
    vol = (labels, np.eye(4))
    # first end: 0 (no label) then 1 -> node 1; last end: 7, 6, 5 -> node 2
    assert assign_nodes(tracks, vol, 0.0, assignment="reverse").tolist() == [[1, 2]]
    # 1 mm allowed: vertex 1 reached (1 mm), vertex 5 not (7 -> 5 is 2 mm)
    assert assign_nodes(tracks, vol, 1.0, assignment="reverse").tolist() == [[1, 0]]
    # the midpoint stops the search: a 3-vertex streamline in voxels 5, 6, 7 only looks at 5, 6
    short = Packed(_line([6, 0, 0], [7, 0, 0], [5, 0, 0]), np.array([3]))
    assert assign_nodes(short, vol, 0.0, assignment="reverse").tolist() == [[0, 2]]


def test_forward_search_by_hand():
    """A streamline heading +x ends in voxel 2; node 2 lies 3 voxels ahead, node 1 behind."""
    labels = np.zeros((9, 3, 3), np.int64)
    labels[0, 1, 1], labels[5, 1, 1] = 1, 2
    tracks = Packed(_line([0.6, 1, 1], [1.4, 1, 1], [2.2, 1, 1]), np.array([3]))
    vol = (labels, np.eye(4))
    assert assign_nodes(tracks, vol, 3.0, assignment="forward").tolist() == [[1, 2]]
    assert assign_nodes(tracks, vol, 2.5, assignment="forward").tolist() == [[1, 0]]
    with pytest.raises(ConfigError):
        assign_nodes(tracks, vol, -1.0, assignment="forward")


def test_all_voxels_pairs_and_vector():
    lists = [np.array([], np.int64), np.array([3]), np.array([1, 2, 4])]
    pairs, owner = node_list_pairs(lists)
    assert pairs.tolist() == [[0, 0], [0, 3], [1, 1], [1, 2], [1, 4], [2, 2], [2, 4], [4, 4]]
    assert owner.tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert format_assignments(lists, "cmd") == "# cmd\n0\n3\n1 2 4\n"
    labels = np.array([[[1, 2, 0, 3]]])
    tracks = Packed(_line([0, 0, 0], [0, 0, 1], [0, 0, 3]), np.array([3]))
    vec = connectome_matrix(tracks, (labels, np.eye(4)), assignment="all_voxels", vector=True)
    assert vec.tolist() == [1.0, 1.0, 1.0]
    mat = connectome_matrix(tracks, (labels, np.eye(4)), assignment="all_voxels")
    assert np.triu(mat).sum() == 6 and mat[0, 1] == 1 and mat[1, 0] == 0


@pytest.mark.skipif(not HAVE_MRTRIX, reason="MRtrix3 tck2connectome not on PATH")
@pytest.mark.parametrize("opts", [["-assignment_forward_search", "4.3", "-vector"],
                                  ["-assignment_reverse_search", "1.7"],
                                  ["-assignment_radial_search", "0"]])  # fmt: skip
def test_live_other_distances(opts, shared_data, tmp_path):
    tck, parc, _ = _inputs("real_whole", shared_data)
    ref, out = tmp_path / "ref.csv", tmp_path / "out.csv"
    cmd = ["tck2connectome", str(tck), str(parc), str(ref), "-quiet", "-nthreads", "0", *opts]
    subprocess.run(cmd, check=True)
    assert main(["-q", "connectome", str(tck), str(parc), str(out), *opts]) == 0
    skip = 1 if "-vector" in opts else 0  # the vector's first line is the command history
    assert out.read_text().splitlines()[skip:] == ref.read_text().splitlines()[skip:]


def test_radial_search_of_zero_assigns_nothing(shared_data, tmp_path):
    """``-assignment_radial_search 0`` is accepted, as by tck2connectome 3.0.3, and like it
    assigns no endpoint (the search keeps voxels strictly within the radius): a zero matrix."""
    tck, parc, _ = _inputs("real_whole", shared_data)
    out, assign = tmp_path / "out.csv", tmp_path / "a.txt"
    argv = ["-q", "connectome", str(tck), str(parc), str(out), "-assignment_radial_search", "0"]
    assert main([*argv, "-out_assignments", str(assign)]) == 0
    mat = np.loadtxt(out, delimiter=",")
    assert mat.size > 1 and not mat.any()
    rows = [line for line in assign.read_text().splitlines() if not line.startswith("#")]
    assert rows and set(rows) == {"0 0"}
    with pytest.raises(ConfigError, match=">= 0"):
        main([*argv[:-1], "-1", "--debug"])
