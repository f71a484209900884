"""Evaluation metrics between two tractograms (no gradients), and :func:`compare_tractograms`.

Every metric is written once: the distance kernels come from :mod:`.distances`, density maps
from :mod:`.density`, lengths from :mod:`.lengths`. Definitions:

* **Hausdorff** (symmetric, polyline vertices): ``max(h(a, b), h(b, a))`` with
  ``h(a, b) = max_i min_j |a_i - b_j|``, as ``scipy.spatial.distance.directed_hausdorff``.
* **MDF**: minimum average direct-flip distance after resampling to ``n_points``
  (``dipy.tracking.distances.bundles_distances_mdf``).
* **MAM** (mean of closest distances, ``metric="avg"``):
  ``(mean_i min_j |a_i - b_j| + mean_j min_i |a_i - b_j|) / 2``
  (``dipy.tracking.distances.bundles_distances_mam``).
* **Bundle adjacency** (Garyfallidis 2012, ``dipy.segment.bundles.bundle_adjacency``): the
  mean of the fractions of each set whose nearest MDF neighbour in the other set is closer
  than the threshold.
* **Dice** of the voxel sets visited by each tractogram (``density_map > 0``) and
  **weighted Dice** (Cousineau et al. 2017, scilpy ``compute_dice_voxel``):
  ``(sum_{A∩B} d_A + sum_{A∩B} d_B) / (sum d_A + sum d_B)`` with streamline-count densities.
* **Overlap / overreach** (Tractometer, Côté et al. 2013), with ``b`` the target (ground
  truth) and ``a`` the candidate, on voxel sets: ``OL = |A ∩ B| / |B|`` and
  ``OR = |A \\ B| / |B|`` (overreach is relative to the target size, so it can exceed 1).
* **Connectome correlation**: Pearson correlation of the upper triangles (diagonal included)
  of the two connectivity matrices.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InvtractError, InvtractWarning, ShapeError
from ..streamlines import Streamlines
from .density import density_correlation, density_map, world_to_voxel
from .distances import _mean_dist
from .lengths import arc_lengths, wasserstein_1d
from .resample import resample

__all__ = [
    "EmptyTractogramError",
    "SpaceError",
    "paired_hausdorff",
    "mam_distances",
    "bundle_minima",
    "bundle_adjacency",
    "dice",
    "weighted_dice",
    "overlap_overreach",
    "connectome_correlation",
    "bounding_grid",
    "compare_tractograms",
]

log = logging.getLogger(__name__)


class EmptyTractogramError(InvtractError, ValueError):
    """A tractogram that must contain streamlines is empty."""


class SpaceError(InvtractError, ValueError):
    """Two tractograms (or a tractogram and a reference image) do not share a space."""


def _dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _chunks_by_budget(n: int, per_item: int, max_elements: int):
    step = max(1, int(max_elements) // max(1, per_item))
    for s in range(0, n, step):
        yield s, min(n, s + step)


@torch.no_grad()
def paired_hausdorff(
    a: Streamlines, b: Streamlines, *, max_elements: int = 1 << 24
) -> torch.Tensor:
    """Exact symmetric Hausdorff distance between streamline ``i`` of ``a`` and ``i`` of ``b``.

    Works on the raw vertices (no resampling), so the two may have different step sizes and
    vertex counts. Computed in float64 in chunks of at most ``max_elements`` point pairs.

    Args:
        a: ``S`` streamlines (mm).
        b: ``S`` streamlines (mm), paired by index with ``a``.
        max_elements: largest ``chunk * La * Lb`` distance block held at once.

    Returns:
        ``[S]`` float64 distances in mm, on the device of ``a``.

    Shape:
        ``(S,)``.

    Gradients:
        None (evaluation metric).

    Raises:
        ShapeError: ``a`` and ``b`` differ in count or a streamline has no vertex.
    """
    if len(a) != len(b):
        raise ShapeError(f"paired_hausdorff needs equal counts, got {len(a)} and {len(b)}")
    if len(a) == 0:
        return torch.zeros(0, dtype=torch.float64, device=a.device)
    if int(a.lengths.min()) < 1 or int(b.lengths.min()) < 1:
        raise ShapeError("paired_hausdorff: every streamline needs at least one vertex")
    a, b = a.to(dtype=torch.float64), b.to(device=a.device, dtype=torch.float64)
    la, lb = int(a.lengths.max()), int(b.lengths.max())
    out = torch.empty(len(a), dtype=torch.float64, device=a.device)
    for s, e in _chunks_by_budget(len(a), la * lb, max_elements):
        idx = torch.arange(s, e, device=a.device)
        pa, ma = a.select(idx).to_padded()
        pb, mb = b.select(idx).to_padded()
        d = _dist(pa, pb)  # [c, La, Lb]
        d_ab = d.masked_fill(~mb[:, None, :], math.inf).min(2).values  # [c, La]
        d_ba = d.masked_fill(~ma[:, :, None], math.inf).min(1).values  # [c, Lb]
        h_ab = d_ab.masked_fill(~ma, -math.inf).max(1).values
        h_ba = d_ba.masked_fill(~mb, -math.inf).max(1).values
        out[s:e] = torch.maximum(h_ab, h_ba)
    return out


@torch.no_grad()
def mam_distances(
    a: Streamlines, b: Streamlines, *, metric: str = "avg", max_elements: int = 1 << 24
) -> torch.Tensor:
    """All-pairs MAM distances on the raw vertices (``bundles_distances_mam``).

    Args:
        a: ``Sa`` streamlines (mm).
        b: ``Sb`` streamlines (mm).
        metric: ``"avg"``, ``"min"`` or ``"max"`` of the two directed mean closest distances.
        max_elements: largest block of point pairs held at once.

    Returns:
        ``[Sa, Sb]`` float64 distances in mm.

    Shape:
        ``(Sa, Sb)``.

    Gradients:
        None (evaluation metric).
    """
    if metric not in ("avg", "min", "max"):
        raise ConfigError(f"metric must be 'avg', 'min' or 'max', got {metric!r}")
    a, b = a.to(dtype=torch.float64), b.to(device=a.device, dtype=torch.float64)
    out = torch.empty((len(a), len(b)), dtype=torch.float64, device=a.device)
    if len(a) == 0 or len(b) == 0:
        return out
    pb, mb = b.to_padded()
    nb = b.lengths.to(torch.float64)
    la, lb = int(a.lengths.max()), pb.shape[1]
    for s, e in _chunks_by_budget(len(a), la * lb * len(b), max_elements):
        sa = a.select(torch.arange(s, e, device=a.device))
        pa, ma = sa.to_padded()
        d = _dist(pa[:, None], pb[None])  # [I, J, La, Lb]
        d_ab = d.masked_fill(~mb[None, :, None, :], math.inf).min(3).values  # [I, J, La]
        d_ba = d.masked_fill(~ma[:, None, :, None], math.inf).min(2).values  # [I, J, Lb]
        m_ab = (d_ab * ma[:, None, :]).sum(2) / sa.lengths.to(torch.float64)[:, None]
        m_ba = (d_ba * mb[None]).sum(2) / nb[None]
        if metric == "avg":
            out[s:e] = 0.5 * (m_ab + m_ba)
        elif metric == "min":
            out[s:e] = torch.minimum(m_ab, m_ba)
        else:
            out[s:e] = torch.maximum(m_ab, m_ba)
    return out


@torch.no_grad()
def bundle_minima(
    ra: torch.Tensor,
    rb: torch.Tensor,
    *,
    point_metrics: bool = False,
    chunk_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Each streamline's nearest distance to the other set, both directions, in one pass.

    Args:
        ra: ``[Sa, n, 3]`` resampled streamlines (mm).
        rb: ``[Sb, n, 3]`` resampled streamlines (mm).
        point_metrics: also compute MAM and Hausdorff minima on the resampled points (costs
            ``n**2`` instead of ``2 n`` per pair).
        chunk_size: streamlines per block (MDF); blocks of ``chunk_size / 4`` for point metrics.

    Returns:
        ``{"mdf_ab": [Sa], "mdf_ba": [Sb]}`` plus ``"mam_ab"``, ``"mam_ba"``,
        ``"hausdorff_ab"``, ``"hausdorff_ba"`` when ``point_metrics``; mm.

    Shape:
        ``(Sa, n, 3)``, ``(Sb, n, 3)`` -> ``(Sa,)`` and ``(Sb,)`` entries.

    Gradients:
        None (evaluation metric; see :func:`~invtract.losses.distances.min_mdf` for losses).
    """
    if ra.shape[0] == 0 or rb.shape[0] == 0:
        raise ShapeError("bundle_minima needs two non-empty sets")
    inf = math.inf
    names = ["mdf"] + (["mam", "hausdorff"] if point_metrics else [])
    out = {f"{k}_ab": ra.new_full((ra.shape[0],), inf) for k in names}
    out.update({f"{k}_ba": rb.new_full((rb.shape[0],), inf) for k in names})
    c = max(1, int(chunk_size))
    for i in range(0, ra.shape[0], c):
        ai = ra[i : i + c]
        for j in range(0, rb.shape[0], c):
            bj = rb[j : j + c]
            m = torch.minimum(_mean_dist(ai, bj), _mean_dist(ai, bj.flip(1)))  # [I, J]
            out["mdf_ab"][i : i + c] = torch.minimum(out["mdf_ab"][i : i + c], m.min(1).values)
            out["mdf_ba"][j : j + c] = torch.minimum(out["mdf_ba"][j : j + c], m.min(0).values)
    if point_metrics:
        cp = max(1, c // 4)
        for i in range(0, ra.shape[0], cp):
            ai = ra[i : i + cp]
            for j in range(0, rb.shape[0], cp):
                d = _dist(ai[:, None], rb[j : j + cp][None])  # [I, J, n, n]
                d_ab, d_ba = d.min(3).values, d.min(2).values  # [I, J, n]
                mam = 0.5 * (d_ab.mean(2) + d_ba.mean(2))
                haus = torch.maximum(d_ab.max(2).values, d_ba.max(2).values)
                for k, v in (("mam", mam), ("hausdorff", haus)):
                    sa, sb = out[f"{k}_ab"][i : i + cp], out[f"{k}_ba"][j : j + cp]
                    out[f"{k}_ab"][i : i + cp] = torch.minimum(sa, v.min(1).values)
                    out[f"{k}_ba"][j : j + cp] = torch.minimum(sb, v.min(0).values)
    return out


def bundle_adjacency(
    a: Streamlines | torch.Tensor,
    b: Streamlines | torch.Tensor,
    threshold_mm: float = 5.0,
    n_points: int = 20,
    *,
    chunk_size: int = 256,
) -> float:
    """Bundle adjacency (``dipy.segment.bundles.bundle_adjacency``) of two sets.

    Args:
        a: streamlines or resampled ``[Sa, n, 3]`` (mm).
        b: streamlines or resampled ``[Sb, n, 3]`` (mm).
        threshold_mm: MDF threshold (mm); a streamline is adjacent if strictly closer.
        n_points: resampling points (dipy convention: both sets resampled beforehand).
        chunk_size: streamlines per block.

    Returns:
        Score in ``[0, 1]``.

    Gradients:
        None (evaluation metric).
    """
    ra = resample(a, n_points) if isinstance(a, Streamlines) else a
    rb = resample(b, n_points) if isinstance(b, Streamlines) else b
    m = bundle_minima(ra.detach(), rb.detach(), chunk_size=chunk_size)
    thr = float(threshold_mm)
    return 0.5 * float((m["mdf_ab"] < thr).double().mean() + (m["mdf_ba"] < thr).double().mean())


def dice(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """Dice coefficient ``2 |A ∩ B| / (|A| + |B|)`` of two voxel sets (non-zero = in the set).

    Args:
        mask_a: ``[X, Y, Z]`` map (bool or density).
        mask_b: ``[X, Y, Z]`` map on the same grid.

    Returns:
        Dice in ``[0, 1]`` (NaN if both sets are empty).

    Gradients:
        None; see :func:`~invtract.losses.density.soft_dice` for the differentiable version.
    """
    a, b = mask_a != 0, mask_b != 0
    den = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / den if den else math.nan


def weighted_dice(density_a: torch.Tensor, density_b: torch.Tensor) -> float:
    """Weighted Dice (Cousineau 2017): density mass in the common voxels over total mass.

    Args:
        density_a: ``[X, Y, Z]`` non-negative density.
        density_b: ``[X, Y, Z]`` non-negative density on the same grid.

    Returns:
        Value in ``[0, 1]`` (NaN if both maps are zero).

    Gradients:
        None (evaluation metric).
    """
    da, db = density_a.double(), density_b.double()
    both = (da != 0) & (db != 0)
    den = float(da.sum() + db.sum())
    return float(da[both].sum() + db[both].sum()) / den if den else math.nan


def overlap_overreach(candidate: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Tractometer overlap and overreach of a candidate voxel set w.r.t. a target set.

    ``OL = |C ∩ T| / |T|`` (fraction of target voxels reached) and
    ``OR = |C \\ T| / |T|`` (candidate voxels outside the target, relative to the target size).

    Args:
        candidate: ``[X, Y, Z]`` map, non-zero = visited by the candidate.
        target: ``[X, Y, Z]`` map, non-zero = in the target (ground truth).

    Returns:
        ``(overlap, overreach)`` (NaN if the target is empty).

    Gradients:
        None (evaluation metric).
    """
    c, t = candidate != 0, target != 0
    nt = int(t.sum())
    if nt == 0:
        return math.nan, math.nan
    return int((c & t).sum()) / nt, int((c & ~t).sum()) / nt


def connectome_correlation(conn_a, conn_b) -> float:
    """Pearson correlation of the upper triangles (diagonal included) of two ``[L, L]`` matrices.

    Args:
        conn_a: ``[L, L]`` connectivity matrix (array or tensor).
        conn_b: ``[L, L]`` matrix with the same labels.

    Returns:
        Correlation in ``[-1, 1]`` (NaN if either triangle is constant).

    Gradients:
        None (evaluation metric).
    """
    a = np.asarray(conn_a.detach().cpu() if torch.is_tensor(conn_a) else conn_a, np.float64)
    b = np.asarray(conn_b.detach().cpu() if torch.is_tensor(conn_b) else conn_b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ShapeError(f"connectomes must be equal square matrices, got {a.shape}, {b.shape}")
    iu = np.triu_indices(a.shape[0])
    x, y = a[iu], b[iu]
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def bounding_grid(
    *sets: Streamlines, voxel_size_mm: float = 1.0, margin_vox: int = 1
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned isotropic grid covering every vertex of the given sets.

    Args:
        *sets: streamlines (mm).
        voxel_size_mm: voxel size (mm).
        margin_vox: empty voxels added on each side.

    Returns:
        ``(shape, affine)``: grid size and ``[4, 4]`` voxel -> scanner mm (voxel centres at
        ``lo + voxel_size_mm * ijk``).

    Shape:
        ``(P, 3)`` points per set -> ``(X, Y, Z)``, ``(4, 4)``.

    Gradients:
        None.
    """
    pts = torch.cat([s.points.detach().to(torch.float64).cpu() for s in sets])
    if pts.shape[0] == 0:
        raise EmptyTractogramError("cannot build a grid around empty tractograms")
    vs = float(voxel_size_mm)
    lo = pts.min(0).values.numpy() - margin_vox * vs
    hi = pts.max(0).values.numpy() + margin_vox * vs
    shape = tuple(int(x) for x in np.floor((hi - lo) / vs + 0.5).astype(int) + 1)
    affine = np.diag([vs, vs, vs, 1.0])
    affine[:3, 3] = lo
    return shape, affine


def _unit(key: str) -> str:
    if key.endswith("_mm"):
        return "mm"
    if key.startswith("count") or key.startswith("voxels"):
        return "streamlines" if key.startswith("count") else "voxels"
    if "frac_within" in key:
        return "fraction"
    return "ratio"


def _median(x: torch.Tensor) -> float:
    """Median with numpy's convention (mean of the two middle values), unlike torch's."""
    return float(np.median(x.detach().double().cpu().numpy()))


def _summary(prefix: str, x: torch.Tensor, within=()) -> dict[str, float]:
    x = x.detach().double().cpu()
    out = {
        f"{prefix}_mean_mm": float(x.mean()),
        f"{prefix}_median_mm": _median(x),
        f"{prefix}_max_mm": float(x.max()),
    }
    for w in within:
        out[f"{prefix}_frac_within_{w:g}mm"] = float((x <= w).double().mean())
    return out


def _load_image(img):
    if img is None or hasattr(img, "affine"):
        return img
    from ..io.image import load_image

    return load_image(Path(img))


def _check_inputs(a: Streamlines, b: Streamlines, names) -> None:
    for s, name in zip((a, b), names):
        if len(s) == 0:
            raise EmptyTractogramError(f"tractogram {name} is empty (0 streamlines)")
        if not bool(torch.isfinite(s.points).all()):
            raise SpaceError(f"tractogram {name} has non-finite coordinates")
    lo_a, hi_a = a.points.min(0).values, a.points.max(0).values
    lo_b, hi_b = b.points.min(0).values, b.points.max(0).values
    margin = 2.0  # mm: tolerate bundles that touch without sharing a vertex
    if bool(((lo_a > hi_b + margin) | (lo_b > hi_a + margin)).any()):

        def fmt(lo, hi) -> str:
            return "[" + ", ".join(f"{float(x):.1f}..{float(y):.1f}" for x, y in zip(lo, hi)) + "]"

        raise SpaceError(
            f"{names[0]} and {names[1]} do not overlap at all ({names[0]} spans "
            f"{fmt(lo_a, hi_a)} mm, {names[1]} spans {fmt(lo_b, hi_b)} mm); "
            "are they in the same space?"
        )


def _outside_fraction(s: Streamlines, shape, affine) -> tuple[int, float]:
    ijk = torch.floor(world_to_voxel(s.points.detach().double(), affine) + 0.5)
    out = ((ijk < 0) | (ijk >= torch.tensor(shape, dtype=ijk.dtype, device=ijk.device))).any(1)
    n = int(out.sum())
    return n, n / max(1, s.points.shape[0])


def compare_tractograms(
    a: Streamlines,
    b: Streamlines,
    reference=None,
    parcellation=None,
    *,
    n_points: int = 20,
    ba_threshold_mm: float = 5.0,
    within_mm: tuple[float, ...] = (0.1, 0.5, 1.0),
    bundle_sample: int = 1000,
    max_outside_fraction: float = 0.05,
    chunk_size: int = 256,
    names: tuple[str, str] = ("A", "B"),
    seed: int = 0,
) -> dict:
    """Every evaluation metric between a candidate ``a`` and a target ``b``.

    Args:
        a: candidate tractogram (mm), e.g. tracked.
        b: target tractogram (mm), e.g. the reference bundle; overlap/overreach are relative
            to it.
        reference: optional :class:`~invtract.io.image.Image` (or path) whose grid is used for
            the density metrics; otherwise a 1 mm isotropic grid around both tractograms.
        parcellation: optional label image (or path) for the connectome correlation (needs
            ``invtract.losses.connectome``).
        n_points: resampling points for MDF, bundle adjacency and bundle-level minima.
        ba_threshold_mm: bundle-adjacency threshold (mm).
        within_mm: thresholds (mm) for the paired "fraction within" statistics.
        bundle_sample: at most this many streamlines of each set (seeded random sample) are
            used as queries for the bundle-level MAM/Hausdorff minima (``n**2`` per pair);
            the MDF minima and bundle adjacency always use every streamline.
        max_outside_fraction: a reference grid that leaves more than this fraction of either
            tractogram's vertices outside raises :class:`SpaceError`. Vertices outside the grid
            (e.g. the exit points MRtrix appends, up to one step beyond the image) are dropped
            from the density maps.
        chunk_size: streamlines per block for the pairwise distances.
        names: display names of ``a`` and ``b`` for error messages.
        seed: seed of the bundle-level sample.

    Returns:
        A JSON-serialisable dict: ``count_a``, ``count_b``, ``dice``, ``bundle_adjacency``, the
        other metrics (names end in ``_mm`` for millimetres; ``units`` maps each metric to its
        unit), ``reference_grid`` (how the density grid was chosen) and ``notes``. Paired
        metrics (``paired_*``) are ``None`` unless both have the same number of streamlines.

    Raises:
        EmptyTractogramError: either tractogram is empty.
        SpaceError: the tractograms do not overlap, or ``reference`` does not cover them.
    """
    _check_inputs(a, b, names)
    dev = a.device
    a = a.to(dtype=torch.float64)
    b = b.to(device=dev, dtype=torch.float64)
    res: dict = {"count_a": len(a), "count_b": len(b)}
    notes: list[str] = []

    # -- lengths ----------------------------------------------------------------------------
    len_a, len_b = arc_lengths(a), arc_lengths(b)
    res.update(
        length_mean_a_mm=float(len_a.mean()),
        length_median_a_mm=_median(len_a),
        length_mean_b_mm=float(len_b.mean()),
        length_median_b_mm=_median(len_b),
        length_wasserstein_mm=float(wasserstein_1d(len_a, len_b)),
    )

    # -- density maps ------------------------------------------------------------------------
    ref = _load_image(reference)
    if ref is not None:
        shape = tuple(int(s) for s in np.asarray(ref.data).shape[:3])
        affine = np.asarray(ref.affine, np.float64)
        grid = {
            "source": "reference image",
            "path": None if getattr(ref, "path", None) is None else str(ref.path),
        }
        for s, name in zip((a, b), names):
            n, frac = _outside_fraction(s, shape, affine)
            if frac > max_outside_fraction:
                raise SpaceError(
                    f"the reference grid {shape} does not cover {name}: {n} of "
                    f"{s.points.shape[0]} vertices ({100 * frac:.1f}%) lie outside it"
                )
    else:
        shape, affine = bounding_grid(a, b, voxel_size_mm=1.0, margin_vox=1)
        grid = {"source": "1 mm isotropic bounding box of both tractograms (no --reference)"}
    grid.update(
        shape=list(shape),
        voxel_size_mm=[float(x) for x in np.linalg.norm(affine[:3, :3], axis=0)],
        affine=affine.tolist(),
    )
    res["reference_grid"] = grid
    for key, s in (("a", a), ("b", b)):
        n, _ = _outside_fraction(s, shape, affine)
        res[f"vertices_outside_grid_{key}"] = n
    dens_a = density_map(a, shape, affine, outside="drop")
    dens_b = density_map(b, shape, affine, outside="drop")
    ol, orr = overlap_overreach(dens_a, dens_b)
    res.update(
        dice=dice(dens_a, dens_b),
        weighted_dice=weighted_dice(dens_a, dens_b),
        density_correlation=float(density_correlation(dens_a.double(), dens_b.double())),
        overlap=ol,
        overreach=orr,
        voxels_a=int((dens_a > 0).sum()),
        voxels_b=int((dens_b > 0).sum()),
    )

    # -- streamline distances ----------------------------------------------------------------
    ra, rb = resample(a, n_points), resample(b, n_points)
    mins = bundle_minima(ra, rb, chunk_size=chunk_size)
    thr = float(ba_threshold_mm)
    res["bundle_adjacency"] = 0.5 * float(
        (mins["mdf_ab"] < thr).double().mean() + (mins["mdf_ba"] < thr).double().mean()
    )
    gen = torch.Generator().manual_seed(int(seed))
    ia = torch.arange(len(a)) if len(a) <= bundle_sample else torch.randperm(len(a), generator=gen)
    ib = torch.arange(len(b)) if len(b) <= bundle_sample else torch.randperm(len(b), generator=gen)
    ia, ib = ia[:bundle_sample].to(dev), ib[:bundle_sample].to(dev)
    pm_ab = bundle_minima(ra[ia], rb, point_metrics=True, chunk_size=chunk_size)
    pm_ba = bundle_minima(rb[ib], ra, point_metrics=True, chunk_size=chunk_size)
    if len(ia) < len(a) or len(ib) < len(b):
        notes.append(
            f"bundle-level MAM/Hausdorff use a random sample of {len(ia)}/{len(a)} and "
            f"{len(ib)}/{len(b)} query streamlines (seed {seed})"
        )
    per_metric = {
        "mdf": (mins["mdf_ab"], mins["mdf_ba"]),
        "mam": (pm_ab["mam_ab"], pm_ba["mam_ab"]),
        "hausdorff": (pm_ab["hausdorff_ab"], pm_ba["hausdorff_ab"]),
    }
    for k, (x_ab, x_ba) in per_metric.items():
        res[f"bundle_{k}_mean_mm"] = float(torch.cat([x_ab, x_ba]).mean())
        res[f"bundle_{k}_a_to_b_mean_mm"] = float(x_ab.mean())
        res[f"bundle_{k}_a_to_b_median_mm"] = _median(x_ab)
        res[f"bundle_{k}_b_to_a_mean_mm"] = float(x_ba.mean())
        res[f"bundle_{k}_b_to_a_median_mm"] = _median(x_ba)

    # -- paired (streamline i of a vs i of b) ----------------------------------------------
    paired_keys = [
        *_summary("paired_hausdorff", torch.zeros(1), within_mm),
        *_summary("paired_mdf", torch.zeros(1), within_mm),
    ]
    if len(a) == len(b):
        ph = paired_hausdorff(a, b)
        direct = (ra - rb).norm(dim=-1).mean(-1)
        flipped = (ra - rb.flip(1)).norm(dim=-1).mean(-1)
        res.update(_summary("paired_hausdorff", ph, within_mm))
        res.update(_summary("paired_mdf", torch.minimum(direct, flipped), within_mm))
    else:
        res.update({k: None for k in paired_keys})
        notes.append("paired metrics need equal streamline counts; they are null")

    # -- connectome ---------------------------------------------------------------------------
    res["connectome_correlation"] = None
    if parcellation is not None:
        try:
            from .connectome import connectome_matrix
        except ImportError:
            notes.append("connectome_correlation unavailable: invtract.losses.connectome missing")
            warnings.warn(notes[-1], InvtractWarning, stacklevel=2)
        else:
            labels = _load_image(parcellation)
            ca = connectome_matrix(a, labels, radius_mm=4.0)
            cb = connectome_matrix(b, labels, radius_mm=4.0)
            res["connectome_correlation"] = connectome_correlation(ca, cb)

    res["n_points"] = int(n_points)
    res["ba_threshold_mm"] = thr
    for k, v in res.items():
        if isinstance(v, float) and not math.isfinite(v):
            res[k] = None  # JSON has no NaN
    res["units"] = {k: _unit(k) for k in res if _is_metric(k)}
    res["notes"] = notes
    return res


_NOT_METRICS = {"reference_grid", "units", "notes", "n_points", "ba_threshold_mm"}


def _is_metric(key: str) -> bool:
    return key not in _NOT_METRICS and not key.startswith("vertices_outside")
