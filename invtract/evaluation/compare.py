"""Every metric between a candidate and a target tractogram: :func:`compare_tractograms`.

The metrics themselves (DIPY / scipy calls) are in :mod:`invtract.evaluation.metrics`; this
module chooses the density grid, the samples and the pairs, and lays out the JSON-ready result
whose keys ``invtract compare --json`` writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import (
    EmptyTractogramError,
    SpaceError,
    adjacency,
    as_lines,
    bounding_grid,
    buan_shape_similarity,
    connectome_correlation,
    density,
    dice,
    hausdorff_distances,
    mam_minima,
    mdf_minima,
    overlap_overreach,
    pair_by_seeds,
    paired_hausdorff,
    paired_mam,
    paired_mdf,
    resample_lines,
    weighted_dice,
)
from .tracks import as_packed

__all__ = ["compare_tractograms", "METHODS"]

#: how each group of metrics is computed (written to the JSON under "methods")
METHODS = {
    "mdf": "dipy.tracking.distances.bundles_distances_mdf on n_points resampled points",
    "bundle_adjacency": "dipy.segment.bundles.bundle_adjacency definition, MDF < threshold",
    "mam": "dipy.tracking.distances.bundles_distances_mam (avg); bundle-level on `resample` "
    "points per streamline (null = raw vertices), paired on the raw vertices",
    "hausdorff": "symmetric Hausdorff (scipy cdist); bundle-level on `resample` points, "
    "paired on the raw vertices",
    "buan_shape_similarity": "dipy.segment.bundles.bundle_shape_similarity",
    "density": "dipy.tracking.utils.density_map (streamlines per voxel)",
    "lengths": "dipy.tracking.streamline.length; scipy.stats.wasserstein_distance",
}


def _median(x) -> float:
    return float(np.median(np.asarray(x, np.float64)))


def _summary(prefix: str, x, within=()) -> dict[str, float | None]:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        keys = [f"{prefix}_{s}_mm" for s in ("mean", "median", "max")]
        keys += [f"{prefix}_frac_within_{w:g}mm" for w in within]
        return dict.fromkeys(keys)
    out = {
        f"{prefix}_mean_mm": float(x.mean()),
        f"{prefix}_median_mm": _median(x),
        f"{prefix}_max_mm": float(x.max()),
    }
    for w in within:
        out[f"{prefix}_frac_within_{w:g}mm"] = float((x <= w).mean())
    return out


def _unit(key: str) -> str:
    if key.endswith("_mm"):
        return "mm"
    if key.startswith("count") or key == "paired_count":
        return "streamlines"
    if key.startswith("voxels"):
        return "voxels"
    if "frac_within" in key:
        return "fraction"
    return "ratio"


def _load_image(img):
    if img is None or hasattr(img, "affine"):
        return img
    from ..io.image import load_image

    return load_image(Path(img))


def _check_inputs(a, b, names) -> None:
    for s, name in zip((a, b), names):
        if len(s) == 0:
            raise EmptyTractogramError(f"tractogram {name} is empty (0 streamlines)")
        if not np.isfinite(s.points).all():
            raise SpaceError(f"tractogram {name} has non-finite coordinates")
    lo_a, hi_a = a.points.min(0), a.points.max(0)
    lo_b, hi_b = b.points.min(0), b.points.max(0)
    margin = 2.0  # mm: tolerate bundles that touch without sharing a vertex
    if ((lo_a > hi_b + margin) | (lo_b > hi_a + margin)).any():

        def fmt(lo, hi) -> str:
            return "[" + ", ".join(f"{float(x):.1f}..{float(y):.1f}" for x, y in zip(lo, hi)) + "]"

        raise SpaceError(
            f"{names[0]} and {names[1]} do not overlap at all ({names[0]} spans "
            f"{fmt(lo_a, hi_a)} mm, {names[1]} spans {fmt(lo_b, hi_b)} mm); "
            "are they in the same space?"
        )


def _outside(points: np.ndarray, shape, affine: np.ndarray) -> int:
    """Vertices that fall outside the grid (same voxel mapping as DIPY's density_map)."""
    inv = np.linalg.inv(affine)
    ijk = np.dot(points, inv[:3, :3].T.copy()) + (inv[:3, 3] + 0.5)
    inside = np.all((ijk.round(decimals=6) >= 0) & (ijk.astype(np.intp) < shape), axis=1)
    return int((~inside).sum())


def _grid(a, b, reference, names, max_outside_fraction) -> tuple[tuple, np.ndarray, dict]:
    ref = _load_image(reference)
    if ref is None:
        shape, affine = bounding_grid(a, b, voxel_size_mm=1.0, margin_vox=1)
        grid = {"source": "1 mm isotropic bounding box of both tractograms (no --reference)"}
    else:
        shape = tuple(int(s) for s in np.asarray(ref.data).shape[:3])
        affine = np.asarray(ref.affine, np.float64)
        path = getattr(ref, "path", None)
        grid = {"source": "reference image", "path": None if path is None else str(path)}
        for s, name in zip((a, b), names):
            n = _outside(np.asarray(s.points, np.float64), shape, affine)
            if n > max_outside_fraction * s.points.shape[0]:
                raise SpaceError(
                    f"the reference grid {shape} does not cover {name}: {n} of "
                    f"{s.points.shape[0]} vertices ({100 * n / s.points.shape[0]:.1f}%) "
                    "lie outside it"
                )
    grid.update(
        shape=list(shape),
        voxel_size_mm=[float(x) for x in np.linalg.norm(affine[:3, :3], axis=0)],
        affine=affine.tolist(),
    )
    return shape, affine, grid


def _density_metrics(la, lb, shape, affine) -> dict:
    dens_a, dens_b = density(la, shape, affine), density(lb, shape, affine)
    ol, orr = overlap_overreach(dens_a, dens_b)
    x, y = dens_a.ravel().astype(np.float64), dens_b.ravel().astype(np.float64)
    corr = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0
    return {
        "dice": dice(dens_a, dens_b),
        "weighted_dice": weighted_dice(dens_a, dens_b),
        "density_correlation": corr,
        "overlap": ol,
        "overreach": orr,
        "voxels_a": int((dens_a > 0).sum()),
        "voxels_b": int((dens_b > 0).sum()),
    }


def _sample(n: int, k: int, rng) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(rng.permutation(n)[:k])


def _bundle_metrics(ra, rb, pa, pb, thr, sample, seed, notes) -> dict:
    """Nearest-neighbour distances both ways: MDF on ``ra/rb``, MAM/Hausdorff on ``pa/pb``."""
    mdf_ab, mdf_ba = mdf_minima(ra, rb)
    res = {"bundle_adjacency": adjacency(mdf_ab, mdf_ba, thr)}
    rng = np.random.default_rng(seed)
    ia, ib = _sample(len(pa), sample, rng), _sample(len(pb), sample, rng)
    if len(ia) < len(pa) or len(ib) < len(pb):
        notes.append(
            f"bundle-level MAM/Hausdorff use a random sample of {len(ia)}/{len(pa)} and "
            f"{len(ib)}/{len(pb)} query streamlines (seed {seed})"
        )
    qa, qb = [pa[i] for i in ia], [pb[i] for i in ib]
    per_metric = {
        "mdf": (mdf_ab, mdf_ba),
        "mam": (mam_minima(qa, pb), mam_minima(qb, pa)),
        "hausdorff": (hausdorff_distances(qa, pb).min(1), hausdorff_distances(qb, pa).min(1)),
    }
    for k, (x_ab, x_ba) in per_metric.items():
        res[f"bundle_{k}_mean_mm"] = float(np.concatenate([x_ab, x_ba]).mean())
        res[f"bundle_{k}_a_to_b_mean_mm"] = float(x_ab.mean())
        res[f"bundle_{k}_a_to_b_median_mm"] = _median(x_ab)
        res[f"bundle_{k}_b_to_a_mean_mm"] = float(x_ba.mean())
        res[f"bundle_{k}_b_to_a_median_mm"] = _median(x_ba)
    return res


def _pairs(count_a: int, count_b: int, seeds, notes) -> tuple[np.ndarray, np.ndarray, str | None]:
    if seeds is not None and seeds[0] is not None and seeds[1] is not None:
        sa, sb = (np.asarray(s, np.float64).reshape(-1, 3) for s in seeds)
        for s, n, side in ((sa, count_a, "A"), (sb, count_b, "B")):
            if s.shape[0] != n:
                raise SpaceError(f"seeds of {side}: {s.shape[0]} seeds for {n} streamlines")
        ia, ib = pair_by_seeds(sa, sb)
        notes.append(
            f"paired metrics: {len(ia)} streamline pairs grown from the same seed "
            f"({count_a - len(ia)} of A and {count_b - len(ib)} of B unpaired)"
        )
        return ia, ib, "seeds"
    if count_a == count_b:
        notes.append("paired metrics: streamline i of A vs i of B (no seed files given)")
        return np.arange(count_a), np.arange(count_b), "index"
    notes.append("paired metrics need equal counts or seed files (--seeds-a/--seeds-b): null")
    return np.zeros(0, np.int64), np.zeros(0, np.int64), None


def _paired_metrics(la, lb, ra, rb, pairs, within) -> dict:
    """Hausdorff and MAM of the pairs on their raw vertices, MDF on ``ra/rb``."""
    ia, ib, how = pairs
    res: dict = {"pairing": how, "paired_count": int(len(ia)) if how else None}
    if how is None:
        for name in ("paired_hausdorff", "paired_mdf", "paired_mam"):
            res.update(_summary(name, [], within))
        return res
    sel = {k: [x[i] for i in idx] for k, x, idx in
           (("pa", la, ia), ("pb", lb, ib), ("ra", ra, ia), ("rb", rb, ib))}  # fmt: skip
    res.update(_summary("paired_hausdorff", paired_hausdorff(sel["pa"], sel["pb"]), within))
    res.update(_summary("paired_mdf", paired_mdf(sel["ra"], sel["rb"]), within))
    res.update(_summary("paired_mam", paired_mam(sel["pa"], sel["pb"]), within))
    return res


def _lengths(la, lb) -> dict:
    from dipy.tracking.streamline import length
    from scipy.stats import wasserstein_distance

    len_a, len_b = np.asarray(length(la), np.float64), np.asarray(length(lb), np.float64)
    return {
        "length_mean_a_mm": float(len_a.mean()),
        "length_median_a_mm": _median(len_a),
        "length_mean_b_mm": float(len_b.mean()),
        "length_median_b_mm": _median(len_b),
        "length_wasserstein_mm": float(wasserstein_distance(len_a, len_b)),
    }


def compare_tractograms(
    a,
    b,
    reference=None,
    parcellation=None,
    *,
    n_points: int = 20,
    resample: int | None = 20,
    ba_threshold_mm: float = 5.0,
    within_mm: tuple[float, ...] = (0.1, 0.5, 1.0),
    bundle_sample: int = 1000,
    max_outside_fraction: float = 0.05,
    seeds=None,
    buan: bool = True,
    buan_threshold_mm: float = 6.0,
    names: tuple[str, str] = ("A", "B"),
    seed: int = 0,
) -> dict:
    """Every evaluation metric between a candidate ``a`` and a target ``b``.

    Args:
        a: candidate tractogram (scanner mm): Streamlines, Packed or a list of arrays.
        b: target tractogram (mm); overlap/overreach are relative to it.
        reference: optional image (or path) whose grid is used for the density metrics;
            otherwise a 1 mm isotropic grid around both tractograms.
        parcellation: optional label image (or path) for the connectome correlation.
        n_points: resampling points for MDF and bundle adjacency (DIPY needs equal counts).
        resample: points per streamline for the bundle-level (all-pairs) MAM and Hausdorff;
            ``None`` = raw vertices. Paired MAM and Hausdorff always use the raw vertices.
        ba_threshold_mm: bundle-adjacency threshold (mm).
        within_mm: thresholds (mm) for the paired "fraction within" statistics.
        bundle_sample: at most this many query streamlines per set (seeded random sample)
            for the bundle-level MAM/Hausdorff minima; MDF minima use every streamline.
        max_outside_fraction: a reference grid that leaves more than this fraction of either
            tractogram's vertices outside raises :class:`SpaceError` (vertices outside, e.g.
            MRtrix's exit points, are dropped from the density maps).
        seeds: optional ``(seeds_a [Sa, 3], seeds_b [Sb, 3])`` seed position of each
            streamline (tckgen ``-output_seeds``): paired metrics then compare the
            streamlines grown from the same seed, whatever the counts.
        buan: compute the BUAN shape similarity (QuickBundlesX; seconds on whole brains).
        buan_threshold_mm: BUAN bundle-adjacency threshold (DIPY's default 6 mm).
        names: display names of ``a`` and ``b`` for messages.
        seed: seed of the bundle-level sample and of BUAN's clustering.

    Returns:
        A JSON-serialisable dict: counts, lengths, density metrics, ``bundle_*`` and
        ``paired_*`` distances (``_mm`` keys in millimetres), ``bundle_adjacency``,
        ``buan_shape_similarity``, ``connectome_correlation``, ``units`` (metric -> unit),
        ``methods``, ``reference_grid``, the settings (``n_points``, ``resample``, ...) and
        ``notes``. Paired metrics are ``None`` when no pairing applies.

    Raises:
        EmptyTractogramError: either tractogram is empty.
        SpaceError: the tractograms do not overlap, ``reference`` does not cover them, or a
            seed array does not match its tractogram.
    """
    a, b = as_packed(a), as_packed(b)
    _check_inputs(a, b, names)
    la, lb = as_lines(a), as_lines(b)
    res: dict = {"count_a": len(la), "count_b": len(lb)}
    notes: list[str] = []
    res.update(_lengths(la, lb))
    shape, affine, grid = _grid(a, b, reference, names, max_outside_fraction)
    res["reference_grid"] = grid
    res["vertices_outside_grid_a"] = _outside(np.asarray(a.points, np.float64), shape, affine)
    res["vertices_outside_grid_b"] = _outside(np.asarray(b.points, np.float64), shape, affine)
    res.update(_density_metrics(la, lb, shape, affine))
    ra, rb = resample_lines(la, n_points), resample_lines(lb, n_points)
    pa, pb = (ra, rb) if resample == n_points else (resample_lines(la, resample),
                                                     resample_lines(lb, resample))  # fmt: skip
    thr = float(ba_threshold_mm)
    res.update(_bundle_metrics(ra, rb, pa, pb, thr, bundle_sample, seed, notes))
    pairs = _pairs(len(la), len(lb), seeds, notes)
    res.update(_paired_metrics(la, lb, ra, rb, pairs, within_mm))
    res["buan_shape_similarity"] = (
        buan_shape_similarity(la, lb, seed=seed, threshold_mm=buan_threshold_mm) if buan else None
    )
    res["connectome_correlation"] = None
    if parcellation is not None:
        from .connectome import connectome_matrix

        labels = _load_image(parcellation)
        ca, cb = connectome_matrix(a, labels, 4.0), connectome_matrix(b, labels, 4.0)
        res["connectome_correlation"] = connectome_correlation(ca, cb)
    res.update(
        n_points=int(n_points),
        resample=None if resample is None else int(resample),
        ba_threshold_mm=thr,
        buan_threshold_mm=float(buan_threshold_mm),
    )
    for k, v in res.items():
        if isinstance(v, float) and not math.isfinite(v):
            res[k] = None  # JSON has no NaN
    res["units"] = {k: _unit(k) for k in res if _is_metric(k)}
    res["methods"] = dict(METHODS)
    res["notes"] = notes
    return res


_NOT_METRICS = {
    "reference_grid",
    "units",
    "notes",
    "methods",
    "n_points",
    "resample",
    "ba_threshold_mm",
    "buan_threshold_mm",
    "pairing",
}


def _is_metric(key: str) -> bool:
    return key not in _NOT_METRICS and not key.startswith("vertices_outside")
