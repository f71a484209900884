"""``invtract connectome`` imports only what it needs: no torch, dipy or numba (nibabel only to
read a NIfTI parcellation; none of it for a ``.mif`` one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WHOLE = REPO.parent / "shared" / "data" / "real_msmt15" / "whole.tck"
PARC = REPO / "tests" / "data" / "connectome" / "real_msmt15_parc.nii.gz"


def _heavy_modules_after(args: list[str]) -> list[str]:
    code = (
        "import sys\nfrom invtract.cli import main\n"
        f"assert main(['-q', 'connectome', *{args!r}]) == 0\n"
        "heavy = ('nibabel', 'scipy', 'torch', 'dipy', 'numba')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("suffix", [".nii.gz", ".mif"])
def test_connectome_command_imports_no_heavy_modules(tmp_path, suffix):
    if not WHOLE.is_file():
        pytest.skip("shared data not present")
    from invtract.io.image import load_image, save_mif

    parc = PARC
    if suffix == ".mif":
        parc = tmp_path / "parc.mif"
        img = load_image(str(PARC))
        save_mif(parc, img)
    loaded = _heavy_modules_after([str(WHOLE), str(parc), str(tmp_path / "o.csv")])
    assert not {"torch", "dipy", "numba"} & set(loaded)
    if suffix == ".mif":
        assert loaded == []
    assert (tmp_path / "o.csv").is_file()
