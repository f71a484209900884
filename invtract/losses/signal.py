"""The diffusion-signal loss term: how much worse FOD coefficients explain the DWI than CSD does.

For a voxel with measured signals ``b`` (one shell, ``[N]``) and FOD coefficients ``c``, the CSD
objective ``f(c)`` (:func:`invtract.fod.csd.csd_objective`: squared signal residual of the
forward model, ``dwi2fod csd``'s minimum-norm term and its squared-hinge non-negativity penalty on
300 directions) is minimal at ``dwi2fod csd``'s coefficients ``c*``. The term is

    ``signal = mean_v (f_v(c_v) - f_v(c*_v)) / (N sigma^2)``

over the voxels given (the learned ones), with ``sigma^2`` the noise variance per measurement
estimated from the data as the mean squared residual of the CSD fit over the mask
(:func:`noise_variance`). It is 0 at the CSD FOD and >= 0 everywhere (``c*`` minimises ``f``);
a value of 1 means the voxels' residual sum of squares grew by ``N sigma^2`` on average,
i.e. about one noise variance per measurement (a chi-square increase of ``N`` per voxel).
Minimising it alone reproduces ``dwi2fod csd``; added to the tractography loss with weight
``[loss.weights] signal``, it lets the fit change an FOD only as far as the diffusion signal
allows. Memory: ``[V, N]`` signals and ``[V, P]`` amplitudes for the ``V`` voxels passed.
"""

from __future__ import annotations

import torch

from ..fod.csd import CSDModel, csd_objective, csd_solve, predict_signal

__all__ = [
    "neighbour_pairs",
    "noise_variance",
    "signal_loss",
    "signal_residual",
    "spatial_coupling",
]


def _measured(signals: torch.Tensor, model: CSDModel, dtype=torch.float64) -> torch.Tensor:
    """Signals as the model uses them: clamped at 0 when ``model.clamp_signal`` (single shell)."""
    b = signals.to(dtype)
    return b.clamp_min(0.0) if model.clamp_signal else b


def noise_variance(signals: torch.Tensor, model: CSDModel, coeffs: torch.Tensor | None = None):
    """Noise variance per measurement: mean squared residual of the CSD fit (signal units^2).

    Args:
        signals: ``[V, N]`` signals of the model's shell (e.g. every mask voxel).
        model: :class:`~invtract.fod.csd.CSDModel`.
        coeffs: ``[V, K]`` CSD coefficients (solved when None).

    Returns:
        float ``sigma^2`` (> 0).
    """
    b = _measured(signals, model)
    ok = torch.isfinite(b).all(-1)
    b = b[ok]
    c = csd_solve(b, model) if coeffs is None else coeffs[ok].to(torch.float64)
    r = predict_signal(c, model.M) - b
    return max(float(r.pow(2).mean()), 1e-12)


def signal_residual(coeffs: torch.Tensor, signals: torch.Tensor, model: CSDModel) -> torch.Tensor:
    """``[V]`` root-mean-square residual ``|M c - b| / sqrt(N)`` (signal units) per voxel."""
    b = _measured(signals, model, coeffs.dtype)
    return (predict_signal(coeffs, model.M) - b).pow(2).mean(-1).sqrt()


def signal_loss(
    coeffs: torch.Tensor,
    signals: torch.Tensor,
    model: CSDModel,
    variance: float,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The signal term (see the module docstring).

    Args:
        coeffs: ``[V, K]`` FOD coefficients (any float dtype; computed in float64).
        signals: ``[V, N]`` signals of the model's shell; negative values count as 0 (as in
            ``dwi2fod csd``) unless ``model.clamp_signal`` is False (multi-tissue);
            voxels with a non-finite signal must be left out by the caller.
        model: :class:`~invtract.fod.csd.CSDModel`.
        variance: ``sigma^2`` per measurement (:func:`noise_variance`).
        reference: ``[V]`` ``f(c*)`` at the CSD coefficients (subtracted: the term is 0 there);
            None subtracts nothing.

    Returns:
        0-d float64 tensor (unitless).

    Gradients:
        Through ``coeffs``.
    """
    c = coeffs.to(torch.float64)
    b = _measured(signals, model)
    f = csd_objective(c, b, model)
    if reference is not None:
        f = f - reference.to(f.dtype)
    n = model.M.shape[0]
    if f.numel() == 0:
        return c.sum() * 0.0
    return f.mean() / (n * float(variance))


def neighbour_pairs(voxels: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[E, 2]`` positions (into ``voxels``) of the 6-neighbour pairs among ``voxels``.

    Args:
        voxels: ``[V]`` flat voxel indices (C order of a grid of ``shape``), distinct.
        shape: the grid's ``(X, Y, Z)``.
    """
    v = voxels.long().cpu()
    order = torch.argsort(v)
    sv = v[order]
    ijk = torch.stack(torch.unravel_index(v, tuple(shape)), 1)
    out = []
    for ax, stride in enumerate((shape[1] * shape[2], shape[2], 1)):
        ok = ijk[:, ax] + 1 < shape[ax]
        nb = v + stride
        pos = torch.searchsorted(sv, nb).clamp_max(len(sv) - 1)
        hit = ok & (sv[pos] == nb)
        a = torch.nonzero(hit).flatten()
        out.append(torch.stack([a, order[pos[hit]]], 1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def spatial_coupling(coeffs: torch.Tensor, pairs: torch.Tensor, lmin: int = 4) -> torch.Tensor:
    """Sum over 6-neighbour ``pairs`` of the squared difference of the coefficients of degree
    ``l >= lmin``, divided by the voxel count ``V`` (squared FOD units).

    The subsampled CSD's error is mostly in the high degrees, which a few directions per voxel
    leave to the non-negativity constraint: tying them to the neighbours' averages the error
    out, while the low degrees (the peak directions) stay free for the tractography terms.

    Args:
        coeffs: ``[V, K]`` coefficients (MRtrix order, even l).
        pairs: ``[E, 2]`` from :func:`neighbour_pairs`.

    Gradients:
        Through ``coeffs``.
    """
    K = coeffs.shape[-1]
    first = 0
    lm = 0
    while lm < lmin:  # index of the first coefficient of degree lmin
        first += 2 * lm + 1
        lm += 2
    if pairs.numel() == 0 or first >= K or coeffs.shape[0] == 0:
        return coeffs.sum() * 0.0
    p = pairs.to(coeffs.device)
    d = coeffs[p[:, 0], first:] - coeffs[p[:, 1], first:]
    return d.pow(2).sum() / coeffs.shape[0]
