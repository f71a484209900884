"""Constant tables of MRtrix3's peak search (``Math::SH::derivatives``) at one lmax (no torch).

Built once per lmax on the host; the torch peak search (:mod:`invtract.fod.peaks`) moves them to
its device, the compiled engines lay them out for their kernels.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .legendre import legendre_index, legendre_table, lut_increment, n_legendre
from .sh_layout import sh_index

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["PeakTables", "peak_tables"]


class PeakTables:
    """Constant tables for the peak search at one lmax (host copies; see :func:`peak_tables`).

    Entries e run over (l even, 0 <= m <= l) in MRtrix's ``index_mpos`` order.
    """

    def __init__(self, lmax: int) -> None:
        self.lmax = lmax
        E = n_legendre(lmax)
        self.table = np.asarray(legendre_table(lmax))
        self.inc = float(lut_increment())
        ls, ms = np.zeros(E, np.int64), np.zeros(E, np.int64)
        ip, im = np.zeros(E, np.int64), np.zeros(E, np.int64)  # coefficient indices of +m, -m
        # first derivative: D = (ka*AL[ia] - kb*AL[ib]) * kc
        ia, ib = np.zeros(E, np.int64), np.zeros(E, np.int64)
        ka, kb, kc = np.zeros(E, np.float32), np.zeros(E, np.float32), np.ones(E, np.float32)
        # second derivative: E = (k0*AL[j0] + k1*AL[j1] + k2*AL[j2]) * kd
        j0, j1, j2 = (np.zeros(E, np.int64) for _ in range(3))
        k0, k1, k2 = (np.zeros(E, np.float32) for _ in range(3))
        kd = np.ones(E, np.float32)
        f32 = np.float32
        for l in range(0, lmax + 1, 2):
            for m in range(0, l + 1):
                e = legendre_index(l, m)
                ls[e], ms[e] = l, m
                ip[e] = sh_index(l, m)
                im[e] = sh_index(l, -m)
                if m == 0:
                    if l >= 2:
                        ia[e], ka[e] = legendre_index(l, 1), f32(math.sqrt(f32(l * (l + 1))))
                        j0[e] = legendre_index(l, 2)
                        k0[e] = f32(math.sqrt(f32(l * (l + 1) * (l - 1) * (l + 2))))
                        j1[e], k1[e] = legendre_index(l, 0), -f32(l * (l + 1))
                        kd[e] = 0.5
                    else:
                        kd[e] = 0.0
                else:
                    ia[e] = legendre_index(l, m - 1)
                    ka[e] = f32(math.sqrt(f32((l + m) * (l - m + 1))))
                    if l > m:
                        ib[e] = legendre_index(l, m + 1)
                        kb[e] = f32(math.sqrt(f32((l - m) * (l + m + 1))))
                    kc[e] = -0.5
                    j0[e], k0[e] = e, -f32((l + m) * (l - m + 1) + (l - m) * (l + m + 1))
                    s3 = f32(math.sqrt(f32((l + m) * (l - m + 1) * (l + m - 1) * (l - m + 2))))
                    if m == 1:
                        j1[e], k1[e] = legendre_index(l, 1), -s3
                    else:
                        j1[e], k1[e] = legendre_index(l, m - 2), s3
                    if l > m + 1:
                        j2[e] = legendre_index(l, m + 2)
                        k2[e] = f32(
                            math.sqrt(f32((l - m) * (l + m + 1) * (l - m - 1) * (l + m + 2)))
                        )
                    kd[e] = 0.25
        self.arrays = dict(
            ls=ls, ms=ms, ip=ip, im=im, ia=ia, ib=ib, ka=ka, kb=kb, kc=kc,
            j0=j0, j1=j1, j2=j2, k0=k0, k1=k1, k2=k2, kd=kd,
        )  # fmt: skip
        self._on: dict = {}

    def on(self, device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
        """Tensors of the tables on ``device`` (cached); float tables in ``dtype``
        (default float32)."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        key = (str(device), dtype)
        if key not in self._on:
            d = {}
            for k, v in self.arrays.items():
                t = torch.as_tensor(v, device=device)
                d[k] = t.to(dtype) if v.dtype == np.float32 else t
            d["table"] = torch.as_tensor(self.table.copy(), device=device).to(dtype)
            d["m_float"] = torch.as_tensor(self.arrays["ms"], device=device).to(dtype)
            d["mpos"] = torch.as_tensor(self.arrays["ms"] > 0, device=device)
            self._on[key] = d
        return self._on[key]


@lru_cache(maxsize=16)
def peak_tables(lmax: int) -> PeakTables:
    """Cached :class:`PeakTables` for ``lmax``."""
    return PeakTables(lmax)
