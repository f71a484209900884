"""Compiled CPU reverse sweep of :mod:`invtract.tracking.differentiable` (numba).

The same closed-form adjoint as the torch sweep (``differentiable._local_adjoint``), evaluated
one streamline at a time from its last step to its seed instead of one step at a time over all
streamlines. Per step: the 8 trilinear corners are read once (in one pass: the interpolated
coefficients c(p_k) and their derivatives along the voxel fractions); the implicit-peak geometry
at the stored peak u*_k (gradient along e1, e2, u*, Hessian along e1, e2, e1 + e2, amplitude)
comes from the jet of P(z, w) = sum_m C_m(z) w^m, w = x + iy, the polynomial extension of
f(u) = c . Y(u) = Re P, with the Legendre factors Q_lm(z) and their z derivatives from the
recurrence in l (about 45 steps for lmax 8, instead of a ``[7, K]`` table of basis
derivatives); the adjoint of the rows is the transpose of that contraction, and the FOD adjoint
is scattered into a float64 ``[V, K]`` buffer, or, for a fit's learned voxels, into ``[n, K]``
through a ``[V]`` slot map (-1: a voxel whose gradient is not wanted, skipped). Everything is
float64 (the torch sweep rounds jets to the FOD dtype; the two agree to rounding in float64 and
to ~1e-6 relative for float32 FODs). The helpers are inlined into the kernels (a compiled call
would increment and decrement the reference count of every array argument, two atomic
operations each, per step), and the
sweep lets LLVM fuse multiply-adds (``fastmath={"contract"}``: rounding-level differences only;
:func:`tape_values` does not, its points must equal the hard pass's bit for bit).

Streamlines are split into ``T`` contiguous blocks of about equal step counts, run on ``T``
Python threads (the kernel releases the GIL; numba's OpenMP pool is not used: a second OpenMP
runtime beside torch's slowed every later torch operation of the process about 20x), each block
with its own ``[V, K]`` (``[n, K]``) buffer (summed at the end; deterministic for a given
``T``). ``T`` is the torch thread count, capped so that the buffers stay under
:data:`BUFFER_BUDGET_BYTES`.

Public API: :func:`available`, :func:`reverse_sweep`, :func:`tape_values`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .numba_import import njit, numba
from .rules import FOV_HALF_VOXEL, WEIGHT_THRESHOLD

__all__ = ["available", "point_amplitudes", "reverse_sweep", "tape_values", "BUFFER_BUDGET_BYTES"]

#: per-thread float64 FOD-gradient buffers are limited to this many bytes in total
BUFFER_BUDGET_BYTES = 512 * 2**20

_JIT = dict(cache=True, fastmath=False, error_model="numpy", boundscheck=False, nogil=True)
# helpers are inlined into the kernels (numba IR): a compiled call increments and decrements the
# reference count of every array argument (two atomic operations each), which cost more than
# the arithmetic of a step
_INLINE = dict(inline="always", **_JIT)
# the reverse sweep may fuse multiply-adds (rounding-level differences; no reassociation)
_SWEEP_JIT = dict(_JIT, fastmath={"contract"})


def available() -> bool:
    """True when numba imported (the compiled reverse sweep can run)."""
    return numba is not None


@njit(**_INLINE)
def _sig_neg(z):
    """sigmoid(-z)."""
    return 1.0 / (1.0 + math.exp(z))


@njit(**_INLINE)
def _axis(M, a, px, py, pz, n):
    """(fraction, lower index, upper index, edge) of axis ``a`` at scanner point p."""
    v = (M[a, 0] * px + M[a, 1] * py) + M[a, 2] * pz + M[a, 3]
    fl = math.floor(v)
    edge = (v < 0.0) or (v > n - 1.0)
    f = 0.0 if edge else v - fl
    lo = int(fl)
    hi = min(max(lo + 1, 0), n - 1)
    lo = min(max(lo, 0), n - 1)
    return f, lo, hi, edge


@njit(**_INLINE)
def _corners(M, shape, px, py, pz, idx, wd):
    """Trilinear corners of scanner point p (as interp.corner_weights).

    Writes the flat rows ``idx [8]``, the weights ``wd[0]`` (0 below 1e-6) and their derivatives
    along the per-axis fractions ``wd[1:4]`` (0 for dead corners); returns the per-axis "outside
    the grid" flags. A dead corner's row is replaced by a live corner's row, so that all 8 rows
    can be read unconditionally (zero weight times finite data).
    """
    fx, lx, hx, edx = _axis(M, 0, px, py, pz, shape[0])
    fy, ly, hy, edy = _axis(M, 1, px, py, pz, shape[1])
    fz, lz, hz, edz = _axis(M, 2, px, py, pz, shape[2])
    s0 = shape[1] * shape[2]
    s1 = shape[2]
    alive = 0
    for c in range(8):
        bx = c & 1
        by = (c >> 1) & 1
        bz = (c >> 2) & 1
        wx = fx if bx else 1.0 - fx
        wy = fy if by else 1.0 - fy
        wz = fz if bz else 1.0 - fz
        ww = wx * (wy * wz)
        idx[c] = (hx if bx else lx) * s0 + (hy if by else ly) * s1 + (hz if bz else lz)
        if ww >= WEIGHT_THRESHOLD:
            wd[0, c] = ww
            wd[1, c] = (1.0 if bx else -1.0) * (wy * wz)
            wd[2, c] = (1.0 if by else -1.0) * (wx * wz)
            wd[3, c] = (1.0 if bz else -1.0) * (wx * wy)
            alive = c
        else:
            wd[0, c] = 0.0
            wd[1, c] = 0.0
            wd[2, c] = 0.0
            wd[3, c] = 0.0
    for c in range(8):  # the weights sum to 1: some corner is live
        if wd[0, c] == 0.0:
            idx[c] = idx[alive]
    return edx, edy, edz


@njit(**_INLINE)
def _row8(a, r):
    """Row r of an ``[*, 8]`` array as an 8-tuple."""
    return (a[r, 0], a[r, 1], a[r, 2], a[r, 3], a[r, 4], a[r, 5], a[r, 6], a[r, 7])


@njit(**_INLINE)
def _dot8(w, v):
    """w . v of two 8-tuples, summed in corner order."""
    return (
        w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3]
        + w[4] * v[4] + w[5] * v[5] + w[6] * v[6] + w[7] * v[7]
    )  # fmt: skip


@njit(**_INLINE)
def _blend(sh, idx, wd, cj):
    """cj[r] = sum_c wd[r, c] sh[idx[c]] for the rows of ``cj`` (1 or 4): the interpolated
    coefficients c and, with 4 rows, their derivatives along the three voxel fractions."""
    # the corner rows as unsigned locals: no negative-index wraparound, no reload after a store
    i0, i1, i2, i3 = np.uint64(idx[0]), np.uint64(idx[1]), np.uint64(idx[2]), np.uint64(idx[3])
    i4, i5, i6, i7 = np.uint64(idx[4]), np.uint64(idx[5]), np.uint64(idx[6]), np.uint64(idx[7])
    w0, w1, w2, w3 = _row8(wd, 0), _row8(wd, 1), _row8(wd, 2), _row8(wd, 3)
    jet = cj.shape[0] == 4
    for k in range(sh.shape[1]):
        v = (
            np.float64(sh[i0, k]), np.float64(sh[i1, k]), np.float64(sh[i2, k]),
            np.float64(sh[i3, k]), np.float64(sh[i4, k]), np.float64(sh[i5, k]),
            np.float64(sh[i6, k]), np.float64(sh[i7, k]),
        )  # fmt: skip
        cj[0, k] = _dot8(w0, v)
        if jet:
            cj[1, k] = _dot8(w1, v)
            cj[2, k] = _dot8(w2, v)
            cj[3, k] = _dot8(w3, v)


@njit(**_INLINE)
def _powers(ux, uy, Wr, Wi):
    """W_m = (x + iy)^m = Wr[m] + i Wi[m], m = 0 .. lmax."""
    Wr[0] = 1.0
    Wi[0] = 0.0
    for m in range(1, Wr.shape[0]):
        Wr[m] = Wr[m - 1] * ux - Wi[m - 1] * uy
        Wi[m] = Wr[m - 1] * uy + Wi[m - 1] * ux


@njit(**_INLINE)
def _contract(cj, z, Wr, Wi, tabs, Qe):
    """Jet of P(z, w) = sum_m C_m(z) w^m at u (w = x + iy), for f(u) = c . Y(u) = Re P (c =
    cj[0]): returns (Re P, Re P_z, Re P_zz, P_w, P_zw, P_ww), the complex ones as (re, im).

    P is the polynomial extension of the SH expansion: Y_k = s Q_lm(z) Re/Im (x + iy)^m, so
    C_m = sum_l s (c_lm - i c_l,-m) Q_lm(z). The derivative of f along d = (d_x, d_y, d_z) is
    Re(P_z d_z + P_w zeta), zeta = d_x + i d_y, and the second one
    Re(P_zz d_z^2 + 2 P_zw d_z zeta + P_ww zeta^2). Q_lm and its z derivatives come from the
    recurrence in l (see :func:`_sh_tables`); s Q_e, Q_e', Q_e'' of every entry e = (l even, m)
    are stored in ``Qe`` for :func:`_transpose`.
    """
    q_mm, rec_a, rec_b, e_ptr, kc, ks = tabs
    p = pz = pzz = pwr = pwi = pzwr = pzwi = pwwr = pwwi = 0.0
    for m in range(Wr.shape[0]):
        # C_m and its z derivatives: (r - i s), (r1 - i s1), (r2 - i s2)
        r = r1 = r2 = s = s1 = s2 = 0.0
        q0, q1, q2 = q_mm[m], 0.0, 0.0  # s Q_lm, d/dz, d2/dz2 at l = m
        o0 = o1 = o2 = 0.0  # at l - 1
        e = e_ptr[m]
        for l in range(m, Wr.shape[0]):
            if l > m:
                ra, rb = rec_a[m, l], rec_b[m, l]
                n0 = ra * (z * q0) - rb * o0
                n1 = ra * (q0 + z * q1) - rb * o1
                n2 = ra * (2.0 * q1 + z * q2) - rb * o2
                o0, o1, o2 = q0, q1, q2
                q0, q1, q2 = n0, n1, n2
            if l % 2 == 0:  # an SH entry
                Qe[0, e] = q0
                Qe[1, e] = q1
                Qe[2, e] = q2
                cc = cj[0, kc[e]]
                cs = cj[0, ks[e]]  # = cc for m = 0, where it meets Im W_0 = 0
                r += cc * q0
                r1 += cc * q1
                r2 += cc * q2
                s += cs * q0
                s1 += cs * q1
                s2 += cs * q2
                e += np.uint64(1)  # (unsigned: no negative-index wraparound)
        wr, wi = Wr[m], Wi[m]
        p += r * wr + s * wi  # Re((r - i s) (wr + i wi))
        pz += r1 * wr + s1 * wi
        pzz += r2 * wr + s2 * wi
        if m >= 1:
            ar, ai = m * Wr[m - 1], m * Wi[m - 1]  # d/dw w^m
            pwr += r * ar + s * ai
            pwi += r * ai - s * ar
            pzwr += r1 * ar + s1 * ai
            pzwi += r1 * ai - s1 * ar
        if m >= 2:
            br, bi = m * (m - 1) * Wr[m - 2], m * (m - 1) * Wi[m - 2]  # d^2/dw^2 w^m
            pwwr += r * br + s * bi
            pwwi += r * bi - s * br
    return p, pz, pzz, pwr, pwi, pzwr, pzwi, pwwr, pwwi


@njit(**_INLINE)
def _first(jet, dx, dy, dz):
    """Re(P_z d_z + P_w zeta): first derivative of f along d."""
    return dz * jet[1] + (jet[3] * dx - jet[4] * dy)


@njit(**_INLINE)
def _second(jet, dx, dy, dz):
    """Re(P_zz d_z^2 + 2 P_zw d_z zeta + P_ww zeta^2): second derivative of f along d."""
    return (
        dz * dz * jet[2]
        + 2.0 * dz * (jet[5] * dx - jet[6] * dy)
        + (jet[7] * (dx * dx - dy * dy) - jet[8] * (2.0 * dx * dy))
    )


@njit(**_INLINE)
def _rows(jet, ux, uy, uz, e):
    """The rows of the implicit-peak geometry from P's jet (as PeakJet.apply): first derivatives
    of f along e1, e2, u, second ones along e1, e2, e1 + e2; ``e = (e1, e2)`` as 6 values."""
    e1x, e1y, e1z, e2x, e2y, e2z = e
    return (
        _first(jet, e1x, e1y, e1z),
        _first(jet, e2x, e2y, e2z),
        _first(jet, ux, uy, uz),
        _second(jet, e1x, e1y, e1z),
        _second(jet, e2x, e2y, e2z),
        _second(jet, e1x + e2x, e1y + e2y, e1z + e2z),
    )


@njit(**_INLINE)
def _rows_adjoint(qb, a_bar, ux, uy, uz, e):
    """a_bar f + qb . rows (:func:`_rows`) = Re(al P + be P_z + ga P_w + de P_zz + ep P_zw +
    ph P_ww): returns ``(al, be, de, ga_re, ga_im, ep_re, ep_im, ph_re, ph_im)`` for
    :func:`_transpose` (direction d enters as d_z and zeta = d_x + i d_y)."""
    e1x, e1y, e1z, e2x, e2y, e2z = e
    epx, epy, epz = e1x + e2x, e1y + e2y, e1z + e2z
    q0, q1, q2, q3, q4, q5 = qb
    return (
        a_bar,
        q0 * e1z + q1 * e2z + q2 * uz,
        q3 * (e1z * e1z) + q4 * (e2z * e2z) + q5 * (epz * epz),
        q0 * e1x + q1 * e2x + q2 * ux,
        q0 * e1y + q1 * e2y + q2 * uy,
        2.0 * (q3 * e1z * e1x + q4 * e2z * e2x + q5 * epz * epx),
        2.0 * (q3 * e1z * e1y + q4 * e2z * e2y + q5 * epz * epy),
        q3 * (e1x * e1x - e1y * e1y) + q4 * (e2x * e2x - e2y * e2y) + q5 * (epx * epx - epy * epy),
        2.0 * (q3 * e1x * e1y + q4 * e2x * e2y + q5 * epx * epy),
    )


@njit(**_INLINE)
def _transpose(lin, Wr, Wi, Qe, tabs, cbar):
    """c_bar = gradient w.r.t. c of Re(al P + be P_z + ga P_w + de P_zz + ep P_zw + ph P_ww),
    ``lin = (al, be, de, ga_re, ga_im, ep_re, ep_im, ph_re, ph_im)`` (the transpose of
    :func:`_contract`).

    C_m, C_m', C_m'' are multiplied by T0 = al W_m + ga m W_(m-1) + ph m (m-1) W_(m-2),
    T1 = be W_m + ep m W_(m-1) and T2 = de W_m; c_bar of the cosine (sine) coefficient of entry
    e is sum_o Qe[o, e] Re T_o (Im T_o).
    """
    _, _, _, e_ptr, kc, ks = tabs
    al, be, de, gar, gai, epr, epi, phr, phi = lin
    for m in range(Wr.shape[0]):
        wr, wi = Wr[m], Wi[m]
        t0r, t0i = al * wr, al * wi
        t1r, t1i = be * wr, be * wi
        if m >= 1:
            ar, ai = m * Wr[m - 1], m * Wi[m - 1]
            t0r += gar * ar - gai * ai
            t0i += gar * ai + gai * ar
            t1r += epr * ar - epi * ai
            t1i += epr * ai + epi * ar
        if m >= 2:
            br, bi = m * (m - 1) * Wr[m - 2], m * (m - 1) * Wi[m - 2]
            t0r += phr * br - phi * bi
            t0i += phr * bi + phi * br
        t2r, t2i = de * wr, de * wi
        for e in range(e_ptr[m], e_ptr[m + 1]):
            q0, q1, q2 = Qe[0, e], Qe[1, e], Qe[2, e]
            cbar[kc[e]] = q0 * t0r + q1 * t1r + q2 * t2r
            if m > 0:
                cbar[ks[e]] = q0 * t0i + q1 * t1i + q2 * t2i


@njit(**_INLINE)
def _tangent_basis(ux, uy, uz):
    """(e1, e2) at u as peak_grad.tangent_basis: e1 = u x (axis of the smallest |u_i|, first on
    ties), normalised; e2 = u x e1."""
    ax = abs(ux)
    ay = abs(uy)
    az = abs(uz)
    if ax <= ay and ax <= az:
        ex, ey, ez = 0.0, uz, -uy  # u x (1, 0, 0)
    elif ay <= az:
        ex, ey, ez = -uz, 0.0, ux  # u x (0, 1, 0)
    else:
        ex, ey, ez = uy, -ux, 0.0  # u x (0, 0, 1)
    nrm = math.sqrt(ex * ex + ey * ey + ez * ez)
    nrm = max(nrm, 1e-30)
    e1x, e1y, e1z = ex / nrm, ey / nrm, ez / nrm
    e2x = uy * e1z - uz * e1y
    e2y = uz * e1x - ux * e1z
    e2z = ux * e1y - uy * e1x
    return e1x, e1y, e1z, e2x, e2y, e2z


@njit(**_INLINE)
def _dot_row(A, r, b):
    """sum_k A[r, k] b[k] (four partial sums)."""
    K = b.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= K:
        s0 += A[r, k] * b[k]
        s1 += A[r, k + 1] * b[k + 1]
        s2 += A[r, k + 2] * b[k + 2]
        s3 += A[r, k + 3] * b[k + 3]
        k += 4
    while k < K:
        s0 += A[r, k] * b[k]
        k += 1
    return (s0 + s1) + (s2 + s3)


@njit(**_INLINE)
def _local(
    px, py, pz, ux, uy, uz, vx, vy, vz, step, a_p, a_u, a_l, h, sh, want_sh, G, slot, M, shape,
    tabs, consts, scr, acc,
):  # fmt: skip
    """Adjoint of one step (``step``) or of the seed evaluation; see ``_local_adjoint``.

    (p, u*, u_prev = v) in; a_p [3], a_u [3], a_l the adjoints of the step's outputs; ``tabs``
    from :func:`_sh_tables`, ``consts`` = (t_amp, t_cos, eps, cut, cos_max), ``scr`` the scratch
    arrays of :func:`_sweep`. Writes scr's ``out[0:3]`` = adjoint of p, ``out[3:6]`` = adjoint
    of u_prev; adds to G (FOD, if ``want_sh``), acc[0] (h), acc[1] (cutoff), acc[2] (cos_max).
    ``slot``: empty (G's rows are the FOD's voxels) or ``[V]`` (G's row of each voxel, -1 for
    voxels whose gradient is not wanted).
    """
    t_amp, t_cos, eps, cut, cos_max = consts
    Wr, Wi, Qe, cj, cbar, idx, wd, out = scr
    edx, edy, edz = _corners(M, shape, px, py, pz, idx, wd)
    _blend(sh, idx, wd, cj)
    e = _tangent_basis(ux, uy, uz)
    e1x, e1y, e1z, e2x, e2y, e2z = e
    # the peak geometry's rows and A = f(u*) from P's jet at u*
    _powers(ux, uy, Wr, Wi)
    jet = _contract(cj, uz, Wr, Wi, tabs, Qe)
    g1, g2, gu, h11, h22, hpp = _rows(jet, ux, uy, uz, e)
    A = jet[0]
    a = h11 - gu
    d = h22 - gu
    b = 0.5 * (hpp - h11 - h22)
    lam = 0.5 * (a + d) + math.sqrt((0.5 * (a - d)) ** 2 + b * b)
    shift = lam + eps
    if not (shift > 0.0) or math.isinf(shift):  # clamp(min=0) + nan_to_num(nan=0, posinf=0)
        shift = 0.0
    a -= shift
    d -= shift
    det = a * d - b * b
    x0 = (d * g1 - b * g2) / det
    x1 = (a * g2 - b * g1) / det
    sA = _sig_neg((A - cut) / t_amp) * a_l / t_amp
    acc[1] -= sA
    ubx, uby, ubz = a_u[0], a_u[1], a_u[2]
    if step:
        cos = vx * ux + vy * uy + vz * uz
        sc = _sig_neg((cos - cos_max) / t_cos) * a_l / t_cos
        acc[2] -= sc
        ubx += h * a_p[0] + sc * vx
        uby += h * a_p[1] + sc * vy
        ubz += h * a_p[2] + sc * vz
        out[3] = sc * ux
        out[4] = sc * uy
        out[5] = sc * uz
        acc[0] += a_p[0] * ux + a_p[1] * uy + a_p[2] * uz
    xb0 = -(ubx * e1x + uby * e1y + ubz * e1z)
    xb1 = -(ubx * e2x + uby * e2y + ubz * e2z)
    y0 = (d * xb0 - b * xb1) / det
    y1 = (a * xb1 - b * xb0) / det
    ok = math.isfinite(x0) and math.isfinite(x1) and math.isfinite(y0) and math.isfinite(y1)
    if ok:  # the adjoint of the rows (g1, g2, gu, h11, h22, h++)
        bb = -(y0 * x1 + y1 * x0)
        qb = (y0, y1, y0 * x0 + y1 * x1, -y0 * x0 - 0.5 * bb, -y1 * x1 - 0.5 * bb, 0.5 * bb)
    else:
        qb = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    _transpose(_rows_adjoint(qb, sA, ux, uy, uz, e), Wr, Wi, Qe, tabs, cbar)
    # through the interpolation: corners get w_c c_bar, the voxel fractions (dc/df_a) . c_bar
    fbx = 0.0 if edx else _dot_row(cj, 1, cbar)
    fby = 0.0 if edy else _dot_row(cj, 2, cbar)
    fbz = 0.0 if edz else _dot_row(cj, 3, cbar)
    if want_sh:
        for c in range(8):
            wc = wd[0, c]
            row = idx[c] if slot.shape[0] == 0 else slot[idx[c]]
            if wc != 0.0 and row >= 0:
                r = np.uint64(row)
                for k in range(cbar.shape[0]):
                    G[r, k] += wc * cbar[k]
    for j in range(3):
        out[j] = fbx * M[0, j] + fby * M[1, j] + fbz * M[2, j]
        if step:
            out[j] += a_p[j]


@njit(**_SWEEP_JIT)
def _sweep(
    r0, r1, P, U, seeds, u0, n1, n2, gP, has_p, gW, W, has_w, sh, want_sh, G, slot, M, shape,
    lmax, tabs, consts, h, g_seed, acc,
):  # fmt: skip
    """Rows ``r0 .. r1 - 1``, serially (one block); FOD adjoint into ``G`` (if ``want_sh``;
    rows mapped by ``slot``, see :func:`_local`), scalars into acc."""
    K = sh.shape[1]
    E = tabs[4].shape[0]
    n = lmax + 1
    scr = (
        np.empty(n),  # Wr, Wi: (x + iy)^m
        np.empty(n),
        np.empty((3, E)),  # Qe: s_e Q_e, Q_e', Q_e''
        np.empty((4, K)),  # cj: c and dc / d fraction
        np.empty(K),  # cbar
        np.empty(8, np.int64),  # idx: corner rows
        np.empty((4, 8)),  # wd: corner weights and their fraction derivatives
        np.zeros(6),  # out: adjoints of p and u_prev
    )
    out = scr[7]
    a_p = np.zeros(3)
    a_u = np.zeros(3)
    a_p0 = np.zeros(3)
    a_u0 = np.zeros(3)
    for s in range(r0, r1):
        c0 = n1[s]
        for j in range(3):
            a_p0[j] = gP[s, c0, j] if has_p else 0.0
            a_u0[j] = 0.0
        # gW * W: adjoint of the log-weight (weights = exp(log-weight))
        a_l0 = gW[s, c0] * W[s, c0] if has_w else 0.0
        # the evaluations in reverse: the steps of the high half (k = n2 - 1 .. 0), of the low
        # half (n1 - 1 .. 0), then the seed; one _local call site for all (numba inlines it
        # once: half the compile time of a second site, the same arithmetic)
        hi = 1
        nh = n2[s]
        k = nh - 1
        a_l = 0.0
        for j in range(3):
            a_p[j] = 0.0
            a_u[j] = 0.0
        while True:
            if hi >= 0 and k < 0:  # half hi done: its adjoints go to the seed's
                if nh > 0:
                    for j in range(3):
                        a_p0[j] += a_p[j]
                        a_u0[j] += -a_u[j] if hi else a_u[j]
                    a_l0 += a_l
                hi -= 1
                if hi == 0:
                    nh = n1[s]
                    k = nh - 1
                    a_l = 0.0
                    for j in range(3):
                        a_p[j] = 0.0
                        a_u[j] = 0.0
                continue
            step = hi >= 0
            if step:  # step k of half hi: p = P[ci], u* = U[co], u_prev = U[ci] (u0 at k = 0)
                sgn = 1 if hi else -1
                co = c0 + sgn * (k + 1)
                ci = co - sgn
                if has_p:
                    for j in range(3):
                        a_p[j] += gP[s, co, j]
                if has_w:
                    a_l += gW[s, co] * W[s, co]
                if k > 0:
                    vx = np.float64(U[s, ci, 0])
                    vy = np.float64(U[s, ci, 1])
                    vz = np.float64(U[s, ci, 2])
                else:
                    sg = -1.0 if hi else 1.0
                    vx = sg * np.float64(u0[s, 0])
                    vy = sg * np.float64(u0[s, 1])
                    vz = sg * np.float64(u0[s, 2])
                px, py, pz = (
                    np.float64(P[s, ci, 0]),
                    np.float64(P[s, ci, 1]),
                    np.float64(P[s, ci, 2]),
                )
                ux, uy, uz = (
                    np.float64(U[s, co, 0]),
                    np.float64(U[s, co, 1]),
                    np.float64(U[s, co, 2]),
                )
                la_u = a_u
                la_l = a_l
            else:  # the seed evaluation (no step: a_p and v unused)
                px, py, pz = (
                    np.float64(seeds[s, 0]),
                    np.float64(seeds[s, 1]),
                    np.float64(seeds[s, 2]),
                )
                ux, uy, uz = np.float64(u0[s, 0]), np.float64(u0[s, 1]), np.float64(u0[s, 2])
                vx = vy = vz = 0.0
                la_u = a_u0
                la_l = a_l0
            _local(
                px, py, pz, ux, uy, uz, vx, vy, vz, step, a_p, la_u, la_l, h, sh, want_sh, G, slot,
                M, shape, tabs, consts, scr, acc,
            )  # fmt: skip
            if not step:
                for j in range(3):
                    g_seed[s, j] = a_p0[j] + out[j]
                break
            for j in range(3):
                a_p[j] = out[j]
                a_u[j] = out[3 + j]
            k -= 1


@njit(**_INLINE)
def _logsig(x):
    """log sigmoid(x), stable."""
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


@njit(**_INLINE)
def _amplitude(cj, z, Wr, Wi, tabs):
    """f(u) = c . Y(u) = Re sum_m C_m(z) W_m for c = cj[0]: the value of :func:`_contract`."""
    q_mm, rec_a, rec_b, e_ptr, kc, ks = tabs
    A = 0.0
    for m in range(Wr.shape[0]):
        r = s = 0.0
        q, o = q_mm[m], 0.0
        e = e_ptr[m]
        for l in range(m, Wr.shape[0]):
            if l > m:
                q, o = rec_a[m, l] * (z * q) - rec_b[m, l] * o, q
            if l % 2 == 0:
                r += cj[0, kc[e]] * q
                s += cj[0, ks[e]] * q
                e += np.uint64(1)  # (unsigned: no negative-index wraparound)
        A += r * Wr[m] + s * Wi[m]
    return A


@njit(**_JIT)
def _values(
    r0, r1, P, Wt, seeds, u0, U, n1, n2, cl_seed, h_arr, sh, M, shape, lmax, tabs, t_amp,
    t_cos, cut, cos_max,
):  # fmt: skip
    """Rows ``r0 .. r1 - 1`` of the tape's points and weights (see :func:`tape_values`)."""
    n = lmax + 1
    L = P.shape[1]
    Wr = np.empty(n)
    Wi = np.empty(n)
    cj = np.empty((1, sh.shape[1]))  # c (no fraction derivatives)
    idx = np.empty(8, np.int64)
    wd = np.empty((4, 8))
    pp = np.empty(3, P.dtype)  # the moving point, in the FOD dtype (as the hard pass)
    rnd = np.empty(1, sh.dtype)  # rounds A to the FOD dtype (as the plain path)
    h = h_arr[0]
    for s in range(r0, r1):
        c0 = n1[s]
        for j in range(3):
            P[s, c0, j] = seeds[s, j]
        Wt[s, c0] = math.exp(cl_seed[s])
        for hi in (0, 1):
            nh = n2[s] if hi else n1[s]
            sgn = 1 if hi else -1
            for j in range(3):
                pp[j] = seeds[s, j]
            sg = -1.0 if hi else 1.0
            vx = sg * np.float64(u0[s, 0])
            vy = sg * np.float64(u0[s, 1])
            vz = sg * np.float64(u0[s, 2])
            cl = cl_seed[s]
            for k in range(nh):
                co = c0 + sgn * (k + 1)
                ux = np.float64(U[s, co, 0])
                uy = np.float64(U[s, co, 1])
                uz = np.float64(U[s, co, 2])
                _corners(
                    M, shape, np.float64(pp[0]), np.float64(pp[1]), np.float64(pp[2]), idx, wd
                )
                _blend(sh, idx, wd, cj)
                _powers(ux, uy, Wr, Wi)
                rnd[0] = _amplitude(cj, uz, Wr, Wi, tabs)
                A = np.float64(rnd[0])
                cos = vx * ux + vy * uy + vz * uz
                cl += _logsig((A - cut) / t_amp) + _logsig((cos - cos_max) / t_cos)
                for j in range(3):
                    pp[j] = pp[j] + U[s, co, j] * h
                    P[s, co, j] = pp[j]
                Wt[s, co] = math.exp(cl)
                vx, vy, vz = ux, uy, uz
        for col in range(1 + n1[s] + n2[s], L):
            for j in range(3):
                P[s, col, j] = 0.0
            Wt[s, col] = 0.0


def tape_values(
    points: np.ndarray,
    weights: np.ndarray,
    seeds: np.ndarray,
    u0: np.ndarray,
    u_pad: np.ndarray,
    n1: np.ndarray,
    n2: np.ndarray,
    cl_seed: np.ndarray,
    h: float,
    sh: np.ndarray,
    scanner2voxel: np.ndarray,
    shape,
    lmax: int,
    t_amp: float,
    t_cos: float,
    cut: float,
    cos_max: float,
    threads: int = 1,
) -> None:
    """Fill the tape's ``points [S, L, 3]`` and ``weights [S, L]`` in place.

    Points: p_{k+1} = p_k + h u*_k from the seed along each half, in the dtype of ``points``
    (the hard pass's arithmetic, so the same values). Weights: exp of the accumulated
    log-weights log sig((A_k - cutoff)/T_A) + log sig((u_{k-1} . u_k - cos_max)/T_c) (float64;
    A_k = c(p_k) . Y(u*_k) rounded to the FOD dtype), starting from ``cl_seed``; zero padding.
    """
    S = n1.shape[0]
    n1 = np.ascontiguousarray(n1, np.int64)
    n2 = np.ascontiguousarray(n2, np.int64)
    T = max(1, min(int(threads), max(S, 1)))
    bounds = _blocks(n1, n2, T)
    T = bounds.shape[0] - 1
    args = (
        points, weights, seeds, u0, u_pad, n1, n2, np.ascontiguousarray(cl_seed, np.float64),
        np.array([h], points.dtype), sh, np.ascontiguousarray(scanner2voxel, np.float64),
        np.asarray(shape, np.int64), lmax, _sh_tables(lmax), float(t_amp), float(t_cos),
        float(cut), float(cos_max),
    )  # fmt: skip

    def block(t):
        _values(bounds[t], bounds[t + 1], *args)

    if T == 1:
        block(0)
    else:
        with ThreadPoolExecutor(T) as ex:
            list(ex.map(block, range(T)))


@njit(**_JIT)
def _point_amplitudes(r0, r1, P, U, out, sh, nonzero, M, shape, lmax, tabs):  # fmt: skip
    """Rows ``r0 .. r1 - 1`` of :func:`point_amplitudes`."""
    n = lmax + 1
    Wr = np.empty(n)
    Wi = np.empty(n)
    cj = np.empty((1, sh.shape[1]))
    idx = np.empty(8, np.int64)
    wd = np.empty((4, 8))
    rnd = np.empty(1, sh.dtype)  # rounds A to the FOD dtype (as peak_amplitude)
    for i in range(r0, r1):
        px, py, pz = np.float64(P[i, 0]), np.float64(P[i, 1]), np.float64(P[i, 2])
        ok = True
        near = 0
        for a in range(3):  # inside the field of view; the nearest voxel (no-data rule)
            v = (M[a, 0] * px + M[a, 1] * py) + M[a, 2] * pz + M[a, 3]
            ok = ok and v > -FOV_HALF_VOXEL and v < shape[a] - FOV_HALF_VOXEL
            r = min(max(math.copysign(math.floor(abs(v) + 0.5), v), 0.0), shape[a] - 1.0)
            near = near * shape[a] + int(r)
        out[i] = 0.0
        if not (ok and nonzero[near]):
            continue
        _corners(M, shape, px, py, pz, idx, wd)
        _blend(sh, idx, wd, cj)
        if math.isnan(cj[0, 0]):
            continue
        _powers(np.float64(U[i, 0]), np.float64(U[i, 1]), Wr, Wi)
        rnd[0] = _amplitude(cj, np.float64(U[i, 2]), Wr, Wi, tabs)
        out[i] = rnd[0]


def point_amplitudes(
    sh: np.ndarray,
    nonzero: np.ndarray,
    scanner2voxel: np.ndarray,
    shape,
    lmax: int,
    points: np.ndarray,
    dirs: np.ndarray,
    threads: int = 1,
) -> np.ndarray:
    """FOD amplitudes ``c(p) . Y(u)`` ``[n]`` float64 (rounded to the FOD dtype) at scanner
    points ``points [n, 3]`` (mm) along unit directions ``dirs [n, 3]``: the compiled
    equivalent of ``peak_amplitude(sample_fod(p), u)`` (:mod:`invtract.fod.interp`'s no-data
    rules: 0 outside the field of view, where the nearest voxel is all-zero, or where the
    interpolated ``c_0`` is NaN), to rounding (trilinear sums in float64 here).

    Args:
        sh: ``[X*Y*Z, K]`` coefficients (C order); ``nonzero``: ``[X*Y*Z]`` bool (a voxel
            with any non-zero or NaN coefficient).
        scanner2voxel: ``[3, 4]``; ``shape``: (X, Y, Z); ``lmax``: of ``K``.
    """
    n = int(points.shape[0])
    out = np.empty(n, np.float64)
    if n == 0:
        return out
    args = (
        np.ascontiguousarray(points), np.ascontiguousarray(dirs), out, sh,
        np.ascontiguousarray(nonzero, np.bool_), np.ascontiguousarray(scanner2voxel, np.float64),
        np.asarray(shape, np.int64), lmax, _sh_tables(lmax),
    )  # fmt: skip
    T = max(1, min(int(threads), n // 4096))
    edges = np.linspace(0, n, T + 1).astype(np.int64)
    if T == 1:
        _point_amplitudes(0, n, *args)
    else:
        with ThreadPoolExecutor(T) as ex:
            list(ex.map(lambda t: _point_amplitudes(edges[t], edges[t + 1], *args), range(T)))
    return out


_TABLES: dict = {}


def _sh_tables(lmax: int):
    """Tables of the real SH basis for the kernels.

    Y = s Q_lm(z) Re (x + iy)^m (cosine coefficient c_lm) or Im (sine, c_l,-m), with
    Q_lm(z) = P-bar_l^m(z) / sin^m (as :func:`~invtract.fod.peak_grad._jet_tables`), s = 1 for
    m = 0, else sqrt(2). Returns ``(q_mm, rec_a, rec_b, e_ptr, kc, ks)``, n = lmax + 1:

    * ``q_mm [n]``: s Q_mm; ``rec_a``, ``rec_b`` ``[n, n]``: for l > m,
      s Q_lm = rec_a[m, l] z s Q_l-1,m - rec_b[m, l] s Q_l-2,m (a polynomial identity in z,
      so its derivatives give those of Q);
    * ``e_ptr [n + 1]``: entries e = (l even, 0 <= m <= l) are ordered by m, then l; those of
      order m are ``e_ptr[m] .. e_ptr[m + 1] - 1``;
    * ``kc``, ``ks`` ``[E]``: the cosine / sine coefficient of each entry (``ks`` = ``kc`` for
      m = 0).

    Index arrays are unsigned (numba then skips the negative-index wraparound).
    """
    key = ("sh", lmax)
    if key not in _TABLES:
        from ..fod.sh_layout import sh_index

        n = lmax + 1
        q_mm = np.zeros(n)
        rec_a = np.zeros((n, n))
        rec_b = np.zeros((n, n))
        pmm = 1.0 / math.sqrt(4.0 * math.pi)
        kc, ks, e_ptr = [], [], []
        for m in range(n):
            if m > 0:
                pmm *= -math.sqrt((2.0 * m + 1.0) / (2.0 * m))
            q_mm[m] = pmm * (1.0 if m == 0 else math.sqrt(2.0))
            if m + 1 <= lmax:
                rec_a[m, m + 1] = math.sqrt(2.0 * m + 3.0)
            for k in range(m + 2, n):
                a = math.sqrt((4.0 * k * k - 1.0) / (k * k - m * m))
                b = math.sqrt(((k - 1.0) ** 2 - m * m) / (4.0 * (k - 1.0) ** 2 - 1.0))
                rec_a[m, k] = a
                rec_b[m, k] = a * b
            e_ptr.append(len(kc))
            for l in range(m + (m % 2), n, 2):
                kc.append(sh_index(l, m))
                ks.append(sh_index(l, -m) if m > 0 else sh_index(l, m))
        e_ptr.append(len(kc))
        _TABLES[key] = (
            q_mm,
            rec_a,
            rec_b,
            np.array(e_ptr, np.uint64),
            np.array(kc, np.uint64),
            np.array(ks, np.uint64),
        )
    return _TABLES[key]


def _blocks(n1: np.ndarray, n2: np.ndarray, T: int) -> np.ndarray:
    """Row bounds of ``T`` contiguous blocks with about equal step counts."""
    S = n1.shape[0]
    if T <= 1 or S == 0:
        return np.array([0, S], np.int64)
    cum = np.cumsum(1 + n1 + n2)
    targets = cum[-1] * np.arange(1, T) / T
    inner = np.searchsorted(cum, targets, side="left") + 1
    return np.concatenate([[0], np.clip(inner, 0, S), [S]]).astype(np.int64)


def _slot_map(V: int, voxels: np.ndarray) -> np.ndarray:
    """``[V]`` int32: ``i`` at ``voxels[i]`` (``[n]`` distinct flat indices), -1 elsewhere."""
    slot = np.full(V, -1, np.int32)
    slot[np.asarray(voxels, np.int64)] = np.arange(len(voxels), dtype=np.int32)
    return slot


def reverse_sweep(
    sh: np.ndarray,
    scanner2voxel: np.ndarray,
    shape,
    lmax: int,
    points: np.ndarray,
    u_pad: np.ndarray,
    seeds: np.ndarray,
    u0: np.ndarray,
    n1: np.ndarray,
    n2: np.ndarray,
    g_points: np.ndarray | None,
    g_weights: np.ndarray | None,
    weights: np.ndarray,
    h: float,
    t_amp: float,
    t_cos: float,
    eps: float,
    cut: float,
    cos_max: float,
    want_sh: bool,
    threads: int = 1,
    voxels: np.ndarray | None = None,
):
    """The efficient path's backward on CPU.

    Args:
        sh: ``[V, K]`` FOD coefficients (float32 or float64).
        scanner2voxel: ``[3, 4]`` float64.
        shape: spatial shape (3 ints); V = prod(shape).
        points, u_pad: ``[S, L, 3]`` the tape's points and stored peaks.
        seeds, u0: ``[S, 3]`` hard seeds and seed peaks.
        n1, n2: ``[S]`` steps of each half.
        g_points: ``[S, L, 3]`` adjoint of the points (None: zero).
        g_weights: ``[S, L]`` adjoint of the weights (None: zero); ``weights`` ``[S, L]``
            the weights (the log-weight adjoint is ``g_weights * weights``).
        h, t_amp, t_cos, eps, cut, cos_max: step, temperatures, Hessian guard, cutoff and
            cos of the maximum angle (values).
        want_sh: accumulate the FOD gradient.
        threads: blocks run in parallel (capped by the buffer budget and numba's threads).
        voxels: ``[n]`` distinct flat voxel indices: the FOD gradient of these rows only
            (``[n, K]``, row i that of voxel ``voxels[i]``; the others are skipped, and the
            buffers are ``[n, K]``), e.g. a fit's learned voxels. None: every voxel.

    Returns:
        ``(g_sh [V, K] (or [n, K]) float64 or None, g_seeds [S, 3] float64, (g_h, g_cut,
        g_cos_max))``.
    """
    S = n1.shape[0]
    V, K = sh.shape
    tabs = _sh_tables(lmax)
    n1 = np.ascontiguousarray(n1, np.int64)
    n2 = np.ascontiguousarray(n2, np.int64)
    slot = np.empty(0, np.int32)  # G's rows are the voxels
    if voxels is not None:
        slot = _slot_map(V, voxels)
        V = int(np.asarray(voxels).shape[0])
    T = max(1, min(int(threads), max(S, 1)))
    if want_sh:
        T = max(1, min(T, BUFFER_BUDGET_BYTES // max(V * K * 8, 1)))
    bounds = _blocks(n1, n2, T)
    T = bounds.shape[0] - 1
    G = np.zeros((T, V, K) if want_sh else (1, 1, 1), np.float64)
    g_seed = np.zeros((S, 3), np.float64)
    acc = np.zeros((T, 3), np.float64)
    has_p = g_points is not None
    has_w = g_weights is not None
    dummy3 = np.zeros((1, 1, 3), points.dtype)
    dummy2 = np.zeros((1, 1), np.float64)
    args = (
        points, u_pad, seeds, u0, n1, n2,
        g_points if has_p else dummy3, has_p,
        g_weights if has_w else dummy2, weights if has_w else dummy2, has_w, sh,
    )  # fmt: skip
    M = np.ascontiguousarray(scanner2voxel, np.float64)
    consts = (float(t_amp), float(t_cos), float(eps), float(cut), float(cos_max))
    rest = (M, np.asarray(shape, np.int64), lmax, tabs, consts, float(h), g_seed)

    def block(t):
        G_t = G[t if want_sh else 0]
        _sweep(bounds[t], bounds[t + 1], *args, want_sh, G_t, slot, *rest, acc[t])

    # blocks on Python threads (the kernel releases the GIL), not numba's OpenMP pool: a
    # second OpenMP runtime next to torch's slowed every later torch operation ~20x here
    if T == 1:
        block(0)
    else:
        with ThreadPoolExecutor(T) as ex:
            list(ex.map(block, range(T)))
    g_sh = None
    if want_sh:
        g_sh = G[0]
        for t in range(1, T):
            g_sh += G[t]
    tot = acc.sum(0)
    return g_sh, g_seed, (float(tot[0]), float(tot[1]), float(tot[2]))
