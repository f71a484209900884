"""Bad input and faults (issue 18): one row per case, each run through ``invtract.cli.main``.

Every row crafts its small input files in a fresh folder, runs the command in-process and
asserts the exit code, the one line it prints (``error: ...`` or ``warning: ...``, never a
traceback) and what is left behind: nothing new after an error; after a warning only the
requested output. Memory limits are made deterministic by patching
:func:`invtract.checks.available_memory` where the estimate would fit a large machine.
An error row also fails if tracking or the connectome matrix started before it (the old code
found a missing output folder only after tracking). Signals need a real process: the SIGTERM
rows run ``python -c`` subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from invtract import checks
from invtract.cli import main
from invtract.data import example_path
from invtract.io.image import load_fod, save_mif
from invtract.io.tractogram import load_tractogram

GiB = 1 << 30
FOD = str(example_path("fod"))
MASK = str(example_path("mask"))
TARGET = str(example_path("target"))


# ------------------------------------------------------------------------------------------
# crafted inputs (each written on first use, in the case's own folder)
# ------------------------------------------------------------------------------------------
def _nifti(path: Path, data, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, float)), str(path))
    return str(path)


def _fod_variant(path: Path, change) -> str:
    img = nib.load(FOD)
    data = np.asarray(img.dataobj, np.float32).copy()
    return _nifti(path, change(data), img.affine)


def _nan_transform_mif(path: Path) -> str:
    save_mif(path, load_fod(FOD))
    text = path.read_bytes()
    row = next(r for r in text.split(b"\n") if r.startswith(b"transform:"))
    bad = b"transform: nan,0,0,0".ljust(len(row))  # same length: the data offset stays valid
    path.write_bytes(text.replace(row, bad, 1))
    return str(path)


def _shifted_mask(path: Path) -> str:
    affine = nib.load(MASK).affine.copy()
    affine[:3, 3] += 500.0
    return _nifti(path, np.ones((3, 3, 3), np.uint8), affine)


def _huge_fod_header(path: Path) -> str:
    """A NIfTI header claiming a 200^3 x 45 float32 FOD (1.4 GB) with no data after it."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((200, 200, 200, 45))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * 4)  # extension flag; the 1.4 GB of data are absent
    return str(path)


def _tck(path: Path, shift: float = 0.0) -> str:
    """Two straight streamlines through the label image of :func:`_labels` (scanner mm)."""
    from invtract.io.tractogram import save_tractogram
    from invtract.streamlines import Streamlines

    lines = [np.array([[0, 0, 0], [6, 0, 0]], np.float32), np.array([[0, 2, 0], [6, 2, 0]])]
    sl = Streamlines.from_list([(x + shift).astype(np.float32) for x in lines])
    save_tractogram(str(path), sl)
    return str(path)


def _labels(path: Path, largest: int = 2, shift: float = 0.0) -> str:
    """A 4 x 2 x 1 parcellation, 2 mm voxels: node 1 at x = 0 mm, node ``largest`` at 6 mm
    (the whole grid moved by ``shift`` mm)."""
    data = np.zeros((4, 2, 1), np.int32)
    data[0], data[3] = 1, largest
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = shift
    return _nifti(path, data, affine)


def _unwritable(folder: Path) -> Path:
    """A folder this process cannot create files in (``/sys`` for root, else mode 0555)."""
    if os.geteuid() == 0:
        folder = Path("/sys")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        checks._check_writable_folder(str(folder), "probe", str(folder))
    except Exception:
        return folder
    pytest.skip(f"cannot make an unwritable folder here ({folder} accepts files)")


class Files:
    """Named inputs of the table, created in ``root`` on demand (``files.nan_fod`` ...)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __getattr__(self, name: str):
        r = self.root
        make = {
            "nan_fod": lambda: _fod_variant(r / "nan.nii", lambda d: d * np.nan),
            "inf_fod": lambda: _fod_variant(r / "inf.nii", _set_volume(3, -np.inf)),
            "l0_fod": lambda: _fod_variant(r / "l0.nii", lambda d: d[..., :1]),
            "zero_fod": lambda: _fod_variant(r / "zero.nii", lambda d: 0 * d),
            "nan_transform": lambda: _nan_transform_mif(r / "nan_transform.mif"),
            "far_mask": lambda: _shifted_mask(r / "far_mask.nii"),
            "far_seeds": lambda: _write(r / "far_seeds.txt", "500 500 500\n510 500 500\n"),
            "huge_fod": lambda: _huge_fod_header(r / "huge_fod.nii"),
            "tck": lambda: _tck(r / "two.tck"),
            "far_tck": lambda: _tck(r / "far.tck", shift=500.0),
            "labels": lambda: _labels(r / "labels.nii"),
            "far_labels": lambda: _labels(r / "far_labels.nii", shift=-500.0),
            "labels_50k": lambda: _labels(r / "labels_50k.nii", largest=50_000),
            "labels_2m": lambda: _labels(r / "labels_2m.nii", largest=2_000_000),
            "existing_tck": lambda: _write(r / "existing.tck", "keep me"),
            "folder_tck": lambda: _mkdir(r / "folder.tck"),
            "unwritable": lambda: str(_unwritable(r / "readonly")),
        }
        if name not in make:
            raise AttributeError(name)
        value = make[name]()
        setattr(self, name, value)
        return value


def _set_volume(k: int, value: float):
    def change(d):
        d[..., k] = value
        return d

    return change


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _mkdir(path: Path) -> str:
    path.mkdir()
    return str(path)


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One row: ``argv(files, out)`` -> exit ``rc`` and a line holding ``says``.

    ``out`` is a fresh output path in the case folder; ``writes`` are the file names (in
    that folder) a successful run may add; ``memory`` patches the available memory (bytes).
    """

    argv: object
    rc: int
    says: str
    writes: tuple = ()
    memory: int | None = None
    calibrate: bool = False
    extra: dict = field(default_factory=dict)


def _track(fod, *more):
    return lambda f, o: ["track", fod(f) if callable(fod) else fod, o, *more]


GRID = ("--seed-grid-per-voxel", MASK, "1")

CASES = {
    # silent wrong results -> a warning (exit 0)
    "all-NaN FOD": Case(_track(lambda f: f.nan_fod, *GRID), 0, "no valid voxel", ("out.tck",)),
    "-Inf in every voxel of one volume": Case(
        _track(lambda f: f.inf_fod, *GRID), 0, "no valid voxel", ("out.tck",)
    ),
    "lmax-0 FOD": Case(_track(lambda f: f.l0_fod, *GRID), 0, "lmax 0", ("out.tck",)),
    "all-zero FOD": Case(_track(lambda f: f.zero_fod, *GRID), 0, "no valid voxel", ("out.tck",)),
    "seeds 500 mm outside the image": Case(
        lambda f, o: ["track", FOD, o, "--seeds", f.far_seeds],
        0,
        "all 2 seeds lie outside the FOD image",
        ("out.tck",),
    ),
    "seed mask 500 mm outside the image": Case(
        lambda f, o: ["track", FOD, o, "--seed-grid-per-voxel", f.far_mask, "1"],
        0,
        "all 27 seed mask voxels lie outside the FOD image",
        ("out.tck",),
    ),
    "seed sphere outside the image": Case(
        _track(FOD, "--seed-sphere", "500,500,500,3", "--select", "1", "--max-seeds", "20"),
        0,
        "--seed-sphere 500,500,500,3 lies outside",
        ("out.tck",),
    ),
    "nothing tracked": Case(
        _track(FOD, *GRID, "--cutoff", "100"), 0, "no streamline selected from", ("out.tck",)
    ),
    "connectome: tracks in another space": Case(
        lambda f, o: ["connectome", f.far_tck, f.labels, o[:-4] + ".csv"],
        0,
        "all 4 streamline endpoints lie outside the parcellation",
        ("out.csv",),
    ),
    "connectome: labels in another space": Case(
        lambda f, o: ["connectome", f.tck, f.far_labels, o[:-4] + ".csv"],
        0,
        "all 4 streamline endpoints lie outside the parcellation",
        ("out.csv",),
    ),
    # errors (exit 1, nothing written)
    ".mif with NaN in its transform": Case(
        _track(lambda f: f.nan_transform, *GRID), 1, "'transform' has NaN"
    ),
    "negative --seed-sphere radius": Case(
        _track(FOD, "--seed-sphere", "0,0,0,-3"), 1, "--seed-sphere radius must be >= 0"
    ),
    "--output-seeds names the output": Case(
        lambda f, o: [
            "track",
            FOD,
            f.existing_tck,
            *GRID,
            "--output-seeds",
            f.existing_tck,
            "--force",
        ],  # fmt: skip
        1,
        "--output-seeds and output name the same file",
    ),
    "unknown output extension": Case(
        lambda f, o: ["track", FOD, o[:-4] + ".tckx", *GRID], 1, "unknown extension"
    ),
    "missing output folder": Case(
        lambda f, o: ["track", FOD, str(Path(o).parent / "nope" / "o.tck"), *GRID],
        1,
        "does not exist",
    ),
    "unwritable output folder": Case(
        lambda f, o: ["track", FOD, f.unwritable + "/o.tck", *GRID], 1, "is not writable"
    ),
    "--output-seeds into a missing folder": Case(
        _track(FOD, *GRID, "--output-seeds", "/nonexistent-invtract/seeds.txt"),
        1,
        "folder of --output-seeds",
    ),
    "--batch-size 0": Case(_track(FOD, *GRID, "--batch-size", "0"), 1, "--batch-size must be"),
    "--rng-seed -1": Case(_track(FOD, *GRID, "--rng-seed", "-1"), 1, "--rng-seed must be in"),
    "output is a directory, with --force": Case(
        lambda f, o: ["track", FOD, f.folder_tck, *GRID, "--force"], 1, "is a directory"
    ),
    "directory given as the FOD": Case(
        lambda f, o: ["track", str(Path(o).parent), o, *GRID], 1, "is a directory, not a file"
    ),
    "--seed-grid-per-voxel mask 50": Case(
        _track(FOD, "--seed-grid-per-voxel", MASK, "50"),
        1,
        "--seed-grid-per-voxel: 367,500,000 seeds",
        memory=16 * GiB,
    ),
    "--seed-image --select 200 --maxlength 1e10 (a 1.2 TB streamline buffer)": Case(
        _track(FOD, "--seed-image", MASK, "--select", "200", "--maxlength", "1e10"),
        1,
        "lower --maxlength",
        memory=16 * GiB,
    ),
    "FOD larger than the memory": Case(
        _track(lambda f: f.huge_fod, *GRID), 1, "loading FOD", memory=4 * GiB
    ),
    "connectome: largest label 50,000": Case(
        lambda f, o: ["connectome", f.tck, f.labels_50k, o[:-4] + ".csv"],
        1,
        "largest label 50,000 makes a 50,001 x 50,001 matrix",
        memory=16 * GiB,
    ),
    "connectome: largest label 2,000,000": Case(
        lambda f, o: ["connectome", f.tck, f.labels_2m, o[:-4] + ".csv"],
        1,
        "largest label 2,000,000",
    ),
    "connectome: unwritable output folder": Case(
        lambda f, o: ["connectome", f.tck, f.labels, f.unwritable + "/c.csv"], 1, "not writable"
    ),
    "connectome: output is a directory, with --force": Case(
        lambda f, o: ["connectome", f.tck, f.labels, f.folder_tck, "--force"], 1, "is a directory"
    ),
    "compare: --json names an input": Case(
        lambda f, o: ["compare", f.tck, f.tck, "--json", f.tck, "--force"], 1, "also the input"
    ),
    "calibrate: --storage in a missing folder": Case(
        lambda f, o: [
            "calibrate",
            "--target",
            TARGET,
            "--fod",
            FOD,
            "--run",
            o + ".run",
            "--storage",
            f"sqlite:///{o}.missing/study.db",
        ],  # fmt: skip
        1,
        "folder of the database does not exist",
        calibrate=True,
    ),
    "calibrate: --storage is not a URL": Case(
        lambda f, o: [
            "calibrate",
            "--target",
            TARGET,
            "--fod",
            FOD,
            "--run",
            o + ".run",
            "--storage",
            "study.db",
        ],  # fmt: skip
        1,
        "must be a database URL",
        calibrate=True,
    ),
    "calibrate --show on a missing database": Case(
        lambda f, o: ["calibrate", "--show", "--storage", f"sqlite:///{o}.db"],
        1,
        "no such database",
        calibrate=True,
    ),
}


def _forbid(monkeypatch, target: str) -> None:
    def started(*args, **kwargs):
        raise AssertionError(f"{target} ran before the error")

    monkeypatch.setattr(target, started)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, capsys, caplog, monkeypatch):
    case = CASES[name]
    if case.calibrate:
        pytest.importorskip("optuna")
    if case.memory is not None:
        monkeypatch.setattr(checks, "available_memory", lambda: case.memory)
    if case.rc:  # an error must come before the work: tracking or the matrix never start
        _forbid(monkeypatch, "invtract.tracking.runner.run_seeding")
        _forbid(monkeypatch, "invtract.losses.connectome.connectome_matrix")
    monkeypatch.chdir(tmp_path)
    files = Files(tmp_path)
    argv = case.argv(files, str(tmp_path / "out.tck"))
    before = _tree(tmp_path)
    existing = {p: Path(p).read_bytes() for p in argv if Path(p).is_file()}
    caplog.set_level("WARNING", logger="invtract")
    rc = main(["-q", *argv])
    err = capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert rc == case.rc, (err, lines)
    assert "Traceback" not in err
    if case.rc:  # one line "invtract CMD: error: ..."
        assert err.count("\n") == 1 and err.startswith(f"invtract {argv[0]}: error: "), err
        assert case.says in err and len(err) < 400, err
        assert _tree(tmp_path) == before, "a failed command left files behind"
    else:  # one line "warning: ..." among the warnings, and only the output written
        said = [m for m in lines if case.says in m]
        assert said and all(m.startswith("warning: ") and "\n" not in m for m in said), lines
        assert _tree(tmp_path) - before == set(case.writes)
    for path, blob in existing.items():  # inputs and protected outputs are untouched
        assert Path(path).read_bytes() == blob, f"{path} was overwritten"


def test_debug_keeps_the_traceback(tmp_path):
    """``--debug`` re-raises the error instead of printing one line."""
    from invtract.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size"):
        main(["--debug", "track", FOD, str(tmp_path / "o.tck"), *GRID, "--batch-size", "0"])


def test_connectome_missing_nodes_warning_is_one_short_line(tmp_path, caplog):
    """Labels 1 and 300 present: 298 missing nodes are counted, not listed (the old
    message listed every one: 340 kB for a largest label of 50,000)."""
    files = Files(tmp_path)
    labels = _labels(tmp_path / "l.nii", largest=300)
    caplog.set_level("WARNING", logger="invtract")
    assert main(["-q", "connectome", files.tck, labels, str(tmp_path / "c.csv")]) == 0
    said = [r.getMessage() for r in caplog.records if "nodes missing" in r.getMessage()]
    assert len(said) == 1 and "(298 in all)" in said[0] and len(said[0]) < 200


# ------------------------------------------------------------------------------------------
# signals: a real process
# ------------------------------------------------------------------------------------------
_TERM_IN_WRITER = """
import os, signal, sys, time
import invtract.io.tractogram as tg
real = tg.TckStream.write
def slow_write(self, points, lengths):
    real(self, points, lengths)  # part of the .tck is on disk under its temporary name
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler raises Terminated here
tg.TckStream.write = slow_write
from invtract.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_writing_removes_the_temporary_file(tmp_path):
    """SIGTERM in the middle of writing the .tck: exit 143, one line, no ``.out.tck.*.tmp``
    and no output left (the writer's cleanup runs as on Ctrl-C)."""
    out = tmp_path / "out.tck"
    argv = ["-q", "track", FOD, str(out), *GRID, "--seed-direction", "1,0,0"]
    proc = subprocess.run(
        [sys.executable, "-c", _TERM_IN_WRITER, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().endswith("terminated by signal 15"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_handler_is_restored_after_main(tmp_path):
    """``main`` installs its SIGTERM handler only while a command runs."""
    before = signal.getsignal(signal.SIGTERM)
    main(["-q", "track", FOD, str(tmp_path / "o.tck"), *GRID, "--batch-size", "0"])
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_is_passed_on_to_worker_processes():
    """``calibrate --workers`` children are terminated with the command (the interpreter's exit
    would otherwise wait for them to finish their trials)."""
    import multiprocessing
    import time

    from invtract.cli import _terminate_children

    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    child.start()
    _terminate_children()
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGTERM


def test_long_maxlength_runs_in_memory_sized_by_what_is_tracked(tmp_path):
    """``--seed-image --select 200 --maxlength 100000`` (once an 18 GB buffer up front) is
    accepted and runs: buffers follow the tracked streamlines, not max_length x batch."""
    out = tmp_path / "o.tck"
    argv = ["-q", "track", FOD, str(out), "--seed-image", MASK, "--select", "200",
            "--maxlength", "100000", "--rng-seed", "1"]  # fmt: skip
    assert main(argv) == 0
    assert len(load_tractogram(out)) == 200
