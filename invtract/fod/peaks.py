"""FOD peak finding: MRtrix3's ``Math::SH::get_peak`` ascent, batched.

Convention (``core/math/SH.h``: ``get_peak``, ``derivatives``; spec §3): spherical coordinates
theta = acos(u_z), phi = atan2(u_y, u_x) in float32; Legendre values from MRtrix's 512-row lookup
table; steepest ascent whose step length is a 1-D Newton step along the gradient, made positive
and capped at 0.2 rad; stop when the step is below 1e-4 rad, returning the amplitude evaluated
*before* that last update together with the updated direction; NaN after 50 iterations.

This is the forward (hard, non-differentiable) peak search. Gradients of the peak with respect
to the SH coefficients come from the implicit function theorem at the converged peak
(:mod:`invtract.fod.peak_grad`), never from back-propagating through these iterations.
"""

from __future__ import annotations

import torch

from ..tracking.rules import (
    LUT_LAST_ROW,
    PEAK_MAX_ITERATIONS,
    PEAK_MAX_STEP_RAD,
    PEAK_TOLERANCE_RAD,
    POLE_SIN_THRESHOLD,
    SQRT2,
)
from .peak_tables import PeakTables, peak_tables

__all__ = ["PeakTables", "peak_tables", "sh_derivatives", "mrtrix_peak", "MAX_ITERATIONS"]

# the rulebook's names under MRtrix's (SH.h)
MAX_ITERATIONS = PEAK_MAX_ITERATIONS
MAX_DIR_CHANGE = PEAK_MAX_STEP_RAD
ANGLE_TOLERANCE = PEAK_TOLERANCE_RAD


def _lookup(T: dict, el: torch.Tensor, inc: float) -> torch.Tensor:
    """Linear interpolation in the Legendre table at polar angles ``el`` ([n]) -> [n, E]."""
    f2 = el / inc
    i = torch.nan_to_num(f2, nan=-1.0).trunc()
    low = i < 0
    high = i >= LUT_LAST_ROW
    frac = torch.where(low | high, torch.zeros_like(f2), f2 - i)
    idx = torch.where(
        low, torch.zeros_like(i), torch.where(high, torch.full_like(i, LUT_LAST_ROW), i)
    )
    idx = idx.to(torch.int64)
    table = T["table"]
    r1 = table[idx]
    r2 = table[(idx + 1).clamp(max=LUT_LAST_ROW)]
    f1 = (1.0 - frac)[:, None]
    return f1 * r1 + frac[:, None] * r2


def sh_derivatives(c: torch.Tensor, el: torch.Tensor, az: torch.Tensor, tables: PeakTables):
    """Amplitude and first/second derivatives in (elevation, azimuth), as MRtrix computes them.

    Args:
        c: ``[n, K]`` SH coefficients.
        el, az: ``[n]`` polar angle and azimuth (radians, scanner frame).

    Returns:
        ``(amp, d_el, d_az, d_el2, d_elaz, d_az2)``, each ``[n]`` (``d_az`` etc. per unit
        azimuthal arc; see spec §3.2).
    """
    T = tables.on(c.device, c.dtype)
    AL = _lookup(T, el, tables.inc)
    sel = torch.sin(el)
    atpole = sel < POLE_SIN_THRESHOLD
    mf = T["m_float"]
    ang = az[:, None] * mf[None, :]
    caz = (torch.cos(ang).double() * SQRT2).to(c.dtype)
    saz = (torch.sin(ang).double() * SQRT2).to(c.dtype)
    vp = c[:, T["ip"]]
    vm = c[:, T["im"]]
    mpos = T["mpos"][None, :]
    A = torch.where(mpos, vp * caz + vm * saz, vp)
    B = torch.where(mpos, vm * caz - vp * saz, torch.zeros_like(vp))
    D = (T["ka"] * AL[:, T["ia"]] - T["kb"] * AL[:, T["ib"]]) * T["kc"]
    E2 = (T["k0"] * AL[:, T["j0"]] + T["k1"] * AL[:, T["j1"]] + T["k2"] * AL[:, T["j2"]]) * T["kd"]
    amp = (A * AL).sum(-1)
    d_el = (A * D).sum(-1)
    d_el2 = (A * E2).sum(-1)
    mB = mf * B
    d_az_pole = (B * D).sum(-1)
    d_az = (mB * AL).sum(-1) / sel
    d_elaz = (mB * D).sum(-1) / sel
    d_az2 = -((A * mf * mf) * AL).sum(-1) / (sel * sel)
    zero = torch.zeros_like(amp)
    d_az = torch.where(atpole, d_az_pole, d_az)
    d_elaz = torch.where(atpole, zero, d_elaz)
    d_az2 = torch.where(atpole, zero, d_az2)
    return amp, d_el, d_az, d_el2, d_elaz, d_az2


def _normalise(u: torch.Tensor) -> torch.Tensor:
    # Eigen: squaredNorm = x^2 + (y^2 + z^2); divide by sqrt if > 0
    n2 = u[:, 0] * u[:, 0] + (u[:, 1] * u[:, 1] + u[:, 2] * u[:, 2])
    n = torch.sqrt(n2)
    return torch.where((n2 > 0)[:, None], u / n[:, None], u)


def _ascent_iteration(c: torch.Tensor, u: torch.Tensor, tables: PeakTables):
    az = torch.atan2(u[:, 1], u[:, 0])
    el = torch.acos(u[:, 2])
    amp, d_el, d_az, d_el2, d_elaz, d_az2 = sh_derivatives(c, el, az, tables)
    norm = torch.sqrt(d_el * d_el + d_az * d_az)
    nz = norm != 0
    g_az = torch.where(nz, d_az / norm, torch.zeros_like(norm))
    g_el = torch.where(nz, d_el / norm, torch.zeros_like(norm))
    s1 = g_az * d_az + g_el * d_el
    s2 = (
        (g_az * g_az * d_az2).double()
        + 2.0 * g_az.double() * g_el.double() * d_elaz.double()
        + (g_el * g_el * d_el2).double()
    ).to(c.dtype)
    dt = torch.where(s2 != 0, -s1 / s2, torch.zeros_like(s1)).abs()
    dt = torch.minimum(dt, torch.full_like(dt, MAX_DIR_CHANGE))
    g_el = g_el * dt
    g_az = g_az * dt
    cos_az, sin_az = torch.cos(az), torch.sin(az)
    cos_el, sin_el = torch.cos(el), torch.sin(el)
    u0 = u[:, 0] + ((g_el * cos_az) * cos_el - g_az * sin_az)
    u1 = u[:, 1] + ((g_el * sin_az) * cos_el + g_az * cos_az)
    u2 = u[:, 2] - g_el * sin_el
    u_new = _normalise(torch.stack([u0, u1, u2], -1))
    return amp, u_new, dt < ANGLE_TOLERANCE


@torch.no_grad()
def mrtrix_peak(
    c: torch.Tensor, u: torch.Tensor, lmax: int, max_iterations: int = MAX_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascend from ``u`` to the nearest FOD peak, exactly as MRtrix3 3.0.x ``get_peak``.

    Args:
        c: ``[N, K]`` SH coefficients (MRtrix3 basis), float32 for parity.
        u: ``[N, 3]`` unit start directions (scanner frame).
        lmax: even SH degree of ``c``.

    Returns:
        ``(amplitude [N], direction [N, 3])``; both NaN where the search did not converge
        within ``max_iterations``.

    Gradients:
        None (run under ``no_grad``); see :mod:`invtract.fod.peak_grad`.
    """
    tables = peak_tables(lmax)
    N = c.shape[0]
    amp_out = torch.full((N,), float("nan"), dtype=c.dtype, device=c.device)
    u_out = torch.full((N, 3), float("nan"), dtype=c.dtype, device=c.device)
    active = torch.arange(N, device=c.device)
    ca, ua = c, u.to(c.dtype)
    for _ in range(max_iterations):
        if active.numel() == 0:
            break
        amp, ua, done = _ascent_iteration(ca, ua, tables)
        if bool(done.any()):
            idx = active[done]
            amp_out[idx] = amp[done]
            u_out[idx] = ua[done]
            keep = ~done
            active, ca, ua = active[keep], ca[keep], ua[keep]
    return amp_out, u_out
