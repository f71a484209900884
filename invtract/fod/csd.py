"""Constrained spherical deconvolution (CSD): the forward model and ``dwi2fod csd``'s solve.

Pure torch functions (float64 recommended). Conventions are MRtrix3 3.0.3's
(``src/dwi/sdeconv/csd.h``, ``cmd/dwi2fod.cpp``, ``core/math/ZSH.h``):

* Response (``response_wm.txt``): one row per shell, the zonal SH coefficients of the
  single-fibre signal at l = 0, 2, ..., lmax. Its rotational harmonics are
  ``RH_l = zsh_l * sqrt(4 pi / (2l + 1))``.
* Forward model: the predicted signal of a voxel on a shell with gradient directions ``u_n`` is
  ``s_n = sum_k Y_k(u_n) RH_{l(k)} c_k`` -- the SH basis of :mod:`invtract.fod.sh` (scanner
  frame) times the FOD coefficients scaled per degree l by the response (zero above the
  response's lmax). ``M = Y diag(RH)`` is ``[N, K]``.
* Constraint: the FOD amplitude on a dense set of directions (MRtrix's 300-direction
  electrostatic-repulsion set), scaled by ``neg_lambda * 50 * zsh_0 / 300`` (``H``, ``[300, K]``).
* CSD minimises, per voxel, the convex C1 function

  ``f(c) = |M c - b|^2 + norm_lambda' |c|^2 + sum_n min(H_n c, 0)^2``

  with ``norm_lambda' = norm_lambda * 2e-4 * (M^T M)_00`` (a quadratic, not exact, penalty: a
  negative lobe is damped, not removed). ``dwi2fod csd`` finds its minimiser by an active-set
  iteration: start from a regularised inverse of the low-order problem, then repeatedly solve
  the normal equations with the rows of ``H`` where the amplitude is below the threshold (0),
  until that set no longer changes (at most ``niter`` = 50 solves). The fixed point is the
  stationary point of ``f``. Signals below 0 are set to 0; a voxel with a non-finite signal
  gets a zero FOD. Only the largest non-zero shell is used (``dwi2fod csd`` is single-shell).

Shapes: ``V`` voxels, ``N`` gradient directions of the shell, ``K`` SH coefficients,
``P`` constraint directions. Signals are in the DWI's units; FOD coefficients in MRtrix's units
(amplitude = sum of coefficient x basis).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, FormatError
from .sh import sh_basis

__all__ = [
    "CSDModel",
    "Response",
    "load_response",
    "constraint_directions",
    "rotational_harmonics",
    "sh_degree",
    "convolution_matrix",
    "csd_model",
    "predict_signal",
    "csd_objective",
    "csd_solve",
    "lmax_for_count",
    "rotation_generators",
]

_NORM_LAMBDA_MULTIPLIER = 2e-4
_DIRS300 = Path(__file__).resolve().parent.parent / "data" / "mrtrix_dirs300.txt"


@dataclass(frozen=True)
class Response:
    """A response function file: ``zsh [S, L]`` (rows = shells), ``bvalues`` from ``# Shells:``."""

    zsh: np.ndarray
    bvalues: tuple[float, ...] | None

    @property
    def lmax(self) -> int:
        """Even lmax of the zonal coefficients."""
        return 2 * (self.zsh.shape[1] - 1)


def load_response(path: str | os.PathLike, anisotropic: bool = True) -> Response:
    """Read ``response_wm.txt`` (numeric rows; ``# Shells: b1,b2`` comment optional).

    ``anisotropic=False`` also accepts an isotropic (l = 0 only) response (GM / CSF of
    ``dwi2fod msmt_csd``)."""
    rows, bvals = [], None
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FormatError(f"cannot read response {path}: {e}") from None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            body = s[1:].strip()
            if body.lower().startswith("shells:"):
                parts = body.split(":", 1)[1].replace(",", " ").split()
                bvals = tuple(float(v) for v in parts)
            continue
        if s:
            rows.append([float(v) for v in s.replace(",", " ").split()])
    if not rows or len({len(r) for r in rows}) != 1:
        raise FormatError(f"{path}: a response needs rows of equal length, got {rows[:3]}")
    zsh = np.asarray(rows, dtype=np.float64)
    if anisotropic and zsh.shape[1] < 2:
        raise FormatError(f"{path}: the response has no anisotropic (l >= 2) terms")
    return Response(zsh, bvals)


@lru_cache(maxsize=1)
def _dirs300() -> np.ndarray:
    azel = np.loadtxt(_DIRS300, dtype=np.float64)
    az, el = azel[:, 0], azel[:, 1]
    return np.stack([np.sin(el) * np.cos(az), np.sin(el) * np.sin(az), np.cos(el)], 1)


def constraint_directions(dtype=torch.float64) -> torch.Tensor:
    """``[300, 3]`` unit directions of ``dwi2fod csd``'s default constraint set."""
    return torch.as_tensor(_dirs300(), dtype=dtype)


def lmax_for_count(n: int) -> int:
    """Largest even lmax whose coefficient count fits in ``n`` measurements (MRtrix LforN)."""
    return 2 * int(math.floor((math.sqrt(1.0 + 8.0 * n) - 3.0) / 4.0)) if n else 0


def rotational_harmonics(zsh: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` rotational harmonics ``zsh_l sqrt(4 pi / (2l+1))`` of zonal coefficients."""
    ls = torch.arange(zsh.shape[-1], dtype=zsh.dtype, device=zsh.device) * 2
    return zsh * torch.sqrt(4.0 * math.pi / (2.0 * ls + 1.0))


def sh_degree(lmax: int) -> torch.Tensor:
    """``[K]`` index l/2 of each coefficient's degree (``K = n_coeffs(lmax)``)."""
    return torch.cat([torch.full((2 * l + 1,), l // 2) for l in range(0, lmax + 1, 2)])


def convolution_matrix(dirs: torch.Tensor, rh: torch.Tensor, lmax: int) -> torch.Tensor:
    """``M [N, K]``: FOD coefficients -> signal on ``dirs`` for rotational harmonics ``rh``.

    Args:
        dirs: ``[N, 3]`` unit gradient directions, scanner frame.
        rh: ``[L']`` rotational harmonics (l = 0, 2, ...); degrees above ``L'`` get zero,
            extra entries beyond ``lmax`` are ignored.
        lmax: even lmax of the FOD.
    """
    L = lmax // 2 + 1
    r = torch.zeros(L, dtype=dirs.dtype, device=dirs.device)
    m = min(L, rh.shape[-1])
    r[:m] = rh[:m].to(dirs.dtype)
    return sh_basis(dirs, lmax) * r[sh_degree(lmax).to(dirs.device)]


@dataclass(frozen=True)
class CSDModel:
    """Everything the CSD objective and solve need for one shell (all float64 tensors).

    Attributes:
        volumes: ``[N]`` DWI volume indices of the shell used (numpy int64).
        bvalue: its mean b-value (s/mm^2).
        M: ``[N, K]`` forward (convolution) matrix.
        H: ``[P, K]`` scaled constraint matrix (amplitude x ``neg_lambda * 50 * zsh_0 / P``).
        norm_lambda: ``norm_lambda * 2e-4 * (M^T M)_00`` (added to the normal matrix).
        threshold: amplitude threshold x the constraint scale (0 by default).
        init: ``[K0, N]`` the starting-point map (``rconv``), K0 <= K.
        lmax: FOD lmax.
        niter: maximum active-set solves.
        clamp_signal: measured signals below 0 count as 0 (``dwi2fod csd``); False for the
            multi-tissue term (:func:`invtract.fod.msmt.wm_signal_model`).
    """

    volumes: np.ndarray
    bvalue: float
    M: torch.Tensor
    H: torch.Tensor
    norm_lambda: float
    threshold: float
    init: torch.Tensor
    lmax: int
    niter: int = 50
    clamp_signal: bool = True

    @property
    def n_coeffs(self) -> int:
        """K."""
        return int(self.M.shape[1])


def _init_map(dirs: torch.Tensor, rh: torch.Tensor, lmax_init: int) -> torch.Tensor:
    """``rconv [K0, N]``: regularised pseudo-inverse of the low-order problem (dwi2fod start)."""
    Y = sh_basis(dirs, lmax_init).clone()
    d = min(Y.shape)
    Y[torch.arange(d), torch.arange(d)] += 1.0e-2  # MRtrix adds 0.01 to the matrix's diagonal
    r = torch.linalg.pinv(Y)
    filt = torch.zeros(lmax_init // 2 + 1, dtype=dirs.dtype)
    filt[:3] = 1.0  # default init_filter: 1 for l = 0, 2, 4
    L = sh_degree(lmax_init)
    return r * (filt[L] / rh[L])[:, None]


def csd_model(
    grad: np.ndarray,
    response: Response,
    lmax: int | None = None,
    *,
    neg_lambda: float = 1.0,
    norm_lambda: float = 1.0,
    threshold: float = 0.0,
    niter: int = 50,
) -> CSDModel:
    """Build :class:`CSDModel` for the largest non-zero shell of ``grad`` (as ``dwi2fod csd``).

    Args:
        grad: ``[N_all, 4]`` normalised gradient table (scanner frame; see
            :mod:`invtract.io.gradients`).
        response: single-shell response (one row; a multi-row file uses the row whose
            ``# Shells`` b-value matches the largest shell, else the last row).
        lmax: FOD lmax (default: min(response lmax, 8)).
        neg_lambda, norm_lambda, threshold, niter: ``dwi2fod csd`` options of the same names.
    """
    from ..io.gradients import shells

    sh = [s for s in shells(grad) if not s.is_bzero]
    if not sh:
        raise ConfigError("the gradient table has no non-zero shell")
    shell = sh[-1]
    zsh = response.zsh[-1]
    if response.zsh.shape[0] > 1 and response.bvalues:
        near = [i for i, b in enumerate(response.bvalues) if abs(b - shell.mean) < 80.0]
        zsh = response.zsh[near[0] if near else -1]
    lmax_resp = 2 * (zsh.size - 1)
    lmax = int(lmax) if lmax else min(lmax_resp, 8)
    if lmax <= 0 or lmax % 2:
        raise ConfigError(f"lmax must be a positive even integer, got {lmax}")
    n = shell.volumes.size
    lmax_data = lmax_for_count(n)
    if lmax_data <= 0:
        raise ConfigError(f"the shell b={shell.mean:.0f} has too few directions ({n})")
    dirs = torch.as_tensor(grad[shell.volumes, :3], dtype=torch.float64)
    rh = rotational_harmonics(torch.as_tensor(zsh, dtype=torch.float64))
    M = convolution_matrix(dirs, rh, lmax)
    lmax_init = min(lmax_resp, lmax_data, lmax)
    P = _dirs300().shape[0]
    scale = neg_lambda * 50.0 * float(zsh[0]) / P
    H = sh_basis(constraint_directions(), lmax) * scale
    MtM00 = float((M[:, 0] ** 2).sum())
    return CSDModel(
        volumes=shell.volumes,
        bvalue=shell.mean,
        M=M,
        H=H,
        norm_lambda=norm_lambda * _NORM_LAMBDA_MULTIPLIER * MtM00,
        threshold=threshold * scale,
        init=_init_map(dirs, rh, lmax_init),
        lmax=lmax,
        niter=niter,
    )


def predict_signal(coeffs: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` predicted signal of ``[..., K]`` FOD coefficients (``coeffs @ M^T``)."""
    return coeffs @ M.to(coeffs.dtype).T


def csd_objective(coeffs: torch.Tensor, signals: torch.Tensor, model: CSDModel) -> torch.Tensor:
    """Per-voxel CSD objective ``f(c)`` (see the module docstring).

    Args:
        coeffs: ``[V, K]`` FOD coefficients.
        signals: ``[V, N]`` measured signals of the model's shell (clamped at 0 by the caller).
        model: :class:`CSDModel`.

    Returns:
        ``[V]`` objective values (signal units squared).

    Gradients:
        Through ``coeffs`` (C1: the penalty is a squared hinge).
    """
    H = model.H.to(coeffs.dtype)
    res = predict_signal(coeffs, model.M) - signals.to(coeffs.dtype)
    amp = coeffs @ H.T
    neg = torch.where(amp < model.threshold, amp, torch.zeros_like(amp))
    return res.pow(2).sum(-1) + model.norm_lambda * coeffs.pow(2).sum(-1) + neg.pow(2).sum(-1)


def _prepare(signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b [V, N] float64 clamped at 0, ok [V])``: voxels with a non-finite signal are not ok."""
    b = signals.to(torch.float64)
    ok = torch.isfinite(b).all(-1)
    b = torch.where(torch.isfinite(b), b, torch.zeros_like(b)).clamp_min(0.0)
    return b, ok


def csd_solve(signals: torch.Tensor, model: CSDModel, chunk: int = 1024) -> torch.Tensor:
    """Per-voxel CSD coefficients by ``dwi2fod csd``'s active-set iteration (float64).

    Args:
        signals: ``[V, N]`` signals of the model's shell (``dwi[..., model.volumes]``).
        model: :class:`CSDModel`.
        chunk: voxels solved at once (memory ~ chunk x K^2 x 8 bytes).

    Returns:
        ``[V, K]`` float64 coefficients (zero where a signal is not finite). Not differentiable
        (a solver; the objective it minimises is :func:`csd_objective`).
    """
    rows, cols, _ = _lower_half(model.n_coeffs)
    HH = model.H[:, rows] * model.H[:, cols]  # [P, K(K+1)/2]: rows' outer products, lower half
    out = []
    for a in range(0, signals.shape[0], chunk):
        out.append(_solve_chunk(signals[a : a + chunk], model, HH))
    if not out:
        return torch.zeros(0, model.n_coeffs, dtype=torch.float64)
    return torch.cat(out)


def _solve_chunk(signals: torch.Tensor, model: CSDModel, HH: torch.Tensor) -> torch.Tensor:
    """The active-set iteration on ``[V, N]`` signals; ``HH [P, K(K+1)/2]``: the lower halves
    of the constraint rows' outer products, so each voxel's normal matrix ``base + sum_{p
    negative} H_p H_p^T`` is one matrix product for the whole chunk (not a ``[V, P, K]`` masked
    copy of ``H``), over the lower half only (the matrix is symmetric), then mirrored."""
    b, ok = _prepare(signals)
    V, K = b.shape[0], model.n_coeffs
    M, H = model.M, model.H
    base = M.T @ M + model.norm_lambda * torch.eye(K, dtype=torch.float64)
    rhs = b @ M  # [V, K] = M^T b
    F = torch.zeros(V, K, dtype=torch.float64)
    F[:, : model.init.shape[0]] = b @ model.init.T
    rows, cols, mirror = _lower_half(K)
    base_low = base[rows, cols]
    old = None
    active = torch.ones(V, dtype=torch.bool)
    for _ in range(model.niter):
        neg = (F @ H.T) < model.threshold  # [V, P]
        if old is not None:
            active &= (neg != old).any(-1)
        if not bool(active.any()):
            break
        idx = torch.nonzero(active).flatten()
        work = ((neg[idx].to(H.dtype) @ HH) + base_low)[:, mirror].view(-1, K, K)
        L = torch.linalg.cholesky(work)
        F[idx] = torch.cholesky_solve(rhs[idx, :, None], L)[..., 0]
        old = neg
    F[~ok] = 0.0
    return F


@lru_cache(maxsize=4)
def _lower_half(K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, mirror)``: the lower half's ``K(K+1)/2`` entries of a ``[K, K]`` matrix
    (``tril_indices`` order) and ``mirror [K*K]``, such that ``low[..., mirror]`` is the
    symmetric matrix (flattened) whose lower half is ``low``."""
    rows, cols = torch.tril_indices(K, K)
    pos = torch.zeros(K, K, dtype=torch.long)
    pos[rows, cols] = torch.arange(rows.numel())
    return rows, cols, torch.maximum(pos, pos.T).reshape(-1)


@lru_cache(maxsize=4)
def rotation_generators(lmax: int) -> torch.Tensor:
    """``[3, K, K]`` float64 generators of rotations about x, y, z acting on SH coefficients.

    ``L_i c`` is ``d/de`` of the coefficients of the FOD rotated by ``e`` rad about axis ``i``
    (scanner frame) at ``e = 0``: central difference (``e = 1e-4``) of the least-squares SH
    fit on a 2000-direction sphere (rotations keep each degree l, so the fit is exact).
    """
    from ..fit.objective import fibonacci_sphere

    d = fibonacci_sphere(2000)
    Y = sh_basis(d, lmax)
    pinv = torch.linalg.pinv(Y)
    eps = 1e-4
    out = []
    for axis in range(3):
        mats = []
        for e in (eps, -eps):
            c, s = math.cos(e), math.sin(e)
            R = torch.eye(3, dtype=torch.float64)
            a, b = [k for k in range(3) if k != axis]
            R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
            # amplitude of the rotated FOD at u is the original's at R^T u
            mats.append(pinv @ sh_basis(d @ R, lmax))
        out.append((mats[0] - mats[1]) / (2 * eps))
    return torch.stack(out)
