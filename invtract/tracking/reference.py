"""Re-track a tckgen reference tractogram from its own seeds and compare, streamline by streamline.

This is the fidelity harness behind ``benchmarks/parity.py`` and the parity tests.

* :func:`compare_reference`: for each streamline of a ``tckgen -output_seeds`` pair, seed
  p0 = tck[s] and initial direction the header's ``init_direction`` (``-seed_direction``) or
  else normalize(tck[s-1] - tck[s]) (spec §8.3 recipe 3). Where tckgen
  drew a random initial direction, the derived one differs from it by float32 rounding, which can
  flip a marginal decision (a peak search converging on its 50th iteration) on rare seeds.
* :func:`replay_reference`: for ``-seed_grid_per_voxel`` references, the whole run again with
  tckgen's random stream replayed (``MRTRIX_RNG_SEED``), so seeds and initial directions are
  tckgen's own, bit for bit.

The tracking options come from the ``.tck`` header; give the FOD tckgen read (the header's
``source``, e.g. ``fod.mif`` with its double-precision transform; a NIfTI copy stores a float32
transform, which moves marginal steps by an ulp). Distances are in scanner mm; the symmetric
Hausdorff distance is computed with ``scipy.spatial.distance.directed_hausdorff`` (an
independent implementation).
"""

from __future__ import annotations

import os

import numpy as np
from scipy.spatial.distance import directed_hausdorff

from ..errors import ConfigError
from ..fod.field import FODField
from ..io.image import load_fod, load_mask
from ..io.seeds import load_seeds, seeds_from_reference
from ..io.tractogram import load_tractogram, load_tractogram_header
from ..params import TrackingParameters
from .api import Seeding, track

__all__ = ["parameters_from_header", "compare_reference", "replay_reference"]


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
        seed_direction=tuple(float(v) for v in header["init_direction"].split(","))
        if "init_direction" in header
        else None,
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
    rois=None,
    act=None,
) -> dict:
    """Re-track ``tck_path`` from ``seeds_path`` on ``fod_path`` and compare.

    ``rois``: the run's include / exclude / mask regions (a ``RoiSet``; e.g.
    :func:`invtract.tracking.tckgen_replay.command_rois`), none by default.

    Returns a dict with ``n``, ``frac_hausdorff_lt_0.1``, ``..._0.5``, ``..._1``,
    ``frac_same_count``, ``median_pointwise_mm``, ``max_pointwise_mm`` (over streamlines with
    identical counts), ``rejected_by_us`` and the lists of mismatching indices. ``act``: the
    5TT image of a ``tckgen -act`` reference (:func:`invtract.tracking.act.act_from_header`).
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
    field = FODField.from_image(fod, device=device)
    res = track(
        field,
        # with -seed_direction every seed starts from it, as in tckgen
        Seeding("list", positions=pos, directions=None if params.seed_direction else dirs),
        params,
        rois=rois,
        engine=engine,
        rng_seed=0,
        batch_size=batch_size,
        act=act,
    )
    ours = {int(i): s for i, s in zip(res.seed_ids, res.streamlines.to_list())}
    out = {"reference": os.path.basename(str(tck_path)), "engine": res.engine}
    out.update(_pair_metrics([ours.get(i) for i in range(len(ref_sel))], ref_sel, track_index))
    return out


def replay_reference(
    tck_path,
    fod_path,
    rng_seed: int,
    engine: str = "auto",
    device: str = "cpu",
    batch_size: int = 4096,
    act=None,
) -> dict:
    """Replay a ``tckgen -seed_grid_per_voxel MASK G -nthreads 0`` run and compare, in order.

    The mask and G are read from the header's ``command_history`` (the mask next to the
    ``.tck``); ``rng_seed`` is the run's ``MRTRIX_RNG_SEED``. Returns the keys of
    :func:`compare_reference` plus ``generated`` / ``ref_generated`` (streamlines generated,
    i.e. seeds whose peak search succeeded) and ``kept`` / ``ref_kept``. Streamlines are paired
    by seed position (unmatched reference streamlines count as rejected by us).
    """
    header = load_tractogram_header(tck_path)
    words = header.get("command_history", "").split()
    if "-seed_grid_per_voxel" not in words:
        raise ConfigError(f"{tck_path}: replay needs a -seed_grid_per_voxel reference")
    k = words.index("-seed_grid_per_voxel")
    mask = load_mask(os.path.join(os.path.dirname(str(tck_path)), words[k + 1]))
    params = parameters_from_header(header)
    fod = load_fod(fod_path)
    field = FODField.from_image(fod, device=device)
    res = track(
        field,
        Seeding.from_mask("grid", mask, int(words[k + 2])),
        params,
        engine=engine,
        rng_seed=rng_seed,
        batch_size=batch_size,
        act=act,
    )
    ref_list = load_tractogram(tck_path).to_list()
    ours = res.streamlines.to_list()
    # pair by the seed vertex (the seeds file lists the same points in the same order)
    ours_by_seed = {tuple(p.tolist()): o for p, o in zip(res.seed_points, ours)}
    ref_seeds = load_seeds_for(tck_path)
    paired = [ours_by_seed.get(tuple(p.tolist())) for p in ref_seeds]
    out = {"reference": os.path.basename(str(tck_path)), "engine": res.engine, "mode": "replay"}
    out.update(_pair_metrics(paired, ref_list, np.arange(len(ref_list))))
    total = header.get("total_count")
    out.update(
        generated=int(res.summary["generated"]),
        ref_generated=int(total) if total is not None else None,
        kept=len(ours),
        ref_kept=len(ref_list),
    )
    return out


def load_seeds_for(tck_path) -> np.ndarray:
    """``[S, 3]`` float32 seed vertex of each streamline of a tckgen ``.tck`` written with
    ``-output_seeds`` (the file named by its ``seed_output`` header key)."""
    header = load_tractogram_header(tck_path)
    name = header.get("seed_output")
    if not name:
        raise ConfigError(f"{tck_path}: no seed_output in the header")
    # tckgen records the -output_seeds path as given (possibly absolute, on another machine):
    # the seeds file is looked up beside the .tck
    table = load_seeds(os.path.join(os.path.dirname(str(tck_path)), os.path.basename(name)))
    return np.asarray(table.positions, np.float32)[np.argsort(table.track_index)]


def _pair_metrics(ours: list, refs: list, track_index: np.ndarray) -> dict:
    """Per-pair agreement of ``ours[i]`` (None = not produced) with ``refs[i]``."""
    haus, same, pointwise = [], [], []
    mismatched, rejected = [], []
    for i, r in enumerate(refs):
        o = ours[i]
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
    n = len(refs)
    finite = haus[np.isfinite(haus)]
    return {
        "n": n,
        "frac_hausdorff_lt_0.1": float((haus < 0.1).mean()) if n else 1.0,
        "frac_hausdorff_lt_0.5": float((haus < 0.5).mean()) if n else 1.0,
        "frac_hausdorff_lt_1": float((haus < 1.0).mean()) if n else 1.0,
        "frac_same_count": float(np.mean(same)) if n else 1.0,
        "frac_bit_exact": float(
            np.mean([p == 0.0 for p in pointwise] + [False] * (n - len(pointwise)))
        )
        if n
        else 1.0,
        "median_pointwise_mm": float(np.median(pointwise)) if pointwise else None,
        "max_pointwise_mm": float(np.max(pointwise)) if pointwise else None,
        "max_hausdorff_mm": float(finite.max()) if finite.size else None,
        "rejected_by_us": rejected,
        "count_mismatch": mismatched,
    }
