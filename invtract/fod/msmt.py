"""Multi-shell multi-tissue CSD (``dwi2fod msmt_csd``): forward model and hard-constrained solve.

Conventions are MRtrix3 3.0.3's (``src/dwi/sdeconv/msmt_csd.h``,
``core/math/constrained_least_squares.h``):

* One response per tissue, one row per shell of the gradient table (every shell, b=0 included,
  sorted by b-value), zonal SH coefficients l = 0, 2, ... Trailing all-zero columns are dropped;
  a tissue's lmax is that of its response, at most 8 (an isotropic tissue has lmax 0).
* Forward model over every volume: ``s = C x``, ``x`` the tissues' SH coefficients stacked
  (WM first when it is the first response), ``C [N, P]`` block rows per shell: the SH basis on
  the volume's direction times the tissue's rotational harmonics for that shell (a volume with
  a zero direction keeps only its l = 0 term, as MRtrix's NaN-to-0).
* Constraint: every anisotropic tissue's amplitude is >= 0 on the 300 constraint directions of
  :func:`~invtract.fod.csd.constraint_directions`; every isotropic tissue's l = 0 coefficient is
  >= 0. A hard constraint (MRtrix's ICLS): ``min |C x - b|^2 s.t. A x >= 0``, with
  ``1e-10 x max diag(C^T C)`` added to the normal matrix (``norm_lambda``). Signals are used as
  measured (no clamping at 0, unlike ``dwi2fod csd``).
* Solve: the problem is strictly convex, so its minimiser is unique; :func:`msmt_solve` finds it
  through the dual, a non-negative least-squares problem in the constraint multipliers (exact
  Lawson-Hanson active set, ``scipy.optimize.nnls``), instead of MRtrix's own dual active-set
  iteration: same minimiser, to rounding.

Shapes: ``V`` voxels, ``N`` volumes, ``P`` stacked coefficients of all tissues.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .csd import CSDModel, Response, constraint_directions, rotational_harmonics, sh_degree
from .sh import sh_basis

__all__ = ["MSMTModel", "msmt_model", "msmt_solve", "residual_signals", "wm_signal_model"]

_MIN_NORM = 1.0e-10  # MRtrix DEFAULT_MSMTCSD_NORM_LAMBDA
_DEFAULT_LMAX = 8


@dataclass(frozen=True)
class MSMTModel:
    """The multi-tissue problem (float64 tensors).

    Attributes:
        C: ``[N, P]`` forward matrix over every volume.
        A: ``[Q, P]`` constraint matrix (``A x >= 0``).
        tissues: ``(start, stop)`` column range of each tissue in ``P``.
        lmax: lmax of each tissue.
        shells: mean b-value of each shell (b=0 first).
        norm_lambda: added to the diagonal of ``C^T C``.
        wm_zsh0: the first tissue's l = 0 response of the largest shell (penalty scale).
    """

    C: torch.Tensor
    A: torch.Tensor
    tissues: tuple[tuple[int, int], ...]
    lmax: tuple[int, ...]
    shells: tuple[float, ...]
    norm_lambda: float
    wm_zsh0: float

    @property
    def n_params(self) -> int:
        """P."""
        return int(self.C.shape[1])


def _trimmed(zsh: np.ndarray) -> np.ndarray:
    """Response rows with MRtrix's trailing all-zero columns removed (at least one column)."""
    nz = np.nonzero(np.any(zsh != 0, axis=0))[0]
    return zsh[:, : (int(nz[-1]) + 1 if nz.size else 1)]


def _basis(grad: np.ndarray, lmax: int) -> torch.Tensor:
    """``[N, K]`` SH basis on the table's directions; zero directions keep only l = 0."""
    d = torch.as_tensor(grad[:, :3], dtype=torch.float64)
    n = d.norm(dim=-1)
    zero = n < 1e-12
    safe = torch.where(zero[:, None], torch.tensor([0.0, 0.0, 1.0], dtype=d.dtype), d)
    Y = sh_basis(safe / safe.norm(dim=-1, keepdim=True), lmax)
    Y[zero, 1:] = 0.0
    return Y


def msmt_model(grad: np.ndarray, responses: list[Response], lmax=None) -> MSMTModel:
    """:class:`MSMTModel` of a table and one response per tissue (as ``dwi2fod msmt_csd``).

    Args:
        grad: ``[N, 4]`` normalised gradient table (scanner frame).
        responses: one :class:`~invtract.fod.csd.Response` per tissue, one row per shell.
        lmax: per-tissue lmax (default: each response's, at most 8).
    """
    from ..io.gradients import shells

    sh = shells(grad)
    zs = [_trimmed(r.zsh) for r in responses]
    for i, z in enumerate(zs):
        if z.shape[0] != len(sh):
            raise ConfigError(
                f"response {i + 1} has {z.shape[0]} rows, the DWI has {len(sh)} shells "
                f"(b = {', '.join(f'{s.mean:.0f}' for s in sh)}): give one row per shell"
            )
    lmaxes = [min(2 * (z.shape[1] - 1), _DEFAULT_LMAX) for z in zs] if lmax is None else lmax
    lmaxes = [int(v) for v in lmaxes]
    if len(lmaxes) != len(zs) or any(v < 0 or v % 2 for v in lmaxes):
        raise ConfigError(f"lmax must be one non-negative even integer per tissue, got {lmaxes}")
    Y = _basis(grad, max(lmaxes))
    dirs = constraint_directions()
    cols, rows, tissues, start = [], [], [], 0
    for z, L in zip(zs, lmaxes):
        K = (L + 1) * (L + 2) // 2
        rh = torch.zeros(len(sh), L // 2 + 1, dtype=torch.float64)
        m = min(L // 2 + 1, z.shape[1])
        rh[:, :m] = rotational_harmonics(torch.as_tensor(z[:, :m], dtype=torch.float64))
        block = torch.zeros(grad.shape[0], K, dtype=torch.float64)
        deg = sh_degree(L)
        for s, shell in enumerate(sh):
            v = torch.as_tensor(shell.volumes)
            block[v] = Y[v, :K] * rh[s, deg]
        cols.append(block)
        rows.append(sh_basis(dirs, L) if L > 0 else sh_basis(dirs[:1], 0))
        tissues.append((start, start + K))
        start += K
    C = torch.cat(cols, 1)
    A = torch.block_diag(*rows)
    norm = _MIN_NORM * float((C * C).sum(0).max())
    return MSMTModel(C, A, tuple(tissues), tuple(lmaxes), tuple(s.mean for s in sh), norm,
                     float(zs[0][-1, 0]))  # fmt: skip


def msmt_solve(signals: torch.Tensor, model: MSMTModel) -> torch.Tensor:
    """Per-voxel minimiser of ``|C x - b|^2 + norm_lambda |x|^2`` s.t. ``A x >= 0`` (float64).

    Args:
        signals: ``[V, N]`` signals of every volume; a voxel with a non-finite signal gets 0.

    Returns:
        ``[V, P]`` float64 stacked tissue coefficients (not differentiable: a solver).

    Method: with ``Q = C^T C + norm_lambda I = L L^T`` and ``y = L^T x``, the problem is the
    projection of ``y_u = L^-1 C^T b`` onto the cone ``B y >= 0`` (``B = A L^-T``); its dual
    is ``min_{l >= 0} |B^T l + y_u|`` (NNLS) and ``y = y_u + B^T l``.
    """
    from scipy.optimize import nnls

    C, A = model.C, model.A
    Q = C.T @ C + model.norm_lambda * torch.eye(C.shape[1], dtype=torch.float64)
    L = torch.linalg.cholesky(Q)
    Bt = torch.linalg.solve_triangular(L, A.T, upper=False)  # [P, Qc] = L^-1 A^T = B^T
    b = signals.to(torch.float64)
    ok = torch.isfinite(b).all(-1)
    b = torch.where(ok[:, None], b, torch.zeros_like(b))
    Yu = torch.linalg.solve_triangular(L, (b @ C).T, upper=False).T  # [V, P]
    Y = Yu.clone()
    infeasible = ((Yu @ Bt) < 0).any(-1) & ok
    Bt_np = Bt.numpy()
    for v in torch.nonzero(infeasible).flatten().tolist():
        lam, _ = nnls(Bt_np, -Yu[v].numpy(), maxiter=50 * Bt_np.shape[1])
        Y[v] = Yu[v] + torch.as_tensor(Bt_np @ lam)
    X = torch.linalg.solve_triangular(L.T, Y.T, upper=True).T
    X[~ok] = 0.0
    return X


def wm_signal_model(model: MSMTModel, neg_lambda: float = 1.0) -> CSDModel:
    """The first tissue's part of the problem as a :class:`~invtract.fod.csd.CSDModel` for the
    signal term, the other tissues' coefficients held fixed (subtract their predicted signal
    from the measurements: :func:`residual_signals`).

    The hard constraint becomes the single-shell term's squared-hinge penalty on the 300
    constraint directions, scaled as ``dwi2fod csd`` does with the largest shell's l = 0
    response (``neg_lambda x 50 x zsh_0 / 300``); signals are not clamped at 0.
    """
    a, b = model.tissues[0]
    L = model.lmax[0]
    if L == 0:
        raise ConfigError("the first response (the FOD's tissue) must be anisotropic (lmax > 0)")
    dirs = constraint_directions()
    scale = neg_lambda * 50.0 * model.wm_zsh0 / dirs.shape[0]
    return CSDModel(
        volumes=np.arange(model.C.shape[0]),
        bvalue=float(model.shells[-1]),
        M=model.C[:, a:b].clone(),
        H=sh_basis(dirs, L) * scale,
        norm_lambda=model.norm_lambda,
        threshold=0.0,
        init=torch.zeros(1, model.C.shape[0], dtype=torch.float64),
        lmax=L,
        clamp_signal=False,
    )


def residual_signals(signals: torch.Tensor, x: torch.Tensor, model: MSMTModel) -> torch.Tensor:
    """``[V, N]`` measurements minus the predicted signal of every tissue but the first.

    Args:
        signals: ``[V, N]`` measured signals; x: ``[V, P]`` stacked coefficients.
    """
    a, b = model.tissues[0]
    rest = torch.ones(model.n_params, dtype=torch.bool)
    rest[a:b] = False
    return signals.to(torch.float64) - x[:, rest] @ model.C[:, rest].T
