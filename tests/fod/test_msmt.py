"""Multi-shell multi-tissue CSD: `dwi2fod msmt_csd`'s solve, the multi-tissue signal term and
`invtract fit --dwi DWI --response WM GM CSF` alone.

References `tests/data/csd/msmt_*_ref.mif`: MRtrix3 3.0.3 `dwi2fod msmt_csd` on the crop with
the subject's `dwi2response dhollander` responses (commands in tests/data/csd/README.md); these
tests do not need MRtrix. The whole subject (2218 voxels) is checked by
`test_msmt_whole_subject` (slow) against references made there with MRtrix when it is installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from invtract.cli import main
from invtract.fit.signal_term import SignalTerm
from invtract.fod.csd import csd_objective, load_response
from invtract.fod.msmt import msmt_model, msmt_solve, residual_signals, wm_signal_model
from invtract.io.gradients import read_mif_scheme
from invtract.io.mif import read_mif
from invtract.losses.signal import signal_loss

CSD = Path(__file__).resolve().parents[1] / "data" / "csd"
TISSUES = ("wm", "gm", "csf")
SUBJECT = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_msmt15" / "source"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def crop():
    dwi = read_mif(CSD / "dwi.mif")[0]
    mask = read_mif(CSD / "mask.mif")[0].astype(bool)
    resp = [load_response(CSD / f"response_msmt_{t}.txt", anisotropic=False) for t in TISSUES]
    refs = [read_mif(CSD / f"msmt_{t}_ref.mif")[0] for t in TISSUES]
    model = msmt_model(read_mif_scheme(CSD / "dwi.mif"), resp)
    return dwi, mask, resp, refs, model


def test_model_layout(crop):
    _, _, _, _, model = crop
    assert model.lmax == (8, 0, 0) and model.tissues == ((0, 45), (45, 46), (46, 47))
    assert model.shells == (0.5, 700.0, 1200.0, 2800.0)
    assert tuple(model.C.shape) == (102, 47) and tuple(model.A.shape) == (302, 47)


def test_solve_reproduces_msmt_csd(crop):
    dwi, mask, _, refs, model = crop
    X = msmt_solve(torch.as_tensor(dwi[mask]), model).numpy()
    for (a, b), ref in zip(model.tissues, refs):
        r = ref[mask].reshape(X.shape[0], -1)
        assert _rel(X[:, a:b], r) < 1e-4  # ~2e-5 measured (float32 output, solver tolerance)
    # the hard constraint holds, and it is active somewhere (else this would be plain LS)
    amp = X @ model.A.numpy().T
    assert amp.min() > -1e-6 * np.abs(amp).max()
    Q = model.C.T @ model.C
    free = torch.linalg.solve(Q, (torch.as_tensor(dwi[mask], dtype=torch.float64) @ model.C).T)
    assert float((model.A @ free).min()) < -1e-3


def test_solve_is_optimal(crop):
    """KKT: no feasible direction lowers the objective (random feasible perturbations)."""
    dwi, mask, _, _, model = crop
    b = torch.as_tensor(dwi[mask][:5], dtype=torch.float64)
    X = msmt_solve(b, model)

    def f(x):
        return (x @ model.C.T - b).pow(2).sum(-1) + model.norm_lambda * x.pow(2).sum(-1)

    g = torch.Generator().manual_seed(0)
    f0 = f(X)
    for _ in range(50):
        Y = X + 1e-2 * torch.randn(X.shape, generator=g, dtype=torch.float64) * X.abs().max()
        feasible = ((Y @ model.A.T) >= 0).all(-1)
        assert bool((f(Y)[feasible] >= f0[feasible] - 1e-9 * f0[feasible]).all())


def test_wm_signal_term_zero_at_solution_and_gradcheck(crop):
    dwi, mask, resp, _, _ = crop
    term = SignalTerm.build(dwi, read_mif_scheme(CSD / "dwi.mif"), resp, mask, keep_csd=True)
    assert term.msmt is not None and term.model.clamp_signal is False
    assert term.model.M.shape == (102, 45) and term.variance > 0
    vox = torch.nonzero(term.usable).flatten()
    c = term.csd[vox].double()
    assert abs(float(term(c, vox))) < 1e-6
    torch.manual_seed(0)
    assert float(term(c + 0.05 * torch.randn_like(c), vox)) > 0.1
    b = term.signal(vox[:2]).double()
    x = (c[:2] + 0.05 * torch.randn_like(c[:2])).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda y: signal_loss(y, b, term.model, term.variance), (x,), eps=1e-6, atol=1e-5
    )


def test_residual_signals_are_the_other_tissues(crop):
    dwi, mask, _, _, model = crop
    b = torch.as_tensor(dwi[mask][:3], dtype=torch.float64)
    X = msmt_solve(b, model)
    r = residual_signals(b, X, model)
    wm = wm_signal_model(model)
    torch.testing.assert_close(r - X[:, :45] @ wm.M.T, b - X @ model.C.T)
    f = csd_objective(X[:, :45], r, wm)
    torch.testing.assert_close(f, (X @ model.C.T - b).pow(2).sum(-1) + wm.norm_lambda
                               * X[:, :45].pow(2).sum(-1))  # fmt: skip


def test_response_rows_must_match_shells(crop, tmp_path):
    _, _, resp, _, _ = crop
    bad = tmp_path / "wm.txt"
    bad.write_text("1000 -300 100\n")
    from invtract.errors import ConfigError

    with pytest.raises(ConfigError, match="one row per shell"):
        msmt_model(read_mif_scheme(CSD / "dwi.mif"), [load_response(bad), *resp[1:]])


def test_cli_msmt_alone_reproduces_dwi2fod(tmp_path, crop):
    _, mask, _, refs, _ = crop
    run = tmp_path / "msmt"
    resp = [str(CSD / f"response_msmt_{t}.txt") for t in TISSUES]
    assert main(["fit", "--fit", "fod", "--dwi", str(CSD / "dwi.mif"), "--mask",
                 str(CSD / "mask.mif"), "--response", *resp, "--run", str(run)]) == 0  # fmt: skip
    res = json.loads((run / "result.json").read_text())
    assert res["mode"] == "msmt_csd" and res["n_voxels"] == 75 and res["n_directions"] == 102
    assert res["fitted_tissues"] == ["fitted_tissue2.nii.gz", "fitted_tissue3.nii.gz"]
    outs = [run / "fitted_fod.nii.gz"] + [run / f for f in res["fitted_tissues"]]
    for out, ref in zip(outs, refs):
        got = nib.load(out).get_fdata().reshape(ref.shape)
        assert _rel(got, ref) < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dwi2fod") is None, reason="needs MRtrix3 (dwi2fod)")
@pytest.mark.skipif(not SUBJECT.exists(), reason="needs ../shared/data/real_msmt15/source")
def test_msmt_whole_subject(tmp_path):
    """The whole real_msmt15 subject: responses by dwi2response dhollander, reference by
    dwi2fod msmt_csd, against `invtract fit --dwi ... --response WM GM CSF` (~1 min)."""
    dwi, mask = SUBJECT / "dwi.mif", SUBJECT / "mask.mif"
    resp = [str(tmp_path / f"{t}.txt") for t in TISSUES]
    subprocess.run(["dwi2response", "dhollander", str(dwi), *resp, "-mask", str(mask),
                    "-quiet", "-nthreads", "1"], check=True, cwd=tmp_path)  # fmt: skip
    refs = [str(tmp_path / f"{t}.mif") for t in TISSUES]
    args = [x for pair in zip(resp, refs) for x in pair]
    subprocess.run(["dwi2fod", "msmt_csd", str(dwi), *args, "-mask", str(mask), "-quiet",
                    "-nthreads", "1"], check=True)  # fmt: skip
    run = tmp_path / "run"
    assert main(["fit", "--fit", "fod", "--dwi", str(dwi), "--mask", str(mask), "--response",
                 *resp, "--run", str(run)]) == 0  # fmt: skip
    res = json.loads((run / "result.json").read_text())
    outs = [run / "fitted_fod.nii.gz"] + [run / f for f in res["fitted_tissues"]]
    for out, ref in zip(outs, refs):
        r = read_mif(ref)[0]
        assert _rel(nib.load(out).get_fdata().reshape(r.shape), r) < 1e-3


def test_wm_signal_term_solves_lazily(crop, monkeypatch):
    """Multi-tissue, beyond NOISE_SAMPLE voxels: a voxel's residual signals and reference are
    made on first use, equal to those of the term that solved every voxel."""
    import invtract.fit.signal_term as st

    dwi, mask, resp, _, _ = crop
    grad = read_mif_scheme(CSD / "dwi.mif")
    full = SignalTerm.build(dwi, grad, resp, mask, keep_csd=True)
    monkeypatch.setattr(st, "NOISE_SAMPLE", 10)
    lazy = SignalTerm.build(dwi, grad, resp, mask)
    vox = torch.nonzero(lazy.usable).flatten()
    assert vox.numel() > 10 and int((lazy.solved & lazy.usable).sum()) == 10
    some = vox[1::2]
    assert not bool(lazy.solved[some].all())
    c = full.csd[some].double()
    assert abs(float(lazy(c, some))) < 1e-6  # zero at the solution: residual signals made
    torch.testing.assert_close(lazy.signal(some), full.signal(some), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(lazy.reference[some], full.reference[some], rtol=1e-9, atol=1e-9)
