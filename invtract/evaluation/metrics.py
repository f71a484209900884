"""Evaluation metrics between two tractograms (no gradients), computed with DIPY and scipy.

Streamlines are scanner mm (RAS+). Each metric names the library call that computes it:

* **MDF** (minimum average direct-flip distance) of streamlines resampled to ``n_points``
  (``dipy.tracking.streamline.set_number_of_points``): ``dipy.tracking.distances.
  bundles_distances_mdf``, evaluated in blocks so that whole-brain sets fit in memory.
* **Bundle adjacency** (Garyfallidis 2012): the mean over both sets of the fraction of
  streamlines whose nearest MDF neighbour in the other set is closer than the threshold; equal
  to ``dipy.segment.bundles.bundle_adjacency`` (tested), from the same blocked MDF minima.
* **MAM** (mean of closest distances, ``metric="avg"``):
  ``dipy.tracking.distances.bundles_distances_mam``, on the raw vertices (``resample=None``)
  or on ``resample`` points per streamline.
* **Hausdorff** (symmetric, polyline vertices): ``max(h(a, b), h(b, a))`` with
  ``h(a, b) = max_i min_j |a_i - b_j|`` (equal to ``scipy.spatial.distance.directed_hausdorff``,
  tested; DIPY has none): point distances from ``scipy.spatial.distance.cdist`` in blocks.
* **BUAN shape similarity** (Chandio 2020): ``dipy.segment.bundles.bundle_shape_similarity``
  (QuickBundlesX centroids, then bundle adjacency), seeded.
* **Density** maps: ``dipy.tracking.utils.density_map`` (streamlines per voxel), vertices
  outside the grid left out. **Dice** of the visited voxel sets; **weighted Dice** (Cousineau
  2017): ``(sum_{A∩B} d_A + sum_{A∩B} d_B) / (sum d_A + sum d_B)``; **overlap / overreach**
  (Tractometer, Côté 2013) relative to the target b: ``|A ∩ B| / |B|``, ``|A \\ B| / |B|``.
* **Lengths**: ``dipy.tracking.streamline.length``; their Wasserstein distance:
  ``scipy.stats.wasserstein_distance``.
* **Connectome correlation**: Pearson correlation of the upper triangles (diagonal included)
  of the two tck2connectome matrices (:mod:`invtract.evaluation.connectome`).

Pairing (``paired_*``): streamline i of a against streamline ``pairs[i]`` of b. With tckgen
``-output_seeds`` files the pairs are the streamlines grown from the same seed position (so
counts may differ); without them, index i against index i when the counts are equal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from ..arrays import to_numpy
from ..errors import ConfigError, InvtractError, ShapeError
from .tracks import as_packed

__all__ = [
    "EmptyTractogramError",
    "SpaceError",
    "as_lines",
    "resample_lines",
    "mdf_minima",
    "adjacency",
    "bundle_adjacency",
    "mam_minima",
    "hausdorff_distances",
    "paired_hausdorff",
    "paired_mam",
    "paired_mdf",
    "buan_shape_similarity",
    "density",
    "dice",
    "weighted_dice",
    "overlap_overreach",
    "connectome_correlation",
    "bounding_grid",
    "pair_by_seeds",
]


class EmptyTractogramError(InvtractError, ValueError):
    """A tractogram that must contain streamlines is empty."""


class SpaceError(InvtractError, ValueError):
    """Two tractograms (or a tractogram and a reference image) do not share a space."""


@contextmanager
def _mam_on_unequal_counts():
    """DIPY warns that MAM's inputs should be resampled; MAM is defined on any vertex counts."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Streamlines do not have the same number of points")
        yield


def as_lines(streamlines) -> list[np.ndarray]:
    """Streamlines (any form :func:`~invtract.evaluation.tracks.as_packed` takes) as a list of
    ``[L_i, 3]`` float64 arrays, the form DIPY's functions take."""
    tracks = as_packed(streamlines)
    points = np.asarray(tracks.points, dtype=np.float64)
    return np.split(points, np.cumsum(tracks.lengths)[:-1]) if len(tracks) else []


def resample_lines(lines: Sequence[np.ndarray], n_points: int | None) -> list[np.ndarray]:
    """Each streamline resampled to ``n_points`` equidistant points
    (``dipy.tracking.streamline.set_number_of_points``); ``None`` keeps the raw vertices."""
    if n_points is None:
        return list(lines)
    if n_points < 2:
        raise ConfigError(f"resampling needs at least 2 points, got {n_points}")
    from dipy.tracking.streamline import set_number_of_points

    return [np.asarray(s) for s in set_number_of_points(list(lines), nb_points=int(n_points))]


def _blocks(n: int, size: int):
    for s in range(0, n, max(1, size)):
        yield s, min(n, s + max(1, size))


def mdf_minima(
    ra: Sequence[np.ndarray], rb: Sequence[np.ndarray], *, block: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Each streamline's smallest MDF to the other set, both ways (mm).

    Args:
        ra: ``Sa`` streamlines resampled to a common number of points.
        rb: ``Sb`` streamlines with that number of points.
        block: streamlines of each set per ``bundles_distances_mdf`` call.

    Returns:
        ``(ab [Sa], ba [Sb])`` float64 minima.
    """
    from dipy.tracking.distances import bundles_distances_mdf

    ab = np.full(len(ra), np.inf)
    ba = np.full(len(rb), np.inf)
    for i0, i1 in _blocks(len(ra), block):
        for j0, j1 in _blocks(len(rb), block):
            d = bundles_distances_mdf(list(ra[i0:i1]), list(rb[j0:j1]))
            ab[i0:i1] = np.minimum(ab[i0:i1], d.min(axis=1))
            ba[j0:j1] = np.minimum(ba[j0:j1], d.min(axis=0))
    return ab, ba


def adjacency(ab: np.ndarray, ba: np.ndarray, threshold_mm: float) -> float:
    """Bundle adjacency from the nearest-MDF distances of both sets (:func:`mdf_minima`)."""
    return 0.5 * float((ab < threshold_mm).mean() + (ba < threshold_mm).mean())


def bundle_adjacency(a, b, threshold_mm: float = 5.0, n_points: int | None = 20) -> float:
    """Bundle adjacency of two sets, as ``dipy.segment.bundles.bundle_adjacency``.

    Args:
        a: streamlines (mm), resampled here to ``n_points`` (``None``: already resampled).
        b: streamlines (mm).
        threshold_mm: a streamline is adjacent if its nearest MDF is strictly below this.
        n_points: resampling points (DIPY expects both sets resampled beforehand).

    Returns:
        Score in ``[0, 1]``.
    """
    ra, rb = (resample_lines(as_lines(x), n_points) for x in (a, b))
    return adjacency(*mdf_minima(ra, rb), threshold_mm)


def mam_minima(
    queries: Sequence[np.ndarray], others: Sequence[np.ndarray], *, max_pairs: int = 1 << 18
) -> np.ndarray:
    """Each query streamline's smallest MAM (``metric="avg"``) to ``others`` (mm).

    ``dipy.tracking.distances.bundles_distances_mam`` on blocks of at most ``max_pairs``
    streamline pairs; points as given (raw vertices or resampled).

    Returns:
        ``[len(queries)]`` float64.
    """
    from dipy.tracking.distances import bundles_distances_mam

    out = np.full(len(queries), np.inf)
    per = max(1, max_pairs // max(1, len(others)))
    for i0, i1 in _blocks(len(queries), per):
        with _mam_on_unequal_counts():
            d = bundles_distances_mam(list(queries[i0:i1]), list(others), metric="avg")
        out[i0:i1] = d.min(axis=1)
    return out


def _packed_block(lines: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    points = np.concatenate([np.asarray(s, np.float64) for s in lines])
    starts = np.concatenate([[0], np.cumsum([len(s) for s in lines])[:-1]])
    return points, starts


def _group_blocks(lines: Sequence[np.ndarray], max_points: int):
    """Consecutive runs of streamlines holding at most ``max_points`` vertices (at least one)."""
    start, total = 0, 0
    for i, s in enumerate(lines):
        if total and total + len(s) > max_points:
            yield start, i
            start, total = i, 0
        total += len(s)
    if start < len(lines):
        yield start, len(lines)


def hausdorff_distances(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, max_points: int = 2048
) -> np.ndarray:
    """All-pairs symmetric Hausdorff distances between the vertices of two sets (mm).

    Point distances come from ``scipy.spatial.distance.cdist`` on blocks of at most
    ``max_points`` vertices per side; per-streamline minima and maxima from ``reduceat``.

    Returns:
        ``[Sa, Sb]`` float64.

    Raises:
        ShapeError: a streamline has no vertex.
    """
    from scipy.spatial.distance import cdist

    if any(len(s) == 0 for s in a) or any(len(s) == 0 for s in b):
        raise ShapeError("Hausdorff distance: every streamline needs at least one vertex")
    out = np.empty((len(a), len(b)))
    b_groups = [(j0, j1, *_packed_block(b[j0:j1])) for j0, j1 in _group_blocks(b, max_points)]
    for i0, i1 in _group_blocks(a, max_points):
        pa, sa = _packed_block(a[i0:i1])
        for j0, j1, pb, sb in b_groups:
            out[i0:i1, j0:j1] = _block_hausdorff(cdist(pa, pb), a[i0:i1], b[j0:j1], sa, sb)
    return out


def _block_hausdorff(d: np.ndarray, a, b, sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """``[na, nb]`` Hausdorff distances from the vertex distances ``d [pa, pb]`` of two blocks
    (``sa`` / ``sb``: first vertex of each streamline in the block)."""
    la, lb = {len(s) for s in a}, {len(s) for s in b}
    if len(la) == 1 and len(lb) == 1:  # equal vertex counts (resampled): plain reshapes
        d4 = d.reshape(len(a), la.pop(), len(b), lb.pop())
        return np.maximum(d4.min(axis=3).max(axis=1), d4.min(axis=1).max(axis=2))
    to_b = np.minimum.reduceat(d, sb, axis=1)  # [pa, nb]: a vertex -> nearest of b_j
    to_a = np.minimum.reduceat(d, sa, axis=0)  # [na, pb]: b vertex -> nearest of a_i
    h_ab = np.maximum.reduceat(to_b, sa, axis=0)  # [na, nb]
    h_ba = np.maximum.reduceat(to_a, sb, axis=1)  # [na, nb]
    return np.maximum(h_ab, h_ba)


def paired_hausdorff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """Symmetric Hausdorff distance of ``a[i]`` and ``b[i]`` on their vertices
    (``scipy.spatial.distance.directed_hausdorff`` both ways); ``[S]`` mm."""
    from scipy.spatial.distance import directed_hausdorff

    _check_paired(a, b)
    if any(len(s) == 0 for s in a) or any(len(s) == 0 for s in b):
        raise ShapeError("Hausdorff distance: every streamline needs at least one vertex")
    return np.array(
        [max(directed_hausdorff(x, y)[0], directed_hausdorff(y, x)[0]) for x, y in zip(a, b)]
    )


def paired_mam(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """MAM (``bundles_distances_mam``, ``avg``) of ``a[i]`` and ``b[i]``; ``[S]`` mm."""
    from dipy.tracking.distances import bundles_distances_mam

    _check_paired(a, b)
    with _mam_on_unequal_counts():
        return np.array(
            [bundles_distances_mam([x], [y], metric="avg")[0, 0] for x, y in zip(a, b)]
        )


def paired_mdf(ra: Sequence[np.ndarray], rb: Sequence[np.ndarray]) -> np.ndarray:
    """MDF (``bundles_distances_mdf``) of resampled ``ra[i]`` and ``rb[i]``; ``[S]`` mm."""
    from dipy.tracking.distances import bundles_distances_mdf

    _check_paired(ra, rb)
    return np.array([bundles_distances_mdf([x], [y])[0, 0] for x, y in zip(ra, rb)])


def _check_paired(a, b) -> None:
    if len(a) != len(b):
        raise ShapeError(f"paired metrics need equal counts, got {len(a)} and {len(b)}")


def buan_shape_similarity(
    a,
    b,
    *,
    seed: int = 0,
    clust_thr: tuple[float, ...] = (5.0, 3.0, 1.5),
    threshold_mm: float = 6.0,
) -> float:
    """BUAN bundle shape similarity (``dipy.segment.bundles.bundle_shape_similarity``).

    Args:
        a, b: streamlines (mm).
        seed: seed of the ``numpy.random.Generator`` QuickBundlesX uses to order streamlines.
        clust_thr: QuickBundlesX thresholds (mm), DIPY's default.
        threshold_mm: bundle-adjacency threshold between centroids (DIPY's default 6 mm).

    Returns:
        Similarity in ``[0, 1]`` (1 = same shape).
    """
    from dipy.segment.bundles import bundle_shape_similarity

    rng = np.random.default_rng(seed)
    value = bundle_shape_similarity(
        as_lines(a), as_lines(b), rng, clust_thr=clust_thr, threshold=threshold_mm
    )
    return float(value)


def density(lines: Sequence[np.ndarray], shape, affine: np.ndarray) -> np.ndarray:
    """Streamlines per voxel (``dipy.tracking.utils.density_map``); vertices outside dropped.

    Args:
        lines: streamlines (scanner mm).
        shape: grid ``(X, Y, Z)``.
        affine: ``[4, 4]`` voxel -> scanner mm (voxel centres at integers).

    Returns:
        ``[X, Y, Z]`` int counts.
    """
    from dipy.tracking.utils import density_map

    inv = np.linalg.inv(np.asarray(affine, np.float64))
    lin_t, offset = inv[:3, :3].T.copy(), inv[:3, 3] + 0.5  # DIPY's own voxel mapping
    kept = []
    for s in lines:
        ijk = np.dot(np.asarray(s), lin_t)
        ijk += offset
        inside = np.all((ijk.round(decimals=6) >= 0) & (ijk.astype(np.intp) < shape), axis=1)
        if inside.any():
            kept.append(np.asarray(s)[inside])
    return density_map(kept, np.asarray(affine, np.float64), tuple(int(n) for n in shape))


def dice(mask_a, mask_b) -> float:
    """Dice ``2 |A ∩ B| / (|A| + |B|)`` of two voxel sets (non-zero = in the set); NaN if both
    are empty."""
    a, b = to_numpy(mask_a) != 0, to_numpy(mask_b) != 0
    den = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / den if den else math.nan


def weighted_dice(density_a, density_b) -> float:
    """Weighted Dice (Cousineau 2017): density mass in the common voxels over total mass."""
    da, db = to_numpy(density_a).astype(np.float64), to_numpy(density_b).astype(np.float64)
    both = (da != 0) & (db != 0)
    den = float(da.sum() + db.sum())
    return float(da[both].sum() + db[both].sum()) / den if den else math.nan


def overlap_overreach(candidate, target) -> tuple[float, float]:
    """Tractometer ``(|C ∩ T| / |T|, |C \\ T| / |T|)`` of voxel sets; NaN if the target is
    empty."""
    c, t = to_numpy(candidate) != 0, to_numpy(target) != 0
    nt = int(t.sum())
    if nt == 0:
        return math.nan, math.nan
    return int((c & t).sum()) / nt, int((c & ~t).sum()) / nt


def connectome_correlation(conn_a, conn_b) -> float:
    """Pearson correlation of the upper triangles (diagonal included) of two ``[L, L]``
    matrices; NaN if either triangle is constant."""
    a = np.asarray(to_numpy(conn_a), np.float64)
    b = np.asarray(to_numpy(conn_b), np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ShapeError(f"connectomes must be equal square matrices, got {a.shape}, {b.shape}")
    iu = np.triu_indices(a.shape[0])
    x, y = a[iu], b[iu]
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def bounding_grid(
    *sets, voxel_size_mm: float = 1.0, margin_vox: int = 1
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned isotropic grid covering every vertex of the given sets.

    Returns:
        ``(shape, affine)``: grid size and ``[4, 4]`` voxel -> scanner mm (voxel centres at
        ``lo + voxel_size_mm * ijk``).
    """
    pts = np.concatenate([np.asarray(as_packed(s).points, np.float64) for s in sets])
    if pts.shape[0] == 0:
        raise EmptyTractogramError("cannot build a grid around empty tractograms")
    vs = float(voxel_size_mm)
    lo = pts.min(0) - margin_vox * vs
    hi = pts.max(0) + margin_vox * vs
    shape = tuple(int(x) for x in np.floor((hi - lo) / vs + 0.5).astype(int) + 1)
    affine = np.diag([vs, vs, vs, 1.0])
    affine[:3, 3] = lo
    return shape, affine


def pair_by_seeds(
    seeds_a: np.ndarray, seeds_b: np.ndarray, *, tolerance_mm: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Streamlines of a and b grown from the same seed position.

    Args:
        seeds_a: ``[Sa, 3]`` seed of each streamline of a (row i = streamline i), mm.
        seeds_b: ``[Sb, 3]`` seed of each streamline of b, mm.
        tolerance_mm: positions equal after rounding to this grid are the same seed.

    Returns:
        ``(ia, ib)`` int64 indices of the pairs, in a's order; a seed used by several
        streamlines pairs its first streamline on each side.
    """
    key_a = np.round(np.asarray(seeds_a, np.float64) / tolerance_mm).astype(np.int64)
    key_b = np.round(np.asarray(seeds_b, np.float64) / tolerance_mm).astype(np.int64)
    first_b: dict[tuple, int] = {}
    for j, k in enumerate(map(tuple, key_b)):
        first_b.setdefault(k, j)
    seen: set[tuple] = set()
    ia, ib = [], []
    for i, k in enumerate(map(tuple, key_a)):
        if k in first_b and k not in seen:
            seen.add(k)
            ia.append(i)
            ib.append(first_b[k])
    return np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
