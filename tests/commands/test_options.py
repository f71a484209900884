"""MRtrix3-style command lines: option spellings, negative values, common options, pasted
tckgen command lines (from the shared references' headers) and tckgen's -info report."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

import invtract
from invtract.cli import build_parser, main
from invtract.commands.options import translate_argv
from invtract.io.seeds import load_seeds


def _track_parser():
    return build_parser(only="track").commands["track"]


def _parse(argv):
    p = _track_parser()
    return p.parse_args(translate_argv(argv, p, "track"))


def test_translate_mrtrix_spellings_and_negative_values():
    p = _track_parser()
    out = translate_argv(
        ["f.mif", "o.tck", "-seed_image", "m.mif", "-seeds", "100", "-select", "5",
         "--seed-sphere", "-10,0,0,6", "-seed_direction", "-1,0,0", "-exclude", "-5,1,2,3",
         "-nthreads", "0", "-force", "-quiet", "-info", "-angle", "-0.5"],
        p, "track",
    )  # fmt: skip
    assert out == [
        "f.mif", "o.tck", "--seed-image", "m.mif", "--max-seeds", "100", "--select", "5",
        "--seed-sphere=-10,0,0,6", "--seed-direction=-1,0,0", "--exclude=-5,1,2,3",
        "--nthreads", "0", "--force", "--quiet", "--info", "--angle=-0.5",
    ]  # fmt: skip
    args = p.parse_args(out)
    assert args.seed_sphere == "-10,0,0,6" and args.seed_direction == "-1,0,0"
    assert args.max_seeds == 100 and args.seeds is None and args.exclude == ["-5,1,2,3"]
    assert args.force and args.info and args.nthreads == 0


def test_unknown_and_unsupported_options_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        _parse(["f.mif", "o.tck", "-no_such_option"])
    assert "-no_such_option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["f.mif", "o.tck", "-seed_dynamic", "fod.mif"])
    assert "-seed_dynamic is not supported" in capsys.readouterr().err
    args = _parse(["f.mif", "o.tck", "-act", "5tt.mif", "-crop_at_gmwmi", "-seed_gmwmi", "g.mif"])
    assert args.act == "5tt.mif" and args.crop_at_gmwmi and args.seed_gmwmi == "g.mif"
    with pytest.raises(SystemExit):
        _parse(["f.mif", "o.tck", "-algorithm", "iFOD2"])
    assert "SD_Stream only" in capsys.readouterr().err
    args = _parse(["f.mif", "o.tck", "-algorithm", "sd_stream", "-trials", "5", "-power", "3"])
    assert args.algorithm == "SD_Stream"


@pytest.mark.parametrize("command", ["track", "compare", "connectome", "fit", "calibrate"])
def test_every_command_has_the_common_options(command, capsys):
    p = build_parser(only=command).commands[command]
    strings = {s for a in p._actions for s in a.option_strings}
    assert {"--force", "--quiet", "--info", "--nthreads", "--version"} <= strings
    with pytest.raises(SystemExit) as e:
        main([command, "-version"])
    assert e.value.code == 0
    assert invtract.__version__ in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("invtract ")


def test_sh_basis_names_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["track", "--help"])
    out = capsys.readouterr().out
    for name in ("descoteaux07_legacy", "tournier07_legacy", "descoteaux07", "tournier07"):
        assert name in out


def _reference_cases(shared_data):
    return sorted(shared_data.glob("*/bundle*.tck"))


def _pasted_command(tck, out_dir):
    """The header's tckgen command line, with paths made absolute and outputs in out_dir."""
    history = nib.streamlines.load(str(tck), lazy_load=True).header["command_history"]
    argv = shlex.split(history.split("(version=")[0])
    assert argv[0] == "tckgen"
    fixed = []
    for a in argv:
        if (tck.parent / a).exists() and a.endswith((".mif", ".nii.gz")):
            a = str(tck.parent / a)
        elif a.endswith((".tck", "_seeds.txt")):
            a = str(out_dir / a)
        fixed.append(a)
    return fixed


def _run_pasted(tck, tmp_path):
    """Run the reference's pasted command line; (ours, reference) streamlines and seeds."""
    argv = _pasted_command(tck, tmp_path)
    assert main(["-q", *argv]) == 0, argv
    ours = nib.streamlines.load(str(tmp_path / tck.name)).streamlines
    ref = nib.streamlines.load(str(tck)).streamlines
    seeds = tck.with_name(tck.stem + "_seeds.txt")
    ours_seeds, ref_seeds = load_seeds(tmp_path / seeds.name), load_seeds(seeds)
    assert len(ours) == len(ref) > 0
    for field in ("track_index", "seed_index"):
        np.testing.assert_array_equal(getattr(ours_seeds, field), getattr(ref_seeds, field))
    return ours, ref


@pytest.mark.parametrize(
    "name", ["bundleB_angle1", "bundleB_cutoff1.0", "bundleB_default", "bundleB_step1.0"]
)
def test_pasted_tckgen_command_lines_give_tckgens_streamlines(name, shared_data, tmp_path):
    """A reference's own command line (its header's command_history), pasted as is: the
    same streamlines bit for bit, the same seed-file rows."""
    ours, ref = _run_pasted(shared_data / "phantom_cross90" / f"{name}.tck", tmp_path)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["bundleA_default", "bundleA_angle30", "bundleA_step0.5"])
def test_pasted_real_command_lines_give_tckgens_streamlines(name, shared_data, tmp_path):
    """Real case (rotated affine, -seed_grid_per_voxel ROI 3): the pasted command line gives
    tckgen's streamlines bit for bit (our own grid seeding from the ROI, not its seed file)."""
    ours, ref = _run_pasted(shared_data / "real_msmt15" / f"{name}.tck", tmp_path)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def _info_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        line = line.replace("\x1b[0m", "")
        if "[INFO]" in line and ("Total number" in line or "[INFO]   " in line):
            lines.append(line.split("[INFO] ", 1)[1])
    return lines


@pytest.mark.skipif(shutil.which("tckgen") is None, reason="MRtrix3's tckgen not installed")
def test_info_statistics_equal_tckgens(shared_data, tmp_path, capsys):
    """-info with include / exclude (a sphere at negative coordinates) / mask regions: the
    same termination percentages and rejection counts as tckgen -info."""
    d = shared_data / "real_msmt15"
    argv = [str(d / "fod.mif"), str(tmp_path / "x.tck"), "-algorithm", "SD_Stream",
            "-seed_grid_per_voxel", str(d / "mask.mif"), "1", "-include", str(d / "roi_A.mif"),
            "-exclude", "-5,10,20,5", "-mask", str(d / "mask.mif"),
            "-seed_direction", "0.55,0.8,0.23", "-nthreads", "0", "-info"]  # fmt: skip
    ref = subprocess.run(["tckgen", *argv, "-quiet"], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    ref = subprocess.run(
        ["tckgen", *argv, "-force"], capture_output=True, text=True, check=True
    ).stderr
    capsys.readouterr()
    assert main(["track", *argv, "-force"]) == 0
    ours = _info_lines(capsys.readouterr().err)
    assert ours == _info_lines(ref) and len(ours) == 13


def test_progress_off_terminal_is_a_few_lines(tmp_path, capsys):
    from invtract.data import example_path

    out = tmp_path / "p.tck"
    assert main(["track", "--example", str(out), "-seed_image", str(example_path("mask")),
                 "-select", "300", "-rng_seed", "3", "--batch-size", "16"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "%]" in ln]
    assert 3 <= len(lines) <= 12 and "\r" not in err
    assert lines[-1].startswith("invtract track: [100%]") and "300 selected" in lines[-1]


@pytest.mark.slow
def test_fit_force_replaces_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["-q", "fit", "--example", "--run", str(run), "--iterations", "2",
            "--no-tensorboard", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    first = (run / "result.json").read_text()
    assert main(argv) == 1 and "--force" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("stale\n")
    assert main([*argv, "-force"]) == 0
    assert "stale" not in (run / "metrics.jsonl").read_text()
    assert (run / "result.json").read_text() != "" and first


@pytest.mark.slow
def test_calibrate_force_starts_the_study_afresh(tmp_path):
    import optuna

    from invtract.data import example_path

    run = tmp_path / "cal"
    argv = ["-q", "calibrate", "--target", str(example_path("target")), "--target-seeds",
            str(example_path("target_seeds")), "--fod", str(example_path("fod")),
            "--trials", "1", "--seed", "1", "--run", str(run), "--no-tensorboard"]  # fmt: skip

    def trials():
        storage = f"sqlite:///{run / 'study.db'}"
        (name,) = optuna.get_all_study_names(storage)
        return len(optuna.load_study(study_name=name, storage=storage).trials)

    assert main(argv) == 0 and main(argv) == 0 and trials() == 2
    assert main([*argv, "--force"]) == 0 and trials() == 1


def test_warnings_are_one_line(tmp_path, capsys):
    """A DIPY-basis FOD tracked as MRtrix's: the basis warning is one line, no source."""
    from invtract.data import example_path
    from invtract.io.sh_basis import from_mrtrix_basis

    img = nib.load(str(example_path("fod")))
    data = from_mrtrix_basis(np.asarray(img.dataobj, np.float32), "descoteaux07_legacy")
    fod = tmp_path / "dipy_fod.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(fod))
    capsys.readouterr()
    assert main(["track", str(fod), str(tmp_path / "o.tck"), "-seed_sphere", "0,0,0,3",
                 "-select", "2", "-rng_seed", "1", "-quiet"]) == 0  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "warning:" in line]
    assert len(warned) == 1 and warned[0].startswith("invtract track: warning: ")
    assert "descoteaux07_legacy" in warned[0] and not any("warn(" in line for line in err)


def test_checks_warning_has_one_prefix():
    """A warning from ``checks.warn`` (whose record already says ``warning:``) is formatted
    ``invtract track: warning: ...``, not ``warning: warning: ...``; other records get one."""
    import logging

    from invtract.checks import warn
    from invtract.cli import _OneLine

    fmt, records = _OneLine("invtract track"), []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("invtract")
    log.addHandler(handler)
    try:
        warn("no streamline selected")
        log.warning("plain")
    finally:
        log.removeHandler(handler)
    lines = [fmt.format(r) for r in records]
    assert lines == [
        "invtract track: warning: no streamline selected",
        "invtract track: warning: plain",
    ]


@pytest.mark.parametrize("case", ["act_grid_cutoff0.2", "act_gmwmi"])
def test_pasted_tck2connectome_command_line(case, shared_data, tmp_path):
    """``tck2connectome TCK parc.mif CSV`` as the sift_phantom README records it, pasted with
    MRtrix options: the reference matrix, byte for byte."""
    d = shared_data / "sift_phantom"
    out = tmp_path / "c.csv"
    argv = ["tck2connectome", str(d / f"{case}.tck"), str(d / "parc.mif"), str(out),
            "-nthreads", "0", "-quiet", "-force"]  # fmt: skip
    assert main(argv) == 0
    assert out.read_bytes() == (d / f"{case}_connectome.csv").read_bytes()
