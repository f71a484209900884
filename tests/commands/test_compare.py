"""`invtract compare`: help, an in-process run on reference bundles, outputs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from invtract.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--reference" in out and "--json" in out and "bundle adjacency" in out


def test_compare_real_bundles(shared_data, tmp_path, capsys):
    d = shared_data / "real_msmt15"
    out = tmp_path / "metrics.json"
    argv = [
        "compare",
        str(d / "bundleA_default.tck"),
        str(d / "bundleA_angle30.tck"),
        "--reference",
        str(d / "mask.nii.gz"),
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "bundle_adjacency" in table and "paired_hausdorff_median_mm" in table
    res = json.loads(out.read_text())
    assert res["count_a"] == 214 and res["count_b"] == 214
    assert 0.0 < res["dice"] <= 1.0 and 0.0 < res["bundle_adjacency"] <= 1.0
    for key in (
        "weighted_dice",
        "overlap",
        "overreach",
        "bundle_mdf_mean_mm",
        "bundle_mam_mean_mm",
        "bundle_hausdorff_mean_mm",
        "paired_mdf_median_mm",
        "paired_hausdorff_frac_within_0.5mm",
        "length_mean_a_mm",
        "connectome_correlation",
    ):
        assert key in res and key in res["units"]
    assert res["reference_grid"]["shape"] == [15, 15, 11]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file

    # refuses to overwrite without --force, then overwrites with it
    assert main(argv) == 1
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_compare_without_reference(shared_data, tmp_path):
    d = shared_data / "phantom_cross90"
    out = tmp_path / "m.json"
    argv = ["compare", str(d / "bundleB_default.tck"), str(d / "bundleB_cutoff1.0.tck")]
    assert main([*argv, "--json", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    assert "bounding box" in res["reference_grid"]["source"]
    assert res["count_a"] == res["count_b"] == 96


def test_errors(shared_data, tmp_path, capsys):
    repo_data = Path(__file__).resolve().parents[1] / "data"
    d = shared_data / "real_msmt15"
    assert main(["compare", str(tmp_path / "missing.tck"), str(d / "bundleA_default.tck")]) == 1
    assert "not found" in capsys.readouterr().err
    empty = repo_data / "zero_streamlines.tck"
    if empty.exists():
        assert main(["compare", str(empty), str(d / "bundleA_default.tck")]) == 1
        assert "empty" in capsys.readouterr().err
    # phantom and real data live in different places of scanner space
    p = shared_data / "phantom_cross90"
    assert main(["compare", str(p / "bundleB_default.tck"), str(d / "bundleA_default.tck")]) == 1
    assert "overlap" in capsys.readouterr().err
    args = ["compare", str(d / "bundleA_default.tck"), str(d / "bundleA_default.tck")]
    assert main([*args, "--reference", str(p / "mask.nii.gz")]) == 1
    assert "does not cover" in capsys.readouterr().err
    assert main([*args, "--json", str(tmp_path / "nodir" / "x.json")]) == 1
    assert main([*args, "--n-points", "1"]) == 1


def test_compare_with_parcellation(shared_data, tmp_path):
    pytest.importorskip("invtract.losses.connectome")
    parc = (
        Path(__file__).resolve().parents[1] / "data" / "connectome" / "phantom_cross90_parc.nii.gz"
    )
    if not parc.exists():
        pytest.skip(f"parcellation fixture missing: {parc}")
    d = shared_data / "phantom_cross90"
    out = tmp_path / "c.json"
    tck = str(d / "bundleB_default.tck")
    argv = ["compare", tck, tck, "--parcellation", str(parc), "--json", str(out), "-q"]
    assert main(argv) == 0
    assert json.loads(out.read_text())["connectome_correlation"] == pytest.approx(1.0)


def test_compare_seed_files_raw_vertices_and_table(shared_data, tmp_path, capsys):
    """--seeds-a/--seeds-b pair 214 vs 210 streamlines; --resample none is stated and stored."""
    d = shared_data / "real_msmt15"
    out = tmp_path / "m.json"
    argv = ["compare", str(d / "bundleA_default.tck"), str(d / "bundleA_cutoff0.3.tck"),
            "--seeds-a", str(d / "bundleA_default_seeds.txt"),
            "--seeds-b", str(d / "bundleA_cutoff0.3_seeds.txt"),
            "--resample", "none", "--bundle-sample", "40", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "bundle-level MAM / Hausdorff on the raw vertices" in table
    assert "pairs by seeds" in table and "buan_shape_similarity" in table
    res = json.loads(out.read_text())
    assert (res["count_a"], res["count_b"]) == (214, 210)
    assert res["resample"] is None and res["pairing"] == "seeds"
    assert 200 <= res["paired_count"] <= 210 and res["paired_hausdorff_median_mm"] is not None
    assert res["inputs"]["seeds_b"].endswith("bundleA_cutoff0.3_seeds.txt")
    assert 0.0 < res["buan_shape_similarity"] <= 1.0


def test_compare_option_errors(shared_data, tmp_path, capsys):
    d = shared_data / "real_msmt15"
    args = ["compare", str(d / "bundleA_default.tck"), str(d / "bundleA_cutoff0.3.tck")]
    assert main([*args, "--seeds-a", str(d / "bundleA_default_seeds.txt")]) == 1
    assert "go together" in capsys.readouterr().err
    swapped = ["--seeds-a", str(d / "bundleA_cutoff0.3_seeds.txt"),
               "--seeds-b", str(d / "bundleA_default_seeds.txt")]  # fmt: skip
    assert main([*args, *swapped]) == 1
    assert "do not give one seed to each" in capsys.readouterr().err
    for bad in (["--resample", "1"], ["--resample", "lots"]):
        with pytest.raises(SystemExit):
            main([*args, *bad])
