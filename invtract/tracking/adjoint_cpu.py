"""Compiled CPU reverse sweep of :mod:`invtract.tracking.differentiable` (numba).

The same closed-form adjoint as the torch sweep (``differentiable._local_adjoint``), evaluated
one streamline at a time from its last step to its seed instead of one step at a time over all
streamlines: per step, the 8 trilinear corners are gathered once, the interpolated
coefficients c(p_k) and a ``[7, K]`` table of the basis and its directional derivatives at the
stored peak u*_k (values, first derivatives along e1, e2, u*, second derivatives along e1, e2,
e1 + e2) give the implicit-peak geometry, and the FOD adjoint is scattered into a float64
``[V, K]`` buffer. Everything is float64 (the torch sweep rounds jets to the FOD dtype; the two
agree to rounding in float64 and to ~1e-6 relative for float32 FODs).

Streamlines are split into ``T`` contiguous blocks of about equal step counts, run on ``T``
Python threads (the kernel releases the GIL; numba's OpenMP pool is not used: a second OpenMP
runtime beside torch's slowed every later torch operation of the process about 20x), each block
with its own ``[V, K]`` buffer (summed at the end; deterministic for a given ``T``). ``T`` is the
torch thread count, capped so that the buffers stay under :data:`BUFFER_BUDGET_BYTES`.

Public API: :func:`available`, :func:`reverse_sweep`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # pragma: no cover - exercised implicitly
    import numba
    from numba import njit

    _NUMBA_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - only without numba
    numba = None
    _NUMBA_ERROR = exc

    def njit(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f


__all__ = ["available", "reverse_sweep", "tape_values", "BUFFER_BUDGET_BYTES"]

#: per-thread float64 FOD-gradient buffers are limited to this many bytes in total
BUFFER_BUDGET_BYTES = 512 * 2**20

_JIT = dict(cache=True, fastmath=False, error_model="numpy", boundscheck=False, nogil=True)


def available() -> bool:
    """True when numba imported (the compiled reverse sweep can run)."""
    return numba is not None


@njit(**_JIT)
def _sig_neg(z):
    """sigmoid(-z)."""
    return 1.0 / (1.0 + math.exp(z))


@njit(**_JIT)
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


@njit(**_JIT)
def _local(
    px, py, pz, ux, uy, uz, vx, vy, vz, step, a_p, a_u, a_l, h,
    sh, want_sh, G, M, shape, lmax, A0, A1, A2, e_of_k, m_of_k, im_of_k, scale_k,
    t_amp, t_cos, eps, cut, cos_max, scr, D, cvec, cbar, idx, w, dw, out, acc,
):  # fmt: skip
    """Adjoint of one step (``step``) or of the seed evaluation; see ``_local_adjoint``.

    (p, u*, u_prev = v) in; a_p [3], a_u [3], a_l the adjoints of the step's outputs. Writes
    out[0:3] = adjoint of p, out[3:6] = adjoint of u_prev; adds to G (FOD), acc[0] (h),
    acc[1] (cutoff), acc[2] (cos_max).
    """
    K = sh.shape[1]
    n = lmax + 1
    E = A0.shape[1]
    # trilinear corners (as differentiable._local_adjoint / interp.corner_weights)
    fx, lx, hx, edx = _axis(M, 0, px, py, pz, shape[0])
    fy, ly, hy, edy = _axis(M, 1, px, py, pz, shape[1])
    fz, lz, hz, edz = _axis(M, 2, px, py, pz, shape[2])
    s0 = shape[1] * shape[2]
    s1 = shape[2]
    for c in range(8):
        bx = c & 1
        by = (c >> 1) & 1
        bz = (c >> 2) & 1
        wx = fx if bx else 1.0 - fx
        wy = fy if by else 1.0 - fy
        wz = fz if bz else 1.0 - fz
        ww = wx * (wy * wz)
        live = ww >= 1e-6
        w[c] = ww if live else 0.0
        idx[c] = (hx if bx else lx) * s0 + (hy if by else ly) * s1 + (hz if bz else lz)
        if live:
            dw[c, 0] = (1.0 if bx else -1.0) * (wy * wz)
            dw[c, 1] = (1.0 if by else -1.0) * (wx * wz)
            dw[c, 2] = (1.0 if bz else -1.0) * (wx * wy)
        else:
            dw[c, 0] = 0.0
            dw[c, 1] = 0.0
            dw[c, 2] = 0.0
    for k in range(K):
        cvec[k] = 0.0
    for c in range(8):
        if w[c] != 0.0:
            row = idx[c]
            wc = w[c]
            for k in range(K):
                cvec[k] += wc * sh[row, k]
    # tangent basis at u* (peak_grad.tangent_basis: axis of the smallest |u_i|, first on ties)
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
    # basis tables: Q, Q', Q'' per Legendre entry; W_m = (x + iy)^m; direction derivatives
    Q = scr[0]
    Q1 = scr[1]
    Q2 = scr[2]
    for e in range(E):
        q0 = A0[n - 1, e]
        q1 = A1[n - 1, e]
        q2 = A2[n - 1, e]
        for i in range(n - 2, -1, -1):
            q0 = q0 * uz + A0[i, e]
            q1 = q1 * uz + A1[i, e]
            q2 = q2 * uz + A2[i, e]
        Q[e] = q0
        Q1[e] = q1
        Q2[e] = q2
    Wr = scr[3]
    Wi = scr[4]
    Wr[0] = 1.0
    Wi[0] = 0.0
    for m in range(1, n):
        Wr[m] = Wr[m - 1] * ux - Wi[m - 1] * uy
        Wi[m] = Wr[m - 1] * uy + Wi[m - 1] * ux
    # directions: 0 e1, 1 e2, 2 e1 + e2, 3 u
    dxs = (e1x, e2x, e1x + e2x, ux)
    dys = (e1y, e2y, e1y + e2y, uy)
    dzs = (e1z, e2z, e1z + e2z, uz)
    # rows of D: 0 g1 (e1), 1 g2 (e2), 2 gu (u), 3 h11 (e1), 4 h22 (e2), 5 h++ (e1+e2), 6 Y
    for k in range(K):
        e = e_of_k[k]
        m = m_of_k[k]
        im = im_of_k[k]
        s = scale_k[k]
        q = Q[e]
        q1 = Q1[e]
        q2 = Q2[e]
        wm = Wi[m] if im else Wr[m]
        D[6, k] = s * q * wm
        if m >= 1:
            ar = m * Wr[m - 1]
            ai = m * Wi[m - 1]
        else:
            ar = 0.0
            ai = 0.0
        if m >= 2:
            br = m * (m - 1) * Wr[m - 2]
            bi = m * (m - 1) * Wi[m - 2]
        else:
            br = 0.0
            bi = 0.0
        for j in range(4):
            zr = dxs[j]
            zi = dys[j]
            dz = dzs[j]
            # m W_{m-1} zeta
            v1r = ar * zr - ai * zi
            v1i = ar * zi + ai * zr
            v1 = v1i if im else v1r
            first = s * (q1 * dz * wm + q * v1)
            if j == 0:
                D[0, k] = first
            elif j == 1:
                D[1, k] = first
            elif j == 3:
                D[2, k] = first
            if j < 3:
                z2r = zr * zr - zi * zi
                z2i = 2.0 * zr * zi
                v2r = br * z2r - bi * z2i
                v2i = br * z2i + bi * z2r
                v2 = v2i if im else v2r
                D[3 + j, k] = s * (q2 * dz * dz * wm + 2.0 * q1 * dz * v1 + q * v2)
    g1 = 0.0
    g2 = 0.0
    gu = 0.0
    h11 = 0.0
    h22 = 0.0
    hpp = 0.0
    A = 0.0
    for k in range(K):
        ck = cvec[k]
        g1 += D[0, k] * ck
        g2 += D[1, k] * ck
        gu += D[2, k] * ck
        h11 += D[3, k] * ck
        h22 += D[4, k] * ck
        hpp += D[5, k] * ck
        A += D[6, k] * ck
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
    if ok:
        bb = -(y0 * x1 + y1 * x0)
        qb0 = y0
        qb1 = y1
        qb2 = y0 * x0 + y1 * x1
        qb3 = -y0 * x0 - 0.5 * bb
        qb4 = -y1 * x1 - 0.5 * bb
        qb5 = 0.5 * bb
    else:
        qb0 = qb1 = qb2 = qb3 = qb4 = qb5 = 0.0
    for k in range(K):
        cbar[k] = (
            qb0 * D[0, k]
            + qb1 * D[1, k]
            + qb2 * D[2, k]
            + qb3 * D[3, k]
            + qb4 * D[4, k]
            + qb5 * D[5, k]
            + sA * D[6, k]
        )
    fbx = 0.0
    fby = 0.0
    fbz = 0.0
    for c in range(8):
        if w[c] == 0.0:  # dead corner: no weight, no weight derivative
            continue
        row = idx[c]
        wb = 0.0
        for k in range(K):
            wb += sh[row, k] * cbar[k]
        fbx += wb * dw[c, 0]
        fby += wb * dw[c, 1]
        fbz += wb * dw[c, 2]
        if want_sh:
            wc = w[c]
            for k in range(K):
                G[row, k] += wc * cbar[k]
    if edx:
        fbx = 0.0
    if edy:
        fby = 0.0
    if edz:
        fbz = 0.0
    for j in range(3):
        out[j] = fbx * M[0, j] + fby * M[1, j] + fbz * M[2, j]
        if step:
            out[j] += a_p[j]


@njit(**_JIT)
def _sweep(
    r0, r1, P, U, seeds, u0, n1, n2, gP, has_p, gW, W, has_w, sh, want_sh, Gt, M, shape, lmax,
    A0, A1, A2, e_of_k, m_of_k, im_of_k, scale_k, t_amp, t_cos, eps, cut, cos_max, h,
    g_seed, acc,
):  # fmt: skip
    """Rows ``r0 .. r1 - 1``, serially (one block); FOD adjoint into ``Gt``, scalars into acc."""
    K = sh.shape[1]
    E = A0.shape[1]
    n = lmax + 1
    scr = np.empty((5, max(E, n)))
    D = np.empty((7, K))
    cvec = np.empty(K)
    cbar = np.empty(K)
    idx = np.empty(8, np.int64)
    w = np.empty(8)
    dw = np.empty((8, 3))
    out = np.zeros(6)
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
        for hi in (1, 0):
            nh = n2[s] if hi else n1[s]
            if nh == 0:
                continue
            sgn = 1 if hi else -1
            for j in range(3):
                a_p[j] = 0.0
                a_u[j] = 0.0
            a_l = 0.0
            for k in range(nh - 1, -1, -1):
                co = c0 + sgn * (k + 1)
                ci = co - sgn
                if has_p:
                    for j in range(3):
                        a_p[j] += gP[s, co, j]
                if has_w:
                    a_l += gW[s, co] * W[s, co]
                if k > 0:
                    vx, vy, vz = (
                        np.float64(U[s, ci, 0]),
                        np.float64(U[s, ci, 1]),
                        np.float64(U[s, ci, 2]),
                    )
                elif hi:
                    vx, vy, vz = (
                        -np.float64(u0[s, 0]),
                        -np.float64(u0[s, 1]),
                        -np.float64(u0[s, 2]),
                    )
                else:
                    vx, vy, vz = np.float64(u0[s, 0]), np.float64(u0[s, 1]), np.float64(u0[s, 2])
                _local(
                    np.float64(P[s, ci, 0]), np.float64(P[s, ci, 1]), np.float64(P[s, ci, 2]),
                    np.float64(U[s, co, 0]), np.float64(U[s, co, 1]), np.float64(U[s, co, 2]),
                    vx, vy, vz, True, a_p, a_u, a_l, h,
                    sh, want_sh, Gt, M, shape, lmax, A0, A1, A2, e_of_k, m_of_k, im_of_k,
                    scale_k, t_amp, t_cos, eps, cut, cos_max, scr, D, cvec, cbar, idx, w,
                    dw, out, acc,
                )  # fmt: skip
                for j in range(3):
                    a_p[j] = out[j]
                    a_u[j] = out[3 + j]
            for j in range(3):
                a_p0[j] += a_p[j]
                a_u0[j] += -a_u[j] if hi else a_u[j]
            a_l0 += a_l
        _local(
            np.float64(seeds[s, 0]), np.float64(seeds[s, 1]), np.float64(seeds[s, 2]),
            np.float64(u0[s, 0]), np.float64(u0[s, 1]), np.float64(u0[s, 2]),
            0.0, 0.0, 0.0, False, a_p, a_u0, a_l0, h,
            sh, want_sh, Gt, M, shape, lmax, A0, A1, A2, e_of_k, m_of_k, im_of_k,
            scale_k, t_amp, t_cos, eps, cut, cos_max, scr, D, cvec, cbar, idx, w, dw, out,
            acc,
        )  # fmt: skip
        for j in range(3):
            g_seed[s, j] = a_p0[j] + out[j]


@njit(**_JIT)
def _logsig(x):
    """log sigmoid(x), stable."""
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


@njit(**_JIT)
def _values(
    r0, r1, P, Wt, seeds, u0, U, n1, n2, cl_seed, h_arr, sh, M, shape, lmax,
    A0, e_of_k, m_of_k, im_of_k, scale_k, t_amp, t_cos, cut, cos_max,
):  # fmt: skip
    """Rows ``r0 .. r1 - 1`` of the tape's points and weights (see :func:`tape_values`)."""
    K = sh.shape[1]
    E = A0.shape[1]
    n = lmax + 1
    L = P.shape[1]
    Q = np.empty(E)
    Wr = np.empty(n)
    Wi = np.empty(n)
    cvec = np.empty(K)
    pp = np.empty(3, P.dtype)  # the moving point, in the FOD dtype (as the hard pass)
    rnd = np.empty(1, sh.dtype)  # rounds A to the FOD dtype (as the plain path)
    h = h_arr[0]
    s0 = shape[1] * shape[2]
    s1 = shape[2]
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
                px = np.float64(pp[0])
                py = np.float64(pp[1])
                pz = np.float64(pp[2])
                fx, lx, hx, _ = _axis(M, 0, px, py, pz, shape[0])
                fy, ly, hy, _ = _axis(M, 1, px, py, pz, shape[1])
                fz, lz, hz, _ = _axis(M, 2, px, py, pz, shape[2])
                for kk in range(K):
                    cvec[kk] = 0.0
                for c in range(8):
                    bx = c & 1
                    by = (c >> 1) & 1
                    bz = (c >> 2) & 1
                    ww = (fx if bx else 1.0 - fx) * (
                        (fy if by else 1.0 - fy) * (fz if bz else 1.0 - fz)
                    )
                    if ww >= 1e-6:
                        row = (
                            (hx if bx else lx) * s0 + (hy if by else ly) * s1 + (hz if bz else lz)
                        )
                        for kk in range(K):
                            cvec[kk] += ww * sh[row, kk]
                for e in range(E):
                    q0 = A0[n - 1, e]
                    for i in range(n - 2, -1, -1):
                        q0 = q0 * uz + A0[i, e]
                    Q[e] = q0
                Wr[0] = 1.0
                Wi[0] = 0.0
                for m in range(1, n):
                    Wr[m] = Wr[m - 1] * ux - Wi[m - 1] * uy
                    Wi[m] = Wr[m - 1] * uy + Wi[m - 1] * ux
                A = 0.0
                for kk in range(K):
                    m = m_of_k[kk]
                    wm = Wi[m] if im_of_k[kk] else Wr[m]
                    A += cvec[kk] * (scale_k[kk] * Q[e_of_k[kk]] * wm)
                rnd[0] = A
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
    A0, _, _, e_of_k, m_of_k, im_of_k, scale = _tables(lmax)
    n1 = np.ascontiguousarray(n1, np.int64)
    n2 = np.ascontiguousarray(n2, np.int64)
    T = max(1, min(int(threads), max(S, 1)))
    bounds = _blocks(n1, n2, T)
    T = bounds.shape[0] - 1
    args = (
        points, weights, seeds, u0, u_pad, n1, n2, np.ascontiguousarray(cl_seed, np.float64),
        np.array([h], points.dtype), sh, np.ascontiguousarray(scanner2voxel, np.float64),
        np.asarray(shape, np.int64), lmax, A0, e_of_k, m_of_k, im_of_k, scale,
        float(t_amp), float(t_cos), float(cut), float(cos_max),
    )  # fmt: skip

    def block(t):
        _values(bounds[t], bounds[t + 1], *args)

    if T == 1:
        block(0)
    else:
        with ThreadPoolExecutor(T) as ex:
            list(ex.map(block, range(T)))


_TABLES: dict = {}


def _tables(lmax: int):
    if lmax not in _TABLES:
        from ..fod.peak_grad import _jet_tables

        A0, A1, A2, e_of_k, j_of_k, scale = _jet_tables(lmax)
        im = j_of_k > lmax
        m = np.where(im, j_of_k - lmax, j_of_k)
        _TABLES[lmax] = (
            np.ascontiguousarray(A0),
            np.ascontiguousarray(A1),
            np.ascontiguousarray(A2),
            e_of_k.astype(np.int64),
            m.astype(np.int64),
            im.astype(np.bool_),
            scale.astype(np.float64),
        )
    return _TABLES[lmax]


def _blocks(n1: np.ndarray, n2: np.ndarray, T: int) -> np.ndarray:
    """Row bounds of ``T`` contiguous blocks with about equal step counts."""
    S = n1.shape[0]
    if T <= 1 or S == 0:
        return np.array([0, S], np.int64)
    cum = np.cumsum(1 + n1 + n2)
    targets = cum[-1] * np.arange(1, T) / T
    inner = np.searchsorted(cum, targets, side="left") + 1
    return np.concatenate([[0], np.clip(inner, 0, S), [S]]).astype(np.int64)


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

    Returns:
        ``(g_sh [V, K] float64 or None, g_seeds [S, 3] float64, (g_h, g_cut, g_cos_max))``.
    """
    S = n1.shape[0]
    V, K = sh.shape
    tabs = _tables(lmax)
    n1 = np.ascontiguousarray(n1, np.int64)
    n2 = np.ascontiguousarray(n2, np.int64)
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
        g_weights if has_w else dummy2, weights if has_w else dummy2, has_w,
        sh, want_sh,
    )  # fmt: skip
    rest = (
        np.ascontiguousarray(scanner2voxel, np.float64), np.asarray(shape, np.int64), lmax,
        *tabs, float(t_amp), float(t_cos), float(eps), float(cut), float(cos_max), float(h),
        g_seed,
    )  # fmt: skip

    def block(t):
        _sweep(bounds[t], bounds[t + 1], *args, G[t] if want_sh else G[0], *rest, acc[t])

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
