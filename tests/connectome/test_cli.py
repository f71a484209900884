"""``invtract connectome``: help text, overwrite protection and user errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from connectome_data import FIXTURES

from invtract.cli import main
from invtract.errors import ConfigError, FormatError, InvtractError, ShapeError
from invtract.losses.connectome import as_label_volume

EDGE_TCK = FIXTURES / "edge_cases.tck"
PARC = FIXTURES / "phantom_cross90_parc.nii.gz"


def _save(path, data, dtype=None):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(img, str(path))
    return path


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["connectome", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for token in ("TRACKS", "PARCELLATION", "OUT.csv", "--assignment-radial-search",
                  "--symmetric", "--zero-diagonal", "--keep-unassigned", "--force",
                  "tck2connectome", "--stat-edge", "--scale-length", "--scale-invlength",
                  "--scale-invnodevol", "--scale-file", "--tck-weights-in", "--out-assignments",
                  "--assignment-end-voxels"):  # fmt: skip
        assert token in text


def test_writes_csv_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "c.csv"
    assert main(["-q", "connectome", str(EDGE_TCK), str(PARC), str(out), "--keep-unassigned"]) == 0
    assert out.read_text() == (FIXTURES / "edge_cases_r4_keep.csv").read_text()
    out.write_text("keep me")
    assert main(["-q", "connectome", str(EDGE_TCK), str(PARC), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["-q", "connectome", str(EDGE_TCK), str(PARC), str(out), "--force"]) == 0
    assert out.read_text().count("\n") == 8  # nodes 1..8
    assert [p.name for p in tmp_path.iterdir()] == ["c.csv"]  # no temporary left behind


def test_space_delimited_for_other_extensions(tmp_path):
    out = tmp_path / "c.txt"
    assert main(["-q", "connectome", str(EDGE_TCK), str(PARC), str(out), "--symmetric"]) == 0
    assert "," not in out.read_text() and out.read_text().split("\n")[0].count(" ") == 7


def _errors(tmp_path):
    empty = tmp_path / "empty.tck"
    nib.streamlines.save(
        nib.streamlines.Tractogram([], affine_to_rasmm=np.eye(4)), str(empty)
    )  # fmt: skip
    labels = np.zeros((4, 4, 4), np.int16)
    labels[1, 1, 1] = 2
    return {
        "missing tractogram": ([str(tmp_path / "nope.tck"), str(PARC)], FormatError, "not found"),
        "missing parcellation": ([str(EDGE_TCK), str(tmp_path / "nope.nii")], FormatError,
                                 "not found"),
        "empty tractogram": ([str(empty), str(PARC)], FormatError, "no streamlines"),
        "4-D parcellation": ([str(EDGE_TCK), str(_save(tmp_path / "4d.nii", np.zeros((3, 3, 3, 2)),
                              np.int16))], ShapeError, "3-D"),
        "non-integer labels": ([str(EDGE_TCK), str(_save(tmp_path / "f.nii", labels + 0.5,
                                np.float32))], FormatError, "integer"),
        "negative labels": ([str(EDGE_TCK), str(_save(tmp_path / "n.nii", -labels, np.int16))],
                            FormatError, "non-negative"),
        "no labels": ([str(EDGE_TCK), str(_save(tmp_path / "z.nii", 0 * labels, np.int16))],
                      FormatError, "no labels"),
        "bad radius": ([str(EDGE_TCK), str(PARC), "--assignment-radial-search", "-1"], ConfigError,
                       "radial"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["missing tractogram", "missing parcellation", "empty tractogram", "4-D parcellation",
     "non-integer labels", "negative labels", "no labels", "bad radius"],
)  # fmt: skip
def test_user_errors(name, tmp_path, capsys):
    inputs, error, words = _errors(tmp_path)[name]
    out = tmp_path / "out.csv"
    args = ["connectome", *inputs[:2], str(out), *inputs[2:]]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("invtract connectome: error:") and words in err
    assert not out.exists()
    with pytest.raises(error):
        main([args[0], "--debug", *args[1:]])


def test_label_volume_validation():
    data = np.zeros((2, 2, 2, 1), np.uint8)
    data[0, 0, 0, 0] = 3
    vol = as_label_volume((data, np.eye(4)))
    assert vol.n_nodes == 3 and vol.shape == (2, 2, 2)
    assert vol.node_volumes().tolist() == [7, 0, 0, 1]
    with pytest.raises(ShapeError):
        as_label_volume((data[..., 0], np.zeros((4, 4))))
    with pytest.raises(InvtractError):
        as_label_volume(np.zeros((2, 2, 2)))
    with pytest.raises(FormatError):
        as_label_volume((np.full((2, 2, 2), np.nan), np.eye(4)))
