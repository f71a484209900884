"""CSD: the forward model, dwi2fod csd's objective and solve, and `invtract fit --dwi` alone.

The reference `tests/data/csd/fod_ref.mif` was made by MRtrix3 3.0.3 `dwi2fod csd` (command in
tests/data/csd/README.md); these tests do not need MRtrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.special import eval_legendre

from invtract.cli import main
from invtract.fit.signal_term import SignalTerm, load_dwi
from invtract.fod.csd import (
    constraint_directions,
    convolution_matrix,
    csd_model,
    csd_objective,
    csd_solve,
    lmax_for_count,
    load_response,
    predict_signal,
    rotational_harmonics,
)
from invtract.fod.sh import sh_basis
from invtract.io.gradients import read_mif_scheme
from invtract.io.mif import read_mif

CSD = Path(__file__).resolve().parents[1] / "data" / "csd"


@pytest.fixture(scope="module")
def crop():
    dwi = read_mif(CSD / "dwi.mif")[0]
    ref = read_mif(CSD / "fod_ref.mif")[0].astype(np.float64)
    mask = read_mif(CSD / "mask.mif")[0].astype(bool)
    model = csd_model(read_mif_scheme(CSD / "dwi.mif"), load_response(CSD / "response_wm.txt"))
    sig = torch.as_tensor(dwi[..., model.volumes].reshape(-1, model.volumes.size))
    return dwi, ref, mask, model, sig


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_solve_reproduces_dwi2fod(crop):
    _, ref, mask, model, sig = crop
    assert model.bvalue == 2800.0 and model.volumes.size == 50 and model.lmax == 8
    F = csd_solve(sig, model, chunk=16).reshape(ref.shape).numpy() * mask[..., None]
    assert _rel(F, ref) < 1e-6  # float32 output of dwi2fod: ~3e-8 measured
    # every voxel, not just on average
    err = np.linalg.norm(F - ref, axis=-1) / np.linalg.norm(ref, axis=-1).clip(1e-6)
    assert err.max() < 1e-5


def test_solve_is_the_objective_minimiser(crop):
    """The active-set fixed point is the minimiser of csd_objective: gradient 0 there, and a
    gradient-based minimisation from zero lands on it."""
    _, _, _, model, sig = crop
    b = sig[:1].double()
    F = csd_solve(b, model)
    c = F.clone().requires_grad_(True)
    csd_objective(c, b, model).sum().backward()
    scale = (b @ model.M).norm(dim=-1, keepdim=True)  # |M^T b|
    assert float((c.grad / scale).abs().max()) < 1e-9
    x = torch.zeros_like(F, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=300, tolerance_grad=1e-12,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        f = csd_objective(x, b, model).sum()
        f.backward()
        return f

    for _ in range(3):
        opt.step(closure)
    assert _rel(x.detach(), F) < 1e-5


def test_forward_model_of_a_single_fibre():
    """A truncated delta FOD along u0 predicts the response's zonal profile at angle (u, u0)."""
    zsh = torch.tensor([822.8, -220.9, 70.0, -18.2, 3.45], dtype=torch.float64)
    rh = rotational_harmonics(zsh)
    torch.manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(40, 3, dtype=torch.float64), dim=-1)
    u0 = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64), dim=0)
    c = sh_basis(u0, 8)  # delta function
    s = predict_signal(c, convolution_matrix(dirs, rh, 8))
    x = (dirs @ u0).numpy()
    want = sum(float(zsh[i]) * math.sqrt((4 * i + 1) / (4 * math.pi)) * eval_legendre(2 * i, x)
               for i in range(5))  # fmt: skip
    np.testing.assert_allclose(s.numpy(), want, rtol=1e-10, atol=1e-9)
    # a response of lower lmax zero-pads; degrees above the FOD's lmax are dropped
    assert convolution_matrix(dirs, rh[:2], 8)[:, 15:].abs().max() == 0
    assert convolution_matrix(dirs, rh, 4).shape == (40, 15)


def test_constraint_set_and_helpers():
    d = constraint_directions()
    assert d.shape == (300, 3)
    np.testing.assert_allclose(d.norm(dim=-1).numpy(), 1.0, atol=1e-12)
    assert float((d @ d.T - 2 * torch.eye(300, dtype=d.dtype)).max()) < 0.999  # distinct
    assert [lmax_for_count(n) for n in (5, 6, 15, 20, 30, 45, 50)] == [0, 2, 4, 4, 6, 8, 8]
    r = load_response(CSD / "response_wm.txt")
    assert r.bvalues == (2800.0,) and r.zsh.shape == (1, 5) and r.lmax == 8


def test_objective_gradcheck(crop):
    _, _, _, model, sig = crop
    b = sig[:1].double()
    F = csd_solve(b, model)
    torch.manual_seed(1)
    c = (F + 0.05 * torch.randn_like(F)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: csd_objective(x, b, model), (c,), eps=1e-6,
                                    atol=1e-4, rtol=1e-6)  # fmt: skip


def test_nonfinite_and_negative_signals(crop):
    _, _, _, model, sig = crop
    b = sig[:2].double().clone()
    b[0, 3] = float("nan")
    F = csd_solve(b, model)
    assert float(F[0].abs().max()) == 0.0
    b2 = sig[1:2].double().clone()
    b2[0, :5] = -100.0
    c1 = csd_solve(b2, model)
    b2[0, :5] = 0.0
    assert torch.equal(c1, csd_solve(b2, model))  # negative signal counts as 0


@pytest.mark.parametrize("fsl", [False, True])
def test_cli_csd_alone_reproduces_dwi2fod(tmp_path, crop, fsl, capsys):
    _, ref, _, _, _ = crop
    if fsl:
        inputs = ["--dwi", str(CSD / "dwi.nii.gz"), "--fslgrad", str(CSD / "dwi.bvec"),
                  str(CSD / "dwi.bval"), "--mask", str(CSD / "mask.nii.gz")]  # fmt: skip
    else:
        inputs = ["--dwi", str(CSD / "dwi.mif"), "--mask", str(CSD / "mask.mif")]
    run = tmp_path / "csd"
    assert main(["fit", "--fit", "fod", *inputs, "--response", str(CSD / "response_wm.txt"),
                 "--run", str(run)]) == 0  # fmt: skip
    out = nib.load(run / "fitted_fod.nii.gz")
    assert _rel(out.get_fdata(), ref) < 1e-3
    np.testing.assert_allclose(out.affine, read_mif(CSD / "fod_ref.mif")[1], atol=1e-4)
    res = json.loads((run / "result.json").read_text())
    assert res["n_voxels"] == 75 and res["n_directions"] == 50 and res["noise_sigma"] > 0


def test_cli_csd_alone_through_a_scratch_output_writes_the_same_files(tmp_path, monkeypatch):
    """CSD alone keeps an output over ``scratch.SCRATCH_BYTES`` in a scratch file (written block by
    block, pages released, saved from released slabs): same FOD file, same result.json
    numbers; the RMS residual summed while solving equals ``SignalTerm.residual``'s."""
    import tempfile

    from invtract.fit import signal_term
    from invtract.io import scratch

    made = []
    real = scratch.scratch_array
    monkeypatch.setattr(scratch, "scratch_array", lambda *a: made.append(a) or real(*a))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(signal_term, "SOLVE_BLOCK", 16)  # several blocks
    args = ["fit", "--fit", "fod", "--dwi", str(CSD / "dwi.mif"), "--mask", str(CSD / "mask.mif"),
            "--response", str(CSD / "response_wm.txt")]  # fmt: skip
    out = {}
    for name, limit in (("ram", scratch.SCRATCH_BYTES), ("scratch", 0)):
        monkeypatch.setattr(scratch, "SCRATCH_BYTES", limit)
        assert main([*args, "--run", str(tmp_path / name)]) == 0
        res = json.loads((tmp_path / name / "result.json").read_text())
        out[name] = (res, (tmp_path / name / "fitted_fod.nii.gz").read_bytes())
    assert len(made) == 1 and list((tmp_path / "tmp").iterdir()) == []
    assert out["ram"][1] == out["scratch"][1]
    for key in ("n_voxels", "noise_sigma", "signal_rms_residual"):
        assert out["ram"][0][key] == out["scratch"][0][key]

    dwi, grad = load_dwi(str(CSD / "dwi.mif"))
    mask = read_mif(CSD / "mask.mif")[0] > 0
    term = SignalTerm.build(dwi, grad, load_response(CSD / "response_wm.txt"), mask, True)
    vox = torch.nonzero(term.usable).flatten()
    assert term.csd_rms == term.residual(term.csd, vox) > 0


def test_rotation_generators_turn_the_fod():
    """L_x c is the derivative of the coefficients of the FOD rotated about x: a small step
    along it moves a z-peak to (0, -sin t, cos t); the generators keep each degree's energy."""
    from invtract.fit.objective import fibonacci_sphere
    from invtract.fod.csd import rotation_generators

    L = rotation_generators(8)
    c = sh_basis(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 8)
    t = 1e-4
    d = torch.tensor([[0.0, -math.sin(t), math.cos(t)]], dtype=torch.float64)
    # rotated delta function = delta at the rotated direction (first order in t)
    np.testing.assert_allclose((c + t * (L[0] @ c)).numpy(), sh_basis(d, 8)[0].numpy(), atol=1e-6)
    for i in range(3):  # antisymmetric: rotations preserve the norm
        np.testing.assert_allclose(L[i].numpy(), -L[i].T.numpy(), atol=1e-7)
    # a generic FOD: the derivative matches a finite rotation of its amplitudes
    torch.manual_seed(2)
    c = torch.randn(45, dtype=torch.float64)
    u = fibonacci_sphere(50)
    R = torch.tensor([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]],
                     dtype=torch.float64)  # fmt: skip
    rotated = sh_basis(u @ R, 8) @ c  # amplitude at R^T u
    first_order = sh_basis(u, 8) @ (c + t * (L[0] @ c))
    np.testing.assert_allclose(first_order.numpy(), rotated.numpy(), atol=1e-6)


def test_cli_signal_errors(tmp_path, capsys):
    dwi = str(CSD / "dwi.mif")
    resp = str(CSD / "response_wm.txt")
    # --dwi needs --response; --response needs --dwi; --fit params cannot use the signal
    assert main(["fit", "--fit", "fod", "--dwi", dwi, "--run", str(tmp_path / "a")]) == 1
    assert "--response" in capsys.readouterr().err
    tgt = str(CSD / "README.md")  # never read: the check comes first
    assert main(["fit", "--fit", "params", "--target", tgt, "--fod", str(CSD / "fod_ref.mif"),
                 "--dwi", dwi, "--response", resp, "--run", str(tmp_path / "b")]) == 1  # fmt: skip
    assert "--fit fod" in capsys.readouterr().err
    assert main(["fit", "--fit", "fod", "--dwi", str(CSD / "mask.mif"), "--response", resp,
                 "--run", str(tmp_path / "c")]) == 1  # fmt: skip
    assert "4-D" in capsys.readouterr().err
