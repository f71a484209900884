"""Re-track a tckgen reference tractogram from its own seeds and compare, streamline by streamline.

This is the fidelity harness behind ``benchmarks/parity.py`` and the parity tests. For each
streamline of a ``tckgen -output_seeds`` pair: seed p0 = tck[s] and initial direction
normalize(tck[s-1] - tck[s]) (spec §8.3 recipe 3); the tracking options come from the ``.tck``
header. Distances are in scanner mm; the symmetric Hausdorff distance is computed with
``scipy.spatial.distance.directed_hausdorff`` (an independent implementation).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from scipy.spatial.distance import directed_hausdorff

from ..fod.field import FODField
from ..io.image import load_fod
from ..io.seeds import seeds_from_reference
from ..io.tractogram import load_tractogram, load_tractogram_header
from ..params import TrackingParameters
from .api import Seeding, track

__all__ = ["parameters_from_header", "compare_reference"]


def parameters_from_header(header: dict) -> TrackingParameters:
    """Tracking parameters recorded in a tckgen ``.tck`` header (MRtrix key names)."""

    def num(key):
        return float(header[key]) if key in header else None

    return TrackingParameters(
        step_mm=num("step_size"),
        angle_deg=num("max_angle"),
        cutoff=num("threshold"),
        min_length_mm=num("min_dist"),
        max_length_mm=num("max_dist"),
        rk4=header.get("rk4", "0") == "1",
        downsample=int(float(header.get("downsample_factor", 1))),
        unidirectional=header.get("unidirectional", "0") == "1",
    )


def symmetric_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between two polylines' vertices (mm)."""
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])


def compare_reference(
    tck_path,
    seeds_path,
    fod_path,
    engine: str = "torch",
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 4096,
) -> dict:
    """Re-track ``tck_path`` from ``seeds_path`` on ``fod_path`` and compare.

    Returns a dict with ``n``, ``frac_hausdorff_lt_0.1``, ``..._0.5``, ``..._1``,
    ``frac_same_count``, ``median_pointwise_mm``, ``max_pointwise_mm`` (over streamlines with
    identical counts), ``rejected_by_us`` and the lists of mismatching indices.
    """
    header = load_tractogram_header(tck_path)
    params = parameters_from_header(header)
    ref_list = load_tractogram(tck_path).to_list()
    pos, dirs, track_index = seeds_from_reference(tck_path, seeds_path, params.unidirectional)
    order = np.argsort(track_index)
    if limit is not None and limit < len(order):
        order = order[np.linspace(0, len(order) - 1, limit).round().astype(int)]
    pos, dirs, track_index = pos[order], dirs[order], track_index[order]
    ref_sel = [ref_list[int(t)] for t in track_index]
    fod = load_fod(fod_path)
    field = FODField.from_array(fod.data, fod.affine, device=device)
    res = track(
        field,
        Seeding("list", positions=pos, directions=dirs),
        params,
        voxel_sizes=fod.voxel_sizes,
        engine=engine,
        rng_seed=0,
        batch_size=batch_size,
    )
    ours = {int(i): s for i, s in zip(res.seed_ids, res.streamlines.to_list())}
    haus, same, pointwise = [], [], []
    mismatched, rejected = [], []
    for i, r in enumerate(ref_sel):
        o = ours.get(i)
        if o is None:
            rejected.append(int(track_index[i]))
            haus.append(np.inf)
            same.append(False)
            continue
        haus.append(symmetric_hausdorff(o, r))
        eq = o.shape[0] == r.shape[0]
        same.append(eq)
        if eq:
            pointwise.append(float(np.abs(o.astype(np.float64) - r).max()))
        else:
            mismatched.append(int(track_index[i]))
    haus = np.asarray(haus)
    n = len(ref_sel)
    return {
        "reference": os.path.basename(str(tck_path)),
        "engine": res.engine,
        "n": n,
        "frac_hausdorff_lt_0.1": float((haus < 0.1).mean()) if n else 1.0,
        "frac_hausdorff_lt_0.5": float((haus < 0.5).mean()) if n else 1.0,
        "frac_hausdorff_lt_1": float((haus < 1.0).mean()) if n else 1.0,
        "frac_same_count": float(np.mean(same)) if n else 1.0,
        "median_pointwise_mm": float(np.median(pointwise)) if pointwise else None,
        "max_pointwise_mm": float(np.max(pointwise)) if pointwise else None,
        "max_hausdorff_mm": float(haus[np.isfinite(haus)].max())
        if np.isfinite(haus).any()
        else None,
        "rejected_by_us": rejected,
        "count_mismatch": mismatched,
    }


_ = torch
