"""tck2connectome's forward search (``-assignment_forward_search D``), for all endpoints at once.

Source: ``src/dwi/tractography/connectome/tck2nodes.cpp`` (MRtrix3 3.0.3),
``Tck2nodes_forwardsearch::select_node`` and ``get_cf``; the rules are listed in
:mod:`invtract.evaluation.connectome_modes`. Points are scanner mm (RAS+), float32 as stored;
geometry is float64 from them, like MRtrix.

MRtrix runs a best-first search per endpoint (a ``std::map`` keyed by cost). Here:

1. every endpoint's tangent, voxel and the label there are computed at once; an endpoint
   outside the image gives 0, one in a labelled voxel gives that label;
2. for the others, the cost of every voxel that could pass (centre within ``D`` of the
   endpoint: a fixed table of voxel offsets) is computed in one block, and each endpoint's
   passing voxels are sorted by cost (then z, y, x: the order MRtrix meets equal costs in);
3. the search itself runs in lock step over the endpoints: each round pops the cheapest
   queued voxel of every endpoint still searching (the first queued one in that order),
   stops at a labelled voxel and otherwise queues its unvisited 26-neighbours among the
   passing voxels (a voxel outside the image is popped but not expanded).

A cost shared by two passing voxels of one endpoint (``std::map`` then drops the later one
while the first is queued) is rare: those endpoints run the per-endpoint search
(:func:`best_first_node`), which is also the reference the block search is tested against.
"""

from __future__ import annotations

import heapq

import numpy as np

from .connectome import LabelVolume, _apply_affine, _lookup, _round_half_away
from .tracks import Packed

__all__ = ["forward_search_nodes", "endpoint_tangents", "forward_costs", "best_first_node"]

#: forward search cone half-angle (``Math::pi_4``)
_ANGLE_LIMIT = np.pi / 4
#: the 27 offsets of a voxel's neighbourhood, z outer, x inner (MRtrix's loop order)
_NEIGHBOURS = np.stack(
    np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), np.arange(-1, 2), indexing="ij")[::-1],
    axis=-1,
).reshape(-1, 3)
#: (endpoint, offset) cost evaluations per block (about 100 bytes each at the peak)
_BLOCK_ELEMENTS = 1 << 20


def _norms(v: np.ndarray) -> np.ndarray:
    """Eigen's ``Vector3d::norm`` order, ``sqrt((x^2 + y^2) + z^2)``, over the last axis."""
    return np.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2])


def endpoint_tangents(tracks: Packed) -> tuple[np.ndarray, np.ndarray]:
    """Each streamline end's point and unit tangent, pointing out of the streamline.

    The tangent is ``t = l + (l - s |l| / |s|)`` with ``l``, ``s`` the last and second-last
    steps (float32 differences taken to float64), ``t = l`` for two vertices, NaN for one;
    normalised when its squared norm is positive.

    Returns:
        ``(p [S, 2, 3], t [S, 2, 3])`` float64: ``[:, 0]`` the first vertex, ``[:, 1]`` the
        last; NaN for a streamline without vertices.
    """
    pts = np.asarray(tracks.points, dtype=np.float32)
    n, first = tracks.lengths, tracks.first
    p = np.full((len(tracks), 2, 3), np.nan)
    t = np.full((len(tracks), 2, 3), np.nan)
    if pts.shape[0] == 0:
        return p, t
    top = pts.shape[0] - 1
    for end, (index, step) in enumerate(((first, 1), (first + n - 1, -1))):
        a = pts[np.clip(index, 0, top)]
        b = pts[np.clip(index + step, 0, top)]
        c = pts[np.clip(index + 2 * step, 0, top)]
        last = (a - b).astype(np.float64)
        second = (b - c).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = _norms(last) / _norms(second)
            tan = np.where((n > 2)[:, None], last + (last - second * ratio[:, None]), last)
            tan = np.where((n < 2)[:, None], np.nan, tan)
            z = tan[:, 0] * tan[:, 0] + tan[:, 1] * tan[:, 1] + tan[:, 2] * tan[:, 2]
            t[:, end] = np.where((z > 0)[:, None], tan / np.sqrt(z)[:, None], tan)
        p[:, end] = np.where((n > 0)[:, None], a.astype(np.float64), np.nan)
    return p, t


def forward_costs(
    vol: LabelVolume, p: np.ndarray, t: np.ndarray, vox: np.ndarray, max_dist: float
) -> np.ndarray:
    """float32 cost ``|c - p| (1 + a / (pi/4))`` of voxels ``vox`` (MRtrix ``get_cf``).

    Args:
        vol: the parcellation (its voxel -> scanner affine).
        p: endpoints, ``[..., 3]`` float64 scanner mm (broadcast against ``vox``).
        t: unit tangents, ``[..., 3]`` (broadcast likewise).
        vox: integer voxel indices ``[..., 3]``.
        max_dist: the search length in mm.

    Returns:
        ``[...]`` float32 costs; NaN where the angle ``a`` between ``t`` and ``c - p`` exceeds
        45 degrees, the cost exceeds ``max_dist`` or the angle is undefined.
    """
    offset = _apply_affine(vol.voxel2scanner, vox.astype(np.float64)) - p
    sq = offset[..., 0] * offset[..., 0] + offset[..., 1] * offset[..., 1]
    sq += offset[..., 2] * offset[..., 2]
    dist = np.sqrt(sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(sq[..., None] > 0, offset / dist[..., None], offset)
        cosine = t[..., 0] * unit[..., 0] + t[..., 1] * unit[..., 1]
        cosine += t[..., 2] * unit[..., 2]
        angle = np.arccos(np.ascontiguousarray(cosine))
        cf = dist * (1.0 + angle / _ANGLE_LIMIT)
        bad = ~(angle <= _ANGLE_LIMIT) & ~np.isnan(angle)  # angle > limit
        cf = np.where(bad | (cf > max_dist), np.nan, cf)
    return cf.astype(np.float32)


def best_first_node(vol: LabelVolume, p: np.ndarray, t: np.ndarray, max_dist: float) -> int:
    """Forward-search node of one endpoint ``p [3]`` with tangent ``t [3]``: MRtrix's search,
    one voxel at a time (a heap keyed by cost, equal costs dropped while one is queued)."""
    start = tuple(_round_half_away(_apply_affine(vol.scanner2voxel, p[None]))[0].tolist())
    shape = vol.shape
    if not all(0 <= start[i] < shape[i] for i in range(3)):
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
        costs = forward_costs(vol, p, t, np.asarray(fresh, dtype=np.int64), max_dist)
        for v, c in zip(fresh, costs.tolist()):
            if np.isfinite(c) and c not in queued_keys:
                queued_keys.add(c)
                heapq.heappush(queue, (c, v))
    return 0


def _offset_table(vol: LabelVolume, max_dist: float) -> np.ndarray:
    """``[K, 3]`` voxel offsets whose centre can lie within ``max_dist`` of an endpoint in
    the offset-0 voxel, in z, y, x order (the zero offset left out: it is the start)."""
    linear = vol.voxel2scanner[:, :3]
    sigma_min = float(np.linalg.svd(linear, compute_uv=False).min())
    m = int(np.ceil(max_dist / sigma_min + 0.5))
    r = np.arange(-m, m + 1)
    oz, oy, ox = np.meshgrid(r, r, r, indexing="ij")  # z outer, x inner
    table = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], axis=1)
    corners = np.stack(np.meshgrid(*[[-0.5, 0.5]] * 3, indexing="ij"), -1).reshape(-1, 3)
    half = float(_norms(corners @ linear.T).max())  # endpoint to its voxel centre, at most
    reach = _norms(table.astype(np.float64) @ linear.T)
    keep = (reach <= (max_dist + half) * (1 + 1e-9) + 1e-9) & np.any(table != 0, axis=1)
    return table[keep].astype(np.int64)


def _near_cone(vol, p, t, start, table, max_dist) -> tuple[np.ndarray, np.ndarray]:
    """``(endpoint, offset)`` index pairs that may pass: a cheap superset of the voxels with a
    finite cost (centre within ``max_dist``, less than about 45.6 degrees off the tangent),
    from approximate offsets ``(A start + b - p) + A o``; the exact test is
    :func:`forward_costs`."""
    linear = vol.voxel2scanner[:, :3]
    base = start.astype(np.float64) @ linear.T + vol.voxel2scanner[:, 3] - p  # [B, 3]
    reach = table.astype(np.float64) @ linear.T  # [K, 3]
    sq = np.zeros((p.shape[0], table.shape[0]))
    dot = np.zeros_like(sq)
    for i in range(3):
        d = base[:, i, None] + reach[None, :, i]
        sq += d * d
        dot += t[:, i, None] * d
    limit = (max_dist * (1 + 1e-6) + 1e-6) ** 2
    with np.errstate(invalid="ignore"):  # NaN tangents: nothing passes
        maybe = (dot > 0) & (dot * dot >= 0.49 * sq) & (sq <= limit)
    return np.nonzero(maybe)


def _candidates(vol, p, t, start, table, max_dist):
    """Each endpoint's passing voxels sorted by (cost, z, y, x).

    Returns:
        ``(offsets [B, W, 3], cost [B, W] float32, passing [B, W])``, W the most passing
        voxels of an endpoint.
    """
    row, k = _near_cone(vol, p, t, start, table, max_dist)  # k ascending within a row
    cost = forward_costs(vol, p[row], t[row], start[row] + table[k], max_dist)
    keep = np.isfinite(cost)
    row, k, cost = row[keep], k[keep], cost[keep]
    order = np.lexsort((cost, row))  # by row, then cost, then table order
    row, k, cost = row[order], k[order], cost[order]
    count = np.bincount(row, minlength=p.shape[0])
    width = int(count.max()) if count.size else 0
    rank = np.arange(row.size) - (np.cumsum(count) - count)[row]
    offsets = np.zeros((p.shape[0], width, 3), dtype=np.int64)
    costs = np.full((p.shape[0], width), np.nan, dtype=np.float32)
    offsets[row, rank] = table[k]
    costs[row, rank] = cost
    return offsets, costs, np.isfinite(costs)


def _lock_step(labels, offsets, passing) -> np.ndarray:
    """The best-first search of every endpoint, one pop per endpoint per round.

    Args:
        labels: ``[B, W]`` label of each candidate voxel (0 unlabelled or outside), ``-1``
            marking a voxel outside the image.
        offsets: ``[B, W, 3]`` candidate voxels relative to the start voxel.
        passing: ``[B, W]`` candidates with a finite cost (sorted by cost along W).

    Returns:
        ``[B]`` nodes (0: the queue ran empty).
    """
    B = labels.shape[0]
    nodes = np.zeros(B, dtype=np.int64)
    ids = np.arange(B)  # the endpoint of each working row (rows leave once done)
    off = offsets.astype(np.int16).transpose(2, 0, 1).copy()  # [3, B, W]: one plane per axis
    visited = ~passing
    queued = np.zeros_like(passing)
    size = np.zeros(B, dtype=np.int64)  # queue length
    grow = np.arange(B)  # rows whose popped voxel is expanded (first: the start voxel)
    centre = np.zeros((3, B), dtype=off.dtype)
    while True:
        fresh = ~visited[grow]
        for axis in range(3):  # 26-neighbours: every coordinate within 1
            fresh &= np.abs(off[axis, grow] - centre[axis, :, None]) <= 1
        visited[grow] |= fresh
        queued[grow] |= fresh
        size[grow] += np.count_nonzero(fresh, axis=1)
        live = size > 0
        if not live.all():  # drop finished rows from every working array
            ids, off, labels = ids[live], off[:, live], labels[live]
            visited, queued, size = visited[live], queued[live], size[live]
        if ids.size == 0:
            return nodes
        rows = np.arange(ids.size)
        pos = np.argmax(queued, axis=1)  # the cheapest queued voxel
        queued[rows, pos] = False
        size -= 1
        label = labels[rows, pos]
        found = label > 0
        nodes[ids[found]] = label[found]
        size[found] = 0  # its search ends
        grow = np.flatnonzero(label == 0)  # -1: outside the image, popped, not expanded
        centre = off[:, grow, pos[grow]]


def _search_block(vol, p, t, start, table, max_dist) -> np.ndarray:
    """Forward-search nodes of endpoints ``p [B, 3]`` whose own voxel ``start`` is inside
    the image and unlabelled."""
    offsets, cost, passing = _candidates(vol, p, t, start, table, max_dist)
    vox = start[:, None, :] + offsets
    inside = np.all((vox >= 0) & (vox < np.asarray(vol.shape)), axis=2)
    labels = np.where(inside, _lookup(vol, vox), -1)
    tie = np.any(passing[:, 1:] & (cost[:, 1:] == cost[:, :-1]), axis=1)
    nodes = _lock_step(labels[~tie], offsets[~tie], passing[~tie])
    out = np.zeros(p.shape[0], dtype=np.int64)
    out[~tie] = nodes
    for i in np.flatnonzero(tie):
        out[i] = best_first_node(vol, p[i], t[i], max_dist)
    return out


def forward_search_nodes(vol: LabelVolume, tracks: Packed, max_dist: float) -> np.ndarray:
    """``[S, 2]`` nodes by forward search (``-assignment_forward_search max_dist``).

    Args:
        vol: the parcellation.
        tracks: streamlines, scanner mm (float32 as in the file).
        max_dist: the float32 search length in mm as a Python float.
    """
    p, t = endpoint_tangents(tracks)
    p, t = p.reshape(-1, 3), t.reshape(-1, 3)
    ok = np.all(np.isfinite(p), axis=1)
    start = _round_half_away(_apply_affine(vol.scanner2voxel, np.where(ok[:, None], p, 0.0)))
    inside = ok & np.all((start >= 0) & (start < np.asarray(vol.shape)), axis=1)
    own = np.where(inside, _lookup(vol, start), 0)
    nodes = own.copy()
    todo = np.flatnonzero(inside & (own == 0))
    if todo.size:
        table = _offset_table(vol, max_dist)
        step = max(1, _BLOCK_ELEMENTS // max(table.shape[0], 1))
        for b in range(0, todo.size, step):
            idx = todo[b : b + step]
            nodes[idx] = _search_block(vol, p[idx], t[idx], start[idx], table, max_dist)
    return nodes.reshape(-1, 2)
