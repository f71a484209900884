"""`invtract track`: help, the bundled example, outputs and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from invtract.cli import main
from invtract.data import example_path
from invtract.io.seeds import load_seeds
from invtract.io.tractogram import load_tractogram, load_tractogram_header


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["track", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--seed-grid-per-voxel" in out and "mm" in out


def test_example_run_writes_tck_and_seeds(tmp_path):
    out = tmp_path / "ex.tck"
    seeds = tmp_path / "ex_seeds.txt"
    rc = main(["-q", "track", "--example", str(out), "--engine", "torch",
               "--seed-grid-per-voxel", str(example_path("roi")), "2",
               "--seed-direction", "1,0,0", "--output-seeds", str(seeds)])  # fmt: skip
    assert rc == 0
    sl = load_tractogram(out)
    h = load_tractogram_header(out)
    assert len(sl) == 96 and int(h["count"]) == 96
    for key in ("step_size", "max_angle", "threshold", "min_dist", "max_dist", "method"):
        assert key in h
    assert h["method"] == "SDStream" and h["init_direction"] == "1,0,0"
    table = load_seeds(seeds)
    pts = sl.to_list()
    for t, s, p in zip(table.track_index, table.seed_index, table.positions):
        assert np.allclose(pts[t][s], p, atol=1e-4)
    # same command, same file bit for bit; refuses to overwrite without --force
    assert main(["-q", "track", "--example", str(out)]) == 1
    out2 = tmp_path / "ex2.tck"
    args = ["-q", "track", "--example", "--engine", "torch", "--seed-grid-per-voxel",
            str(example_path("roi")), "2", "--seed-direction", "1,0,0"]  # fmt: skip
    assert main(args[:3] + [str(out2)] + args[3:]) == 0
    a, b = load_tractogram(out), load_tractogram(out2)
    assert np.array_equal(a.points.numpy(), b.points.numpy())


def _write_fod(path, n_vol):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((3, 3, 3, n_vol), np.float32), np.eye(4)), str(path))


@pytest.mark.parametrize(
    "problem,message",
    [
        ("sh_count", "spherical-harmonic coefficient count"),
        ("missing", "not found"),
        ("no_seed", "seeding"),
    ],
)
def test_clear_errors(tmp_path, capsys, problem, message):
    fod = tmp_path / "fod.nii.gz"
    _write_fod(fod, 44 if problem == "sh_count" else 15)
    args = ["track", str(fod if problem != "missing" else tmp_path / "nope.nii"),
            str(tmp_path / "o.tck")]  # fmt: skip
    if problem != "no_seed":
        args += ["--seed-sphere", "1,1,1,0.5", "--select", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_seed_file(tmp_path, capsys):
    fod = tmp_path / "fod.nii.gz"
    _write_fod(fod, 15)
    seeds = tmp_path / "s.txt"
    seeds.write_text("1 2\n3 4\n")
    assert main(["track", str(fod), str(tmp_path / "o.tck"), "--seeds", str(seeds)]) == 1
    assert "column" in capsys.readouterr().err
    seeds.write_text("1 2 nan\n")
    assert main(["track", str(fod), str(tmp_path / "o.tck"), "--seeds", str(seeds)]) == 1


def test_compiled_cpu_path_never_imports_torch(tmp_path):
    """`invtract track` with the compiled CPU engine (the default on CPU) runs without torch
    (its import is about a second of a whole run): same streamlines as the torch engine."""
    import subprocess
    import sys

    from invtract.tracking.runner import numba_available

    if not numba_available():
        pytest.skip("numba is not installed: the compiled CPU engine is unavailable")
    out, ref = tmp_path / "numba.tck", tmp_path / "torch.tck"
    code = (
        "import sys; from invtract.cli import main; "
        f"rc = main(['-q', 'track', '--example', {str(out)!r}, '--engine', 'numba']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert main(["-q", "track", "--example", str(ref), "--engine", "torch"]) == 0
    ours, theirs = load_tractogram(out), load_tractogram(ref)
    assert len(ours) > 0 and ours.lengths.tolist() == theirs.lengths.tolist()
    assert np.allclose(ours.points.numpy(), theirs.points.numpy(), atol=1e-4)


def test_mif_to_tck_never_imports_nibabel(tmp_path, shared_data):
    """`invtract track` from a `.mif` FOD and mask to a `.tck` reads and writes with the
    package's own MRtrix-format code: nibabel (0.06 s of the start-up) is never imported."""
    import subprocess
    import sys

    case = shared_data / "real_msmt15"
    out = tmp_path / "o.tck"
    code = (
        "import sys; from invtract.cli import main; "
        f"rc = main(['-q', 'track', {str(case / 'fod.mif')!r}, {str(out)!r}, "
        f"'--seed-grid-per-voxel', {str(case / 'roi_A.mif')!r}, '1', '--rng-seed', '1']); "
        "assert 'nibabel' not in sys.modules, 'nibabel was imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(load_tractogram(out)) > 0


def test_console_entry_fast_exit_keeps_outputs_and_exit_codes(tmp_path):
    """`python -m invtract.cli track` leaves through the fast exit: the .tck is complete and
    the exit code is the command's (0, then 1 for an existing output)."""
    import subprocess
    import sys

    out = tmp_path / "ex.tck"
    cmd = [sys.executable, "-m", "invtract.cli", "-q", "track", "--example", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert len(load_tractogram(out)) == int(load_tractogram_header(out)["count"]) > 0
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "output exists" in again.stderr
