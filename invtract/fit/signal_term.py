"""The diffusion-signal term of an FOD fit (``invtract fit --dwi DWI --response RESPONSE``).

:class:`SignalTerm` binds a DWI, its gradient table and a response to the FOD's voxel grid and
gives the fit :func:`invtract.losses.signal.signal_loss` for the learned voxels (weighted by
``[loss.weights] signal``). :func:`run_csd_only` is ``invtract fit --dwi`` without a target:
the minimiser of the signal term alone, i.e. ``dwi2fod csd``'s coefficients, over the mask.

Memory: the DWI is kept only for the shell CSD uses and only in the usable voxels (the mask),
as float32 ``[U, N]`` (N ~ the FOD's K coefficients: at most one copy of the FOD, a fraction
of one at whole-brain size), read slab by slab from the file; plus ``[X*Y*Z]`` float64
reference values and an int32 row map.

Time: a fit needs CSD's optimum only in the voxels it learns, and the noise level. So CSD is
solved up front on at most :data:`NOISE_SAMPLE` usable voxels (all of them in a smaller mask; an
even stride through the mask in a larger one, e.g. a whole brain), which set the noise variance,
and in any other voxel the first time the fit asks for it. CSD alone (``keep_csd``) solves every
voxel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, InvtractError, ShapeError
from ..fod.csd import CSDModel, csd_model, csd_objective, csd_solve, load_response
from ..fod.msmt import MSMTModel
from ..losses.signal import (
    neighbour_pairs,
    noise_variance,
    signal_loss,
    signal_residual,
    spatial_coupling,
)

__all__ = [
    "SignalTerm",
    "load_dwi",
    "add_signal_arguments",
    "check_signal_args",
    "check_signal_config",
    "parse_spatial",
    "signal_from_args",
    "run_csd_only",
]

log = logging.getLogger("invtract")

#: ``--fod-updates low``: the highest degree the fit's gradient changes
LOW_LMAX = 4
#: usable voxels whose CSD residual sets the noise variance (all of them when fewer)
NOISE_SAMPLE = 16384
#: voxels solved (and their objective computed: ``[B, 300]`` float64) at a time
SOLVE_BLOCK = 65536


def load_dwi(path: str, fslgrad: tuple[str, str] | None = None):
    """``(ImageFile [X, Y, Z, N_all], grad [N_all, 4])``: a DWI opened (its data not read:
    :class:`~invtract.io.image.ImageFile` reads only the volumes and voxels the term needs)
    with its gradient table.

    The table comes from ``fslgrad`` (``(bvecs, bvals)``, FSL convention) if given, else from
    the ``.mif`` header's ``dw_scheme``.
    """
    from ..io.gradients import load_fsl_gradients, read_mif_scheme
    from ..io.image import open_image

    dwi = open_image(path)
    if fslgrad:
        if str(path).lower().endswith((".mif", ".mih", ".mif.gz")):
            log.warning("--fslgrad with a .mif DWI: bvecs are taken in its stored voxel axes")
        grad = load_fsl_gradients(fslgrad[0], fslgrad[1], dwi.affine, dwi.shape[3])
    else:
        grad = read_mif_scheme(path)
    return dwi, grad


def _shell_signals(dwi, volumes: np.ndarray, mask: np.ndarray | None):
    """``(signals [U, n] float32, usable [X*Y*Z] bool, idx [U])`` of the given volumes at the
    usable voxels (finite signal, inside ``mask``), in C order; ``idx`` their flat indices.
    ``dwi``: an array ``[X, Y, Z, N_all]`` or an :class:`~invtract.io.image.ImageFile`. Read
    slab by slab: neither the DWI nor the shell is held over the whole grid."""
    from ..io.voxel_major import masked_voxel_values

    if isinstance(dwi, np.ndarray):
        values, index = masked_voxel_values(dwi, volumes, mask)
    else:
        values, index = dwi.voxel_values(volumes, mask)
    if index.size == 0:
        raise ConfigError("the signal term has no usable voxel (mask empty or DWI not finite)")
    usable = torch.zeros(int(np.prod(dwi.shape[:3], dtype=np.int64)), dtype=torch.bool)
    idx = torch.from_numpy(index)
    usable[idx] = True
    return torch.from_numpy(values), usable, idx


def noise_sample(idx: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """At most ``n`` (default :data:`NOISE_SAMPLE`) of the flat voxel indices ``idx [U]``: all
    of them, or an even stride through them (spread over the whole mask, deterministic)."""
    n = NOISE_SAMPLE if n is None else int(n)
    if idx.numel() <= n:
        return idx
    pick = torch.linspace(0, idx.numel() - 1, n, dtype=torch.float64).round().long()
    return idx[pick]


@dataclass
class SignalTerm:
    """The signal term on an FOD grid.

    Attributes:
        model: the CSD model (shell, forward and constraint matrices).
        signals: ``[U, N]`` float32 signals of the shell at the usable voxels, in C order of
            the grid (:meth:`signal` reads them by flat voxel index).
        usable: ``[X*Y*Z]`` bool: finite signal (and inside the mask when one was given).
        reference: ``[X*Y*Z]`` float64 CSD objective at the CSD coefficients (0 where unusable;
            NaN where not solved yet: see ``solved``).
        variance: noise variance per measurement (mean squared CSD residual over the usable
            voxels, or an even sample of :data:`NOISE_SAMPLE` of them).
        A usable voxel whose ``reference`` is NaN is not solved yet (multi-tissue: its
        ``signals`` are still the measured ones); it is solved on first use (:attr:`solved`).
        csd: ``[X*Y*Z, K]`` float32 CSD coefficients (zero where unusable), kept only when
            built with ``keep_csd`` (CSD alone), else None.
        grid: ``(shape [3], affine [4, 4])`` of the DWI (set by :func:`signal_from_args`).
        updates: ``"free"`` (any change of the coefficients), ``"low"`` (the fit's gradient
            changes degrees l <= 4 only) or ``"rotation"`` (see
            :meth:`gradient_hook`).
        msmt: the multi-tissue problem when built with one response per tissue, else None;
            ``signals`` then hold every volume minus the other tissues' predicted signal.
        spatial: weight of the spatial coupling of the learned voxels' high-degree
            coefficients (:func:`~invtract.losses.signal.spatial_coupling`, added to the term;
            ``--signal-spatial``), 0: off; ``"auto"``: chosen at the first call from the
            learned voxels' signals by leave-directions-out cross-validation
            (:func:`~invtract.fit.signal_coupling.choose_coupling`), then the number chosen.
        coupling_cv: after an ``"auto"`` choice, ``{"weight": W, "cv_error": {W_i: mean squared
            held-out prediction error}}`` (``result.json``'s ``signal``), else None.
        others: ``[X*Y*Z, P-K]`` float32 coefficients of the other tissues, stacked in
            ``msmt.tissues`` order (multi-tissue, ``keep_csd`` only), else None.
        csd_rms: with ``keep_csd``, the mean RMS residual (signal units) of ``csd`` over the
            usable voxels (:meth:`residual`'s value, summed while solving), else None.
    """

    model: CSDModel
    signals: torch.Tensor
    usable: torch.Tensor
    reference: torch.Tensor
    variance: float
    csd: torch.Tensor | None
    grid: tuple | None = None
    updates: str = "free"
    msmt: MSMTModel | None = None
    others: torch.Tensor | None = None
    spatial: float | str = 0.0
    coupling_cv: dict | None = None
    csd_rms: float | None = None
    _row: torch.Tensor = field(init=False, repr=False, compare=False)
    _csd_array: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = int(self.usable.sum())
        if self.signals.shape[0] != n:
            rows = self.signals.shape[0]
            raise ShapeError(f"the signal term has {rows} signal rows for {n} usable voxels")
        self._row = torch.cumsum(self.usable, 0, dtype=torch.int32) - 1  # [X*Y*Z]

    def signal(self, voxels: torch.Tensor) -> torch.Tensor:
        """``[V, N]`` signals (a copy) of the usable ``voxels [V]`` (flat indices)."""
        return self.signals[self._row[voxels]]

    @property
    def solved(self) -> torch.Tensor:
        """``[X*Y*Z]`` bool: CSD solved there (or not usable): :attr:`reference` is set."""
        return ~self.reference.isnan()

    @classmethod
    def build(
        cls,
        dwi,
        grad: np.ndarray,
        response,
        mask: np.ndarray | None = None,
        keep_csd: bool = False,
        scratch: bool | str | os.PathLike = False,
        **opts,
    ) -> SignalTerm:
        """From a ``[X, Y, Z, N_all]`` DWI (an array or an opened
        :class:`~invtract.io.image.ImageFile`), its table, the response(s) and a mask.

        ``response``: one :class:`~invtract.fod.csd.Response` (single-shell CSD, ``dwi2fod
        csd``), or a list of one per tissue, the FOD's first (multi-shell multi-tissue CSD,
        ``dwi2fod msmt_csd``; the other tissues' coefficients are solved once and held fixed).
        ``opts`` go to :func:`~invtract.fod.csd.csd_model` (``lmax``, ``neg_lambda``, ...).
        ``scratch``: with ``keep_csd``, True (the temporary folder, ``TMPDIR``) or a folder
        to keep :attr:`csd` in when it is large
        (:func:`~invtract.io.scratch.scratch_or_memory`: written block by block, its pages
        released, so the whole FOD is never resident).
        """
        keep = (keep_csd, scratch)
        if isinstance(response, (list, tuple)) and len(response) > 1:
            return cls._build_msmt(dwi, grad, list(response), mask, keep, **opts)
        if isinstance(response, (list, tuple)):
            response = response[0]
        model = csd_model(grad, response, **opts)
        return cls._unsolved(model, dwi, model.volumes, mask, keep)

    @classmethod
    def _unsolved(cls, model, dwi, volumes, mask, keep, msmt=None) -> SignalTerm:
        """The term on ``dwi[..., volumes]`` with the noise sample solved (:meth:`_finish`;
        ``keep``: ``(keep_csd, scratch)`` of :meth:`build`)."""
        sig, usable, idx = _shell_signals(dwi, volumes, mask)
        ref = torch.zeros(usable.shape, dtype=torch.float64)
        ref[usable] = torch.nan
        term = cls(model, sig, usable, ref, 1.0, None, grid=(dwi.shape[:3], None), msmt=msmt)
        term._finish(idx, *keep)
        return term

    @classmethod
    def _build_msmt(cls, dwi, grad, responses, mask, keep, lmax=None, neg_lambda=1.0):
        """:meth:`build` with one response per tissue (``dwi2fod msmt_csd``)."""
        from ..fod.msmt import msmt_model, wm_signal_model

        mm = msmt_model(grad, responses, lmax)
        wm = wm_signal_model(mm, neg_lambda)
        return cls._unsolved(wm, dwi, np.arange(grad.shape[0]), mask, keep, msmt=mm)

    def _finish(self, idx: torch.Tensor, keep_csd: bool, scratch=False) -> None:
        """Solve the noise sample of the usable voxels ``idx`` (all of them with ``keep_csd``,
        which also keeps the coefficients, in a scratch file in ``scratch`` when large, and
        their :attr:`csd_rms`) and set :attr:`variance`."""
        from ..io.scratch import release, scratch_or_memory

        sample = idx if keep_csd else noise_sample(idx)
        n_all = self.usable.numel()
        csd = None
        if keep_csd:
            csd = scratch_or_memory((n_all, self.model.n_coeffs), np.float32, scratch)
            self._csd_array = csd
            self.csd = torch.from_numpy(csd)
        rest = None
        if keep_csd and self.msmt is not None:
            a, b = self.msmt.tissues[0]
            rest = torch.ones(self.msmt.n_params, dtype=torch.bool)
            rest[a:b] = False
            self.others = torch.zeros(n_all, int(rest.sum()), dtype=torch.float32)
        parts = []  # (voxels, mean squared residual) per block
        rms = 0.0  # keep_csd: summed as residual() sums it (same blocks, same order)

        def sink(block, b, c, x):
            nonlocal rms
            parts.append((block.numel(), noise_variance(b, self.model, c)))
            if keep_csd:
                c32 = c.float()
                self.csd[block] = c32
                release(csd)
                rms += float(signal_residual(c32.double(), b, self.model).sum())
            if rest is not None:
                self.others[block] = x[:, rest].float()

        self._solve(sample, sink)
        n = sum(k for k, _ in parts)
        self.variance = parts[0][1] if len(parts) == 1 else sum(k * v for k, v in parts) / n
        if keep_csd:
            self.csd_rms = rms / max(1, sample.numel())

    def _solve(self, idx: torch.Tensor, sink: Callable | None = None) -> None:
        """Solve CSD in the usable voxels ``idx`` (not solved before), :data:`SOLVE_BLOCK` at a
        time: set their :attr:`reference` (multi-tissue: replace their signals by the residual
        of the other tissues first) and hand each block to ``sink(block, b, c, x)``: ``b
        [B, N]`` their (WM) signals, ``c [B, K]`` float64 WM coefficients, ``x`` the
        multi-tissue solution ``[B, P]`` (None for single-shell CSD)."""
        for block in idx.split(SOLVE_BLOCK):
            b, c, x = self._solve_block(block)
            if sink is not None:
                sink(block, b, c, x)

    def _solve_block(self, idx: torch.Tensor):
        from ..fod.msmt import msmt_solve, residual_signals

        b, x = self.signal(idx), None
        if self.msmt is None:
            c = csd_solve(b, self.model)
        else:
            x = msmt_solve(b, self.msmt)
            b = residual_signals(b, x, self.msmt).float()
            self.signals[self._row[idx]] = b
            c = x[:, slice(*self.msmt.tissues[0])]
        b_ = b.double()
        b_ = b_.clamp_min(0) if self.model.clamp_signal else b_
        self.reference[idx] = csd_objective(c, b_, self.model)
        return b, c, x

    def _ensure_solved(self, voxels: torch.Tensor) -> None:
        """Solve CSD in the usable ``voxels [U]`` (flat indices) not solved yet."""
        todo = voxels[self.reference[voxels].isnan()]  # O(voxels), not the grid's
        if todo.numel():
            self._solve(torch.unique(todo))

    def __call__(self, sh_learn: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
        """The term over the learned voxels that have a usable signal.

        Args:
            sh_learn: ``[V, K]`` current coefficients of the learned voxels.
            voxels: ``[V]`` their flat indices (C order of the grid).

        Returns:
            0-d float64 tensor; gradients through ``sh_learn``.
        """
        vk, keep = self._usable(voxels)
        K = self.model.n_coeffs
        if sh_learn.shape[-1] != K:
            raise ShapeError(f"the FOD has {sh_learn.shape[-1]} coefficients, the model {K}")
        c = sh_learn[keep.to(sh_learn.device)].cpu()
        out = signal_loss(c, self.signal(vk), self.model, self.variance, self.reference[vk])
        if self._coupling_weight(vk) > 0:
            pairs = neighbour_pairs(vk, self.grid[0])
            out = out + self.spatial * spatial_coupling(c.to(torch.float64), pairs)
        return out.to(sh_learn.device)

    def _usable(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat indices [U], positions [U] in voxels)`` of the ``voxels`` with a usable
        signal."""
        v = voxels.to(self.usable.device).long()
        keep = torch.nonzero(self.usable[v]).flatten()
        self._ensure_solved(v[keep])
        return v[keep], keep

    def _coupling_weight(self, usable_voxels: torch.Tensor) -> float:
        """:attr:`spatial` as a number: ``"auto"`` is chosen here once (from
        ``usable_voxels``); a positive weight needs the grid."""
        if self.spatial == "auto" or self.spatial > 0:
            if self.grid is None:
                raise ConfigError("the signal term's spatial coupling needs the grid shape")
            if self.spatial == "auto":
                self.choose_spatial(usable_voxels)
        return self.spatial

    def choose_spatial(self, voxels: torch.Tensor) -> float:
        """Set :attr:`spatial` from the data: the coupling weight with the smallest
        leave-directions-out prediction error of the coupled CSD over ``voxels [V]`` (usable
        flat indices; :func:`~invtract.fit.signal_coupling.choose_coupling`)."""
        from .signal_coupling import CV_VOXELS, choose_coupling

        t0 = time.perf_counter()
        w, err = choose_coupling(
            self.signal(voxels), self.model, voxels, self.grid[0], self.variance
        )
        n_cv = min(int(voxels.numel()), CV_VOXELS)
        self.spatial = w
        self.coupling_cv = {
            "weight": w,
            "cv_error": {str(k): e for k, e in err.items()},
            "voxels": n_cv,
        }
        log.info(
            "signal term: spatial coupling W = %g chosen by cross-validation over %d of the "
            "%d learned voxels (held-out error %s; %.1f s)",
            w,
            n_cv,
            voxels.numel(),
            ", ".join(f"{k:g}: {e:.4g}" for k, e in err.items()),
            time.perf_counter() - t0,
        )
        return w

    def prepare(self, sh_start: torch.Tensor, voxels: torch.Tensor, coupled: bool):
        """The fit's one-time work on the learned voxels, as a picklable ``(spatial,
        coupling_cv, start change [V, K] or None)``: ``"auto"`` resolved to a number (the
        cross-validation) and, when ``coupled``, :meth:`start_change`. Under ``--nproc`` rank 0
        computes it and the others :meth:`adopt` it."""
        from ..heap import release_free_heap

        change = self.start_change(sh_start, voxels).cpu() if coupled else None
        if not coupled and self.grid is not None:  # without a grid "auto" fails at first use
            self._coupling_weight(self._usable(voxels)[0])
        release_free_heap()  # the solves' few-MB temporaries (invtract.heap)
        return self.spatial, self.coupling_cv, change

    def adopt(self, prepared) -> torch.Tensor | None:
        """Take :meth:`prepare`'s result (computed on another rank); returns its start
        change."""
        self.spatial, self.coupling_cv, change = prepared
        return change

    def start_change(self, sh_start: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
        """``[V, K]`` change taking the learned voxels from ``sh_start`` to the minimiser of
        this term alone (signal + spatial coupling; ``[signal] start = "coupled"``): the fit
        then starts where the data and the coupling put the FOD, and the tractography terms
        move it from there. Zero without coupling and in voxels with no usable signal.

        Args:
            sh_start: ``[V, K]`` starting coefficients of the learned voxels.
            voxels: ``[V]`` their flat indices (C order of the grid).
        """
        from .signal_coupling import coupled_csd

        vk, keep = self._usable(voxels)
        out = torch.zeros(sh_start.shape, dtype=torch.float64)
        if self._coupling_weight(vk) <= 0 or keep.numel() == 0:
            return out.to(sh_start.dtype)
        pairs = neighbour_pairs(vk, self.grid[0])
        c0 = sh_start[keep.to(sh_start.device)].cpu().double()
        c = coupled_csd(self.signal(vk), self.model, pairs, self.spatial, self.variance, start=c0)
        out[keep] = c - c0
        return out.to(sh_start.dtype)

    def gradient_hook(self, sh_start: torch.Tensor) -> Callable | None:
        """With ``updates == "rotation"``: a hook projecting the gradient of the FOD change of
        each learned voxel onto the infinitesimal rotations of its starting FOD.

        Args:
            sh_start: ``[V, K]`` starting coefficients of the learned voxels.

        Returns:
            ``hook(grad [V, K]) -> [V, K]`` (for ``delta.register_hook``) or None (free
            updates). With plain SGD the step is then ``-lr G (G^T G)^-1 G^T grad``, ``G``
            ``[V, K, 3]`` = rotation generators applied to ``sh_start``: each voxel's FOD turns
            as a whole (3 degrees of freedom) instead of changing shape.
        """
        if self.updates == "low":
            from ..fod.csd import sh_degree

            low = (2 * sh_degree(self.model.lmax) <= LOW_LMAX).to(sh_start.device)

            return lambda grad: grad * low.to(grad.dtype)
        if self.updates != "rotation":
            return None
        from ..fod.csd import rotation_generators

        L = rotation_generators(self.model.lmax).to(sh_start.device, torch.float64)  # [3, K, K]
        G = torch.einsum("ikj,vj->vki", L, sh_start.double())  # [V, K, 3]
        GtG = G.transpose(1, 2) @ G + 1e-9 * torch.eye(3, dtype=G.dtype, device=G.device)
        Ginv = torch.linalg.solve(GtG, G.transpose(1, 2))  # [V, 3, K]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            w = torch.einsum("vik,vk->vi", Ginv, grad.double())
            return torch.einsum("vki,vi->vk", G, w).to(grad.dtype)

        return hook

    def csd_volume(self) -> np.ndarray:
        """:attr:`csd` as the ``[X, Y, Z, K]`` array it is kept in (a view: a scratch array
        stays one, so :func:`~invtract.io.image.save_nifti` writes it from released slabs)."""
        if self._csd_array is None:
            raise InvtractError("the signal term was not built with keep_csd")
        return self._csd_array.reshape(tuple(self.grid[0]) + (self.model.n_coeffs,))

    def residual(self, sh: torch.Tensor, voxels: torch.Tensor) -> float:
        """Mean RMS signal residual (signal units) of ``sh [X*Y*Z, K]`` over usable ``voxels``."""
        v = voxels.long()
        v = v[self.usable[v]]
        self._ensure_solved(v)
        total = 0.0  # in blocks: a whole brain's [V, N] float64 temporaries add up to GBs
        for block in v.split(SOLVE_BLOCK):
            r = signal_residual(sh[block].double(), self.signal(block), self.model)
            total += float(r.sum())
        return total / max(1, v.numel())


def parse_spatial(value) -> float | str:
    """``[signal] spatial`` / ``--signal-spatial``: ``"auto"`` or a number >= 0 (ConfigError
    otherwise); None (unset) is ``"auto"``."""
    if value is None or isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if not w >= 0 or isinstance(value, bool):
        raise ConfigError(f'signal.spatial must be "auto" or a number >= 0, got {value!r}')
    return w


def add_signal_arguments(p: argparse.ArgumentParser) -> None:
    """``--dwi``, ``--fslgrad``, ``--response``, ``--mask`` of ``invtract fit``."""
    g = p.add_argument_group(
        "diffusion signal (CSD term; without --target: CSD alone, as dwi2fod csd)"
    )
    g.add_argument("--dwi", help="DWI image (.mif with dw_scheme, or NIfTI with --fslgrad)")
    g.add_argument("--fslgrad", nargs=2, metavar=("BVECS", "BVALS"), help="FSL gradient files")
    g.add_argument(
        "--response",
        nargs="+",
        metavar="RESPONSE",
        help="response function: response_wm.txt (single-shell CSD, as dwi2fod csd), or one "
        "file per tissue, the FOD's (WM) first, one row per shell (multi-shell multi-tissue CSD "
        "over every shell, as dwi2fod msmt_csd: --response wm.txt gm.txt csf.txt)",
    )
    g.add_argument("--mask", help="voxels of the signal term / CSD (default: finite DWI)")
    g.add_argument(
        "--signal-spatial",
        type=_spatial_flag,
        default=None,
        metavar="W",
        help="with --dwi: couple the learned voxels' l >= 4 coefficients to their 6 neighbours "
        "(W x sum of squared differences per voxel, added to the signal term; 0: off; auto: W "
        "chosen by leave-directions-out cross-validation); the config key [signal] spatial "
        "(default auto, see docs/csd.md), which this overrides",
    )
    g.add_argument(
        "--fod-updates",
        choices=("free", "low", "rotation"),
        default="free",
        help="with --dwi: free coefficient changes, changes of degrees l <= 4 only (low), or "
        "gradients projected on rotations of each voxel's starting FOD (use with --set "
        "optimizer.name=sgd)",
    )


def _spatial_flag(text: str) -> float | str:
    """argparse type of ``--signal-spatial``: a number, or the text (``"auto"``); the value is
    checked with the config (:func:`check_signal_config`), so a bad one is a ConfigError."""
    try:
        return float(text)
    except ValueError:
        return text


def check_signal_args(args) -> bool:
    """One-line errors of the signal flags before any data is read; True with ``--dwi``.

    ``--response`` / ``--fslgrad`` need ``--dwi``, ``--dwi`` needs ``--response``, a target fit
    with ``--dwi`` learns the FOD (``--fit fod|both``), and every given file exists.
    """
    if not getattr(args, "dwi", None):
        if getattr(args, "response", None) or getattr(args, "fslgrad", None):
            raise ConfigError("--response / --fslgrad need --dwi")
        return False
    if getattr(args, "fit", "fod") == "params" and getattr(args, "target", None):
        raise ConfigError("--dwi adds a term on the FOD: use --fit fod or --fit both")
    if not args.response:
        raise ConfigError("--dwi needs --response RESPONSE")
    files = [("dwi", args.dwi), ("mask", args.mask)]
    files += [("response", f) for f in _responses(args)]
    files += [("fslgrad", f) for f in (args.fslgrad or [])]
    for flag, path in files:
        if path and not os.path.exists(path):
            raise InvtractError(f"--{flag}: file not found: {path}")
    return True


def _responses(args) -> list[str]:
    """The ``--response`` files as a list (one path or several)."""
    r = getattr(args, "response", None) or []
    return [r] if isinstance(r, (str, os.PathLike)) else list(r)


def check_signal_config(weights: Mapping, learn, have_signal: bool, spatial=0.0) -> None:
    """The ``signal`` weight of ``[loss.weights]`` against the fit: a positive weight needs a
    signal term (``--dwi``), and a signal term needs the FOD learned (``"sh"`` in ``learn``);
    a signal term with weight 0 is off (a warning). ``spatial`` (``[signal] spatial``) must be
    ``"auto"`` or a number >= 0."""
    parse_spatial(spatial)
    w = float(weights.get("signal", 0.0))
    if have_signal and "sh" not in tuple(learn):
        raise ConfigError("--dwi adds a term on the FOD: use --fit fod or --fit both")
    if w > 0 and not have_signal:
        raise ConfigError(
            f"[loss.weights] signal = {w:g} needs the diffusion signal: give --dwi DWI "
            "--response RESPONSE (or set the weight to 0)"
        )
    if have_signal and w == 0:
        log.warning("--dwi: [loss.weights] signal is 0, the signal term is off")


def signal_from_args(args, fod_image=None, keep_csd: bool = False, world=None, scratch=False):
    """The :class:`SignalTerm` of ``--dwi ... --response ...`` (None without ``--dwi``).

    With a multi-process ``world`` (:class:`~invtract.fit.distributed.World`, ``--nproc``),
    rank 0 alone reads the DWI and solves CSD; the other ranks receive its term (one
    broadcast, :meth:`~invtract.fit.distributed.World.on_main`: an error there is raised on every
    rank), so every rank holds the same term without repeating the solve. ``keep_csd``,
    ``scratch``: see :meth:`SignalTerm.build`.
    """
    if not check_signal_args(args):
        return None
    from functools import partial

    build = partial(_build_from_args, args, fod_image, keep_csd, scratch)
    return build() if world is None else world.on_main(build)


def _build_from_args(args, fod_image, keep_csd: bool, scratch=False) -> SignalTerm:
    """:func:`signal_from_args`'s work on one process."""
    from ..io.image import check_same_grid, load_mask

    dwi, grad = load_dwi(args.dwi, args.fslgrad)
    mask = None
    if args.mask:
        m = load_mask(args.mask)
        check_same_grid(m, dwi, "--mask vs --dwi")
        mask = m.data
    if fod_image is not None:
        check_same_grid(dwi, fod_image, "--dwi vs --fod")
    t0 = time.perf_counter()
    files = _responses(args)
    responses = [load_response(f, anisotropic=i == 0) for i, f in enumerate(files)]
    term = SignalTerm.build(dwi, grad, responses, mask, keep_csd, scratch)
    log.info(
        "signal term: %s b=%.0f (%d directions), lmax %d, %d voxels, sigma %.4g (%.1f s)",
        f"{len(files)} tissues, every shell up to" if term.msmt else "shell",
        term.model.bvalue,
        term.model.volumes.size,
        term.model.lmax,
        int(term.usable.sum()),
        term.variance**0.5,
        time.perf_counter() - t0,
    )
    term.grid = (tuple(dwi.shape[:3]), dwi.affine)
    term.updates = getattr(args, "fod_updates", "free") or "free"
    return term


def run_csd_only(args) -> int:
    """``invtract fit --dwi DWI --response R [--mask M]`` with no target: write the CSD FOD.

    Writes ``fitted_fod.nii.gz`` (the DWI's grid; zero outside the mask) and ``result.json``
    (shell, lmax, voxels, noise sigma, mean RMS residual, seconds) in the run folder. With one
    response per tissue (``dwi2fod msmt_csd``), also ``fitted_tissue2.nii.gz``, ... (the other
    tissues' l = 0 coefficients, in ``--response`` order), and ``result.json`` ``mode``
    ``"msmt_csd"`` with ``shells`` and ``fitted_tissues``.
    """
    from ..fit.runlog import resolve_run_dir
    from ..io.atomic import atomic_write_text, check_writable_dir
    from ..io.image import save_nifti

    if getattr(args, "fit", "fod") == "params":
        raise ConfigError("--dwi without --target fits the FOD alone: use --fit fod")
    check_signal_args(args)
    run_dir = resolve_run_dir(args.run or "csd")
    check_writable_dir(run_dir)
    t0 = time.perf_counter()
    term = signal_from_args(args, keep_csd=True, scratch=True)
    shape3, affine = term.grid
    save_nifti(run_dir / "fitted_fod.nii.gz", term.csd_volume(), affine)
    tissues = []
    if term.others is not None:
        k0 = term.msmt.tissues[1][0]
        for i, (a, b) in enumerate(term.msmt.tissues[1:]):
            name = f"fitted_tissue{i + 2}.nii.gz"
            vol = term.others[:, a - k0 : b - k0].reshape(shape3 + (b - a,)).squeeze(-1)
            save_nifti(run_dir / name, vol.numpy(), affine)
            tissues.append(name)
    vox = torch.nonzero(term.usable).flatten()
    summary = {
        "mode": "msmt_csd" if term.msmt else "csd",
        "bvalue": term.model.bvalue,
        "n_directions": int(term.model.volumes.size),
        "lmax": term.model.lmax,
        "n_voxels": int(vox.numel()),
        "noise_sigma": term.variance**0.5,
        "signal_rms_residual": term.csd_rms,
        "seconds": time.perf_counter() - t0,
        "fitted_fod": "fitted_fod.nii.gz",
    }
    if term.msmt:
        summary["shells"] = list(term.msmt.shells)
        summary["fitted_tissues"] = tissues
    atomic_write_text(run_dir / "result.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0
