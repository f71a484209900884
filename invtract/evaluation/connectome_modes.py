"""tck2connectome's other assignment modes: reverse search, forward search, all voxels.

Source: ``src/dwi/tractography/connectome/tck2nodes.cpp`` (MRtrix3 3.0.3), classes
``Tck2nodes_revsearch``, ``Tck2nodes_forwardsearch`` and ``Tck2nodes_all_voxels``; the
option handling (a ``float`` argument) in ``connectome.cpp``. Points are scanner mm (RAS+),
float32 as stored in the tractogram; voxel lookups round ``scanner2voxel @ p`` half away
from zero, like the radial search in :mod:`invtract.evaluation.connectome`.

* **Reverse search** (``-assignment_reverse_search D``): from an endpoint, walk the vertices
  inwards up to the midpoint (first end: indices ``0 .. (n+1)//2 - 1``; last end:
  ``n-1`` down to ``n//2 + 1``); the first vertex whose voxel carries a label gives the node.
  After each unlabelled vertex the float32 length of the next segment is added (in float64);
  once that sum exceeds D the search gives 0 (D = 0: no limit).
* **Forward search** (``-assignment_forward_search D``): a best-first search over voxels from
  the endpoint's voxel, along the tangent ``t = 2 l - s |l| / |s|`` (l, s: the last and the
  second-last step, float64 from float32 differences; for two vertices ``t = l``), normalised.
  A neighbour (26-connected, visited once) gets the cost ``|c - p| (1 + a / (pi/4))`` with
  ``a`` the angle between t and ``c - p`` (c its centre), stored as float32, unless
  ``a > pi/4`` or the cost exceeds D. Voxels are expanded in increasing cost; a voxel whose
  cost equals one already queued is dropped (``std::map`` keeps the first key); voxels
  outside the image are not expanded. The first labelled voxel gives the node; an endpoint
  outside the image gives 0. A one-vertex streamline (MRtrix reads past its end) only looks
  at its own voxel here.
* **All voxels** (``-assignment_all_voxels``): the sorted set of labels of the voxels holding
  any vertex. Each streamline then adds to every pair ``(a, b)``, ``a <= b``, of its set (the
  diagonal included); a single node adds to ``(0, a)``; an empty set to ``(0, 0)``.
"""

from __future__ import annotations

import heapq

import numpy as np

from .connectome import LabelVolume, _apply_affine, _lookup, _round_half_away
from .tracks import Packed

__all__ = [
    "reverse_search_nodes",
    "forward_search_nodes",
    "all_voxel_nodes",
    "node_list_pairs",
    "segment_norms",
]

#: forward search cone half-angle (``Math::pi_4``)
_ANGLE_LIMIT = np.pi / 4
#: the 27 offsets of a voxel's neighbourhood, z outer, x inner (MRtrix's loop order)
_NEIGHBOURS = np.stack(
    np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), np.arange(-1, 2), indexing="ij")[::-1],
    axis=-1,
).reshape(-1, 3)


def segment_norms(points: np.ndarray) -> np.ndarray:
    """``[P - 1]`` float32 norms of consecutive differences, ``sqrt(x^2 + (y^2 + z^2))``.

    The order of Eigen's ``Vector3f::norm`` in the 3.0.3 build (see ``mrtrix_lengths``).
    """
    pts = np.asarray(points, dtype=np.float32)
    d = pts[1:] - pts[:-1]
    return np.sqrt(d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]))


def point_labels(vol: LabelVolume, points: np.ndarray) -> np.ndarray:
    """``[P]`` label of the voxel holding each point (0 outside the image or for NaN)."""
    p = np.asarray(points, dtype=np.float64)
    ok = np.all(np.isfinite(p), axis=1)
    vox = _round_half_away(_apply_affine(vol.scanner2voxel, np.where(ok[:, None], p, 0.0)))
    return np.where(ok, _lookup(vol, vox), 0)


def _first_reachable(labels: np.ndarray, segs: np.ndarray, count: int, max_dist: float) -> int:
    """Label of the first labelled vertex among ``count`` reachable within ``max_dist``."""
    hits = np.flatnonzero(labels[:count] > 0)
    if hits.size == 0:
        return 0
    k = int(hits[0])
    if max_dist and k > 0:
        travelled = np.cumsum(segs[:k].astype(np.float64))
        if np.any(travelled > max_dist):
            return 0
    return int(labels[k])


def reverse_search_nodes(vol: LabelVolume, tracks: Packed, max_dist: float) -> np.ndarray:
    """``[S, 2]`` nodes by reverse search (``-assignment_reverse_search max_dist``).

    Args:
        vol: the parcellation.
        tracks: streamlines, scanner mm.
        max_dist: the float32 search length in mm as a Python float (0: up to the midpoint).
    """
    labels = point_labels(vol, tracks.points)
    segs = segment_norms(tracks.points) if tracks.points.shape[0] > 1 else np.zeros(0, np.float32)
    out = np.zeros((len(tracks), 2), dtype=np.int64)
    for s, (start, n) in enumerate(zip(tracks.first.tolist(), tracks.lengths.tolist())):
        if n == 0:
            continue
        lab = labels[start : start + n]
        seg = segs[start : start + n - 1]
        out[s, 0] = _first_reachable(lab, seg, (n + 1) // 2, max_dist)
        out[s, 1] = _first_reachable(lab[::-1], seg[::-1], n - 1 - n // 2, max_dist)
    return out


def _tangent(pts: np.ndarray) -> np.ndarray:
    """Unit tangent at ``pts[0]`` pointing away from ``pts[1]`` (float64), NaN for one vertex."""
    if pts.shape[0] < 2:
        return np.full(3, np.nan)
    last = (pts[0] - pts[1]).astype(np.float64)
    if pts.shape[0] > 2:
        second = (pts[1] - pts[2]).astype(np.float64)
        ratio = _norm(last) / _norm(second)
        t = last + (last - second * ratio)
    else:
        t = last
    z = t[0] * t[0] + t[1] * t[1] + t[2] * t[2]
    return t / np.sqrt(z) if z > 0 else t


def _norm(v: np.ndarray) -> float:
    """Eigen's ``Vector3d::norm`` order: ``sqrt((x^2 + y^2) + z^2)``."""
    return float(np.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2]))


def _costs(vol: LabelVolume, p: np.ndarray, t: np.ndarray, vox: np.ndarray, max_dist: float):
    """float32 forward-search cost of voxels ``vox [K, 3]`` (NaN: outside the cone / too far)."""
    offset = _apply_affine(vol.voxel2scanner, vox.astype(np.float64)) - p
    sq = offset[:, 0] * offset[:, 0] + offset[:, 1] * offset[:, 1] + offset[:, 2] * offset[:, 2]
    dist = np.sqrt(sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(sq[:, None] > 0, offset / dist[:, None], offset)
        cosine = t[0] * unit[:, 0] + t[1] * unit[:, 1] + t[2] * unit[:, 2]
        angle = np.arccos(cosine)
        cf = dist * (1.0 + angle / _ANGLE_LIMIT)
        bad = ~(angle <= _ANGLE_LIMIT) & ~np.isnan(angle)  # angle > limit
        cf = np.where(bad | (cf > max_dist), np.nan, cf)
    return cf.astype(np.float32)


def _forward_one(vol: LabelVolume, pts: np.ndarray, max_dist: float) -> int:
    """Forward-search node of the endpoint ``pts[0]`` (``pts``: the streamline from there)."""
    p = pts[0].astype(np.float64)
    t = _tangent(pts[:3])
    start = tuple(_round_half_away(_apply_affine(vol.scanner2voxel, p[None]))[0].tolist())
    shape = vol.shape
    inside = all(0 <= start[i] < shape[i] for i in range(3))
    if not inside:
        return 0
    visited = {start}
    queue = [(0.0, start)]
    queued_keys = {0.0}
    while queue:
        key, voxel = heapq.heappop(queue)
        queued_keys.discard(key)
        if not all(0 <= voxel[i] < shape[i] for i in range(3)):
            continue
        label = int(vol.labels[voxel])
        if label:
            return label
        fresh = [v for v in map(tuple, (np.asarray(voxel) + _NEIGHBOURS).tolist())
                 if v not in visited]  # fmt: skip
        visited.update(fresh)
        costs = _costs(vol, p, t, np.asarray(fresh, dtype=np.int64), max_dist)
        for v, c in zip(fresh, costs.tolist()):
            if np.isfinite(c) and c not in queued_keys:
                queued_keys.add(c)
                heapq.heappush(queue, (c, v))
    return 0


def forward_search_nodes(vol: LabelVolume, tracks: Packed, max_dist: float) -> np.ndarray:
    """``[S, 2]`` nodes by forward search (``-assignment_forward_search max_dist``).

    Args:
        vol: the parcellation.
        tracks: streamlines, scanner mm (float32 as in the file).
        max_dist: the float32 search length in mm as a Python float.
    """
    pts = np.asarray(tracks.points, dtype=np.float32)
    out = np.zeros((len(tracks), 2), dtype=np.int64)
    for s, (start, n) in enumerate(zip(tracks.first.tolist(), tracks.lengths.tolist())):
        if n == 0:
            continue
        line = pts[start : start + n]
        out[s, 0] = _forward_one(vol, line, max_dist)
        out[s, 1] = _forward_one(vol, line[::-1], max_dist)
    return out


def all_voxel_nodes(vol: LabelVolume, tracks: Packed) -> list[np.ndarray]:
    """Sorted distinct labels (> 0) of the voxels holding each streamline's vertices.

    Returns:
        ``S`` int64 arrays (possibly empty), one per streamline.
    """
    labels = point_labels(vol, tracks.points)
    owner = np.repeat(np.arange(len(tracks)), tracks.lengths)
    keep = labels > 0
    pairs = np.unique(np.stack([owner[keep], labels[keep]], axis=1), axis=0)
    cuts = np.searchsorted(pairs[:, 0], np.arange(1, len(tracks)))
    return np.split(pairs[:, 1].astype(np.int64), cuts)


def node_list_pairs(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The edges each streamline's node list adds to, in MRtrix's order.

    Returns:
        ``(pairs [E, 2] int64, owner [E] int64)``: every ``(list[i], list[j])`` with
        ``i <= j``; ``(0, a)`` for a single node; ``(0, 0)`` for none; ``owner`` is the
        streamline index of each edge.
    """
    pairs, owner = [], []
    for s, nodes in enumerate(lists):
        n = nodes.size
        if n == 0:
            block = np.zeros((1, 2), np.int64)
        elif n == 1:
            block = np.array([[0, int(nodes[0])]], np.int64)
        else:
            i, j = np.triu_indices(n)
            block = np.stack([nodes[i], nodes[j]], axis=1)
        pairs.append(block)
        owner.append(np.full(block.shape[0], s, np.int64))
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    return np.concatenate(pairs), np.concatenate(owner)
