"""The signal term's spatial coupling weight from the data: leave-directions-out cross-validation.

The signal term (:mod:`invtract.losses.signal`) may tie the learned voxels' high-degree
coefficients to their 6 neighbours with weight ``W`` (``[signal] spatial``):

    ``S(c) = mean_v (f_v(c_v) - f_v(c*_v)) / (N sigma^2) + W sum_pairs |c_i - c_j|^2_{l >= 4} / V``

Multiplied by ``V N sigma^2`` this is a Gaussian MAP objective ``sum_v f_v + (W N sigma^2)
sum_pairs |d|^2``: the coupling is a prior on neighbour differences with variance
``tau^2 = 1 / (W N)`` per pair, so its best weight depends on how noisy the CSD of ``N``
directions is against how alike neighbouring FODs are -- which the data can tell, not a constant.

:func:`choose_coupling` picks ``W`` among candidates by K-fold cross-validation over the shell's
gradient directions: for each fold, the coupled CSD (:func:`coupled_csd`, the minimiser of ``S``
without the constant ``f(c*)``) is solved on the other directions, with each measurement weighted
``1 / (N sigma^2)`` as in the fit (so a candidate means the same prior ``tau^2`` on the training
directions as on all), and predicts the held-out directions' signal. The candidate with the
smallest summed squared prediction error wins. No tracking is involved; the cost is
``folds x candidates`` L-BFGS solves over the voxels given (the fit's learned voxels), or, in a
larger region (a whole-brain bundle), over a connected blob of :data:`CV_VOXELS` of them
(:func:`cv_region`): the weight is a property of the data's noise and smoothness, which a
thousand voxels measure, and the solves cost time in proportion to the voxels (3217 learned
voxels: 248 s on one thread).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from ..fod.csd import CSDModel, csd_objective, csd_solve, predict_signal
from ..losses.signal import neighbour_pairs, spatial_coupling

__all__ = ["CANDIDATES", "coupled_csd", "sub_model", "choose_coupling", "cv_region"]

log = logging.getLogger("invtract")

#: coupling weights ``W`` tried by :func:`choose_coupling` (0: no coupling)
CANDIDATES: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0)
#: times the candidates are extended by 3 x the largest while the largest is the best
EXTEND = 2
#: most voxels the cross-validation solves over (:func:`cv_region`)
CV_VOXELS = 1024


@contextmanager
def _one_thread():
    """Small ``[V, K]`` work in one torch thread: more only contend (10-100x slower measured on
    the loaded shared 2-core machine). Restores the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def coupled_csd(
    signals: torch.Tensor,
    model: CSDModel,
    pairs: torch.Tensor,
    weight: float,
    variance: float,
    n_ref: int | None = None,
    start: torch.Tensor | None = None,
    lmin: int = 4,
    max_iter: int = 200,
) -> torch.Tensor:
    """``[V, K]`` float64 minimiser of ``sum_v f_v(c_v) / (n_ref sigma^2 V) + weight x
    spatial_coupling(c, pairs, lmin)`` (the signal term with its coupling, up to a constant).

    Args:
        signals: ``[V, N]`` signals of ``model``'s directions (clamped at 0 as the model says).
        model: :class:`~invtract.fod.csd.CSDModel`.
        pairs: ``[E, 2]`` neighbour pairs (:func:`~invtract.losses.signal.neighbour_pairs`).
        weight: ``W`` (0: per-voxel CSD, :func:`~invtract.fod.csd.csd_solve`).
        variance: ``sigma^2`` per measurement.
        n_ref: the ``N`` of the normalisation (default: the model's direction count).
        start: ``[V, K]`` starting point (default: the per-voxel CSD solution).
        lmin, max_iter: the coupling's lowest degree; L-BFGS iterations.
    """
    b = signals.to(torch.float64)
    b = b.clamp_min(0.0) if model.clamp_signal else b
    c0 = csd_solve(b, model) if start is None else start.to(torch.float64)
    if (weight <= 0 or pairs.numel() == 0) and model.clamp_signal:
        return c0  # csd_solve is the minimiser (it clamps signals at 0, as this model does)
    weight = max(float(weight), 0.0)  # unclamped (multi-tissue) signals: minimise from c0
    scale = 1.0 / ((n_ref or model.M.shape[0]) * float(variance) * b.shape[0])
    x = c0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        f = csd_objective(x, b, model).sum() * scale + weight * spatial_coupling(x, pairs, lmin)
        f.backward()
        return f

    with _one_thread():
        opt.step(closure)
    return x.detach()


def sub_model(model: CSDModel, rows: np.ndarray) -> CSDModel:
    """``model`` restricted to the directions ``rows`` (positions into its ``M``): the forward
    matrix's rows and the minimum-norm term scaled as ``dwi2fod csd`` would on them."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    M = model.M[idx]
    full00 = float((model.M[:, 0] ** 2).sum())
    lam = model.norm_lambda * float((M[:, 0] ** 2).sum()) / full00 if full00 > 0 else 0.0
    init = model.init[:, idx] * (model.M.shape[0] / len(rows))  # a start point only
    return replace(model, volumes=model.volumes[rows], M=M, norm_lambda=lam, init=init)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint held-out sets covering ``range(n)`` (seeded shuffle)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[i::k]) for i in range(k)]


def cv_region(voxels: torch.Tensor, shape: tuple[int, int, int], n: int | None = None):
    """``[<= n]`` positions into ``voxels [V]`` (flat indices, C order of ``shape``) of the
    cross-validation's region: all of them when ``V <= n`` (default :data:`CV_VOXELS`), else a
    connected blob of ``n``: breadth-first over the 6-neighbour pairs from the voxel nearest
    the region's centroid (continuing in the next component if that one is smaller), so the
    blob keeps its neighbour pairs. Deterministic."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order

    n = CV_VOXELS if n is None else int(n)
    V = int(voxels.numel())
    if V <= n:
        return torch.arange(V)
    pairs = neighbour_pairs(voxels, shape).numpy()
    ones = np.ones(len(pairs))
    graph = coo_matrix((ones, (pairs[:, 0], pairs[:, 1])), shape=(V, V)).tocsr()
    ijk = np.stack(np.unravel_index(voxels.long().cpu().numpy(), tuple(shape)), 1)
    dist = ((ijk - ijk.mean(0)) ** 2).sum(1)
    seen = np.zeros(V, bool)
    picked: list[np.ndarray] = []
    count = 0
    for start in np.argsort(dist, kind="stable"):
        if seen[start]:
            continue
        order = breadth_first_order(graph, int(start), directed=False, return_predecessors=False)
        seen[order] = True
        picked.append(order[: n - count])
        count += len(picked[-1])
        if count >= n:
            break
    return torch.as_tensor(np.sort(np.concatenate(picked)), dtype=torch.long)


def choose_coupling(
    signals: torch.Tensor,
    model: CSDModel,
    voxels: torch.Tensor,
    shape: tuple[int, int, int],
    variance: float,
    candidates: tuple[float, ...] = CANDIDATES,
    folds: int = 5,
    seed: int = 0,
    lmin: int = 4,
) -> tuple[float, dict[float, float]]:
    """The coupling weight ``W`` with the smallest leave-directions-out prediction error.

    Args:
        signals: ``[V, N]`` signals of ``voxels`` on the model's shell.
        model: :class:`~invtract.fod.csd.CSDModel` (single shell, or the multi-tissue term's).
        voxels: ``[V]`` flat voxel indices (C order of ``shape``): the coupled region.
        shape: the grid's ``(X, Y, Z)``.
        variance: ``sigma^2`` per measurement (the signal term's).
        candidates: ``W`` values tried (while the largest is the best, ``3 x`` it is tried
            too, at most :data:`EXTEND` times); folds, seed: the direction split.

    Returns:
        ``(W, {candidate: mean squared prediction error per held-out measurement})``, over
        :func:`cv_region`'s voxels.
    """
    region = cv_region(voxels, shape)
    signals, voxels = signals[region], voxels[region]
    pairs = neighbour_pairs(voxels, shape)
    n = model.M.shape[0]
    err = dict.fromkeys(candidates, 0.0)
    if pairs.numel() == 0 or n < 2 * folds:
        return 0.0, err
    b = signals.to(torch.float64)
    b = b.clamp_min(0.0) if model.clamp_signal else b
    split = _folds(n, folds, seed)
    with _one_thread():
        err = _cv_errors(b, model, pairs, variance, candidates, split, lmin)
        for _ in range(EXTEND):  # the largest candidate is best: the optimum may lie beyond
            top = max(err)
            if top <= 0 or min(err, key=lambda w: (err[w], w)) != top:
                break
            err.update(_cv_errors(b, model, pairs, variance, (3.0 * top,), split, lmin))
    best = min(err, key=lambda w: (err[w], w))
    return float(best), err


def _cv_errors(b, model, pairs, variance, candidates, folds, lmin) -> dict[float, float]:
    """Mean squared held-out prediction error per candidate over the ``folds``."""
    n = model.M.shape[0]
    err = dict.fromkeys(candidates, 0.0)
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        m = sub_model(model, train)
        start = None
        for w in sorted(candidates):
            start = coupled_csd(
                b[:, train], m, pairs, w, variance, n_ref=n, start=start, lmin=lmin
            )
            pred = predict_signal(start, model.M[torch.as_tensor(test)])
            err[w] += float((pred - b[:, test]).pow(2).sum())
    return {w: e / (b.shape[0] * n) for w, e in err.items()}
