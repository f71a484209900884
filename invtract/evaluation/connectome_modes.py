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

Every mode works on all streamlines at once (numpy, no per-streamline Python loop): the
reverse search by binary search in the sorted indices of labelled vertices, the all-voxels
lists as packed arrays (:func:`all_voxel_flat`, :func:`packed_pairs`), the forward search in
lock step over all endpoints (:mod:`invtract.evaluation.connectome_forward`).
"""

from __future__ import annotations

import numpy as np

from .connectome import LabelVolume, point_labels
from .connectome_forward import forward_search_nodes
from .tracks import Packed

__all__ = [
    "reverse_search_nodes",
    "forward_search_nodes",
    "all_voxel_nodes",
    "all_voxel_flat",
    "split_lists",
    "pack_lists",
    "packed_pairs",
    "node_list_pairs",
    "segment_norms",
]


def segment_norms(points: np.ndarray) -> np.ndarray:
    """``[P - 1]`` float32 norms of consecutive differences, ``sqrt(x^2 + (y^2 + z^2))``.

    The order of Eigen's ``Vector3f::norm`` in the 3.0.3 build (see ``mrtrix_lengths``).
    """
    pts = np.asarray(points, dtype=np.float32)
    d = pts[1:] - pts[:-1]
    return np.sqrt(d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]))


def _walk_exceeds(
    points: np.ndarray, start: np.ndarray, step: int, count: np.ndarray, max_dist: float
) -> np.ndarray:
    """Whether a walk of ``count [R]`` segments from segment ``start`` (segment i joins
    vertices i and i + 1; ``step`` = +1 or -1) passes ``max_dist``: the float64 running sum
    of the float32 segment lengths (:func:`segment_norms`), added one by one, exceeds it.

    Only the walked segments are measured. Rows are processed sorted by ``count`` in blocks
    as wide as their longest walk, so one long streamline does not pad every row.
    """
    out = np.zeros(count.shape[0], dtype=bool)
    order = np.argsort(count, kind="stable")
    block = 4096
    for b in range(0, order.size, block):
        rows = order[b : b + block]
        width = int(count[rows[-1]])
        if width == 0:
            continue
        cols = np.arange(width)
        valid = cols[None, :] < count[rows, None]
        where = np.where(valid, start[rows, None] + step * cols[None, :], 0)
        d = points[where + 1] - points[where]  # [R, width, 3] float32
        seg = np.sqrt(d[..., 0] * d[..., 0] + (d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]))
        walked = np.where(valid, seg, np.float32(0)).astype(np.float64)
        out[rows] = (np.cumsum(walked, axis=1) > max_dist).any(axis=1)
    return out


def reverse_search_nodes(vol: LabelVolume, tracks: Packed, max_dist: float) -> np.ndarray:
    """``[S, 2]`` nodes by reverse search (``-assignment_reverse_search max_dist``).

    All streamlines at once: the first labelled vertex of each end's half is found by a
    binary search in the sorted indices of labelled vertices; only ends found beyond their
    first vertex walk their segments (when ``max_dist`` > 0).

    Args:
        vol: the parcellation.
        tracks: streamlines, scanner mm.
        max_dist: the float32 search length in mm as a Python float (0: up to the midpoint).
    """
    labels = point_labels(vol, tracks.points)
    n, first = tracks.lengths, tracks.first
    out = np.zeros((len(tracks), 2), dtype=np.int64)
    hits = np.flatnonzero(labels > 0)
    if hits.size == 0:
        return out
    last = first + n - 1
    # first end: vertices first .. first + (n + 1) // 2 - 1, walked forwards
    k = np.minimum(np.searchsorted(hits, first), hits.size - 1)
    at = hits[k]
    found = (n > 0) & (at >= first) & (at < first + (n + 1) // 2)
    # last end: vertices last down to last - (n - 1 - n // 2) + 1, walked backwards
    k2 = np.searchsorted(hits, last, side="right") - 1
    at2 = hits[np.maximum(k2, 0)]
    found2 = (n > 0) & (k2 >= 0) & (at2 <= last) & (at2 > last - (n - 1 - n // 2))
    if max_dist:
        pts = np.asarray(tracks.points, dtype=np.float32)
        walk = np.flatnonzero(found & (at > first))
        found[walk] &= ~_walk_exceeds(pts, first[walk], 1, at[walk] - first[walk], max_dist)
        walk = np.flatnonzero(found2 & (at2 < last))
        steps = last[walk] - at2[walk]
        found2[walk] &= ~_walk_exceeds(pts, last[walk] - 1, -1, steps, max_dist)
    out[:, 0] = np.where(found, labels[at], 0)
    out[:, 1] = np.where(found2, labels[at2], 0)
    return out


def all_voxel_flat(vol: LabelVolume, tracks: Packed) -> tuple[np.ndarray, np.ndarray]:
    """All-voxels nodes packed: ``(nodes [M] int64, counts [S] int64)``.

    Streamline s owns ``nodes[sum(counts[:s]) : sum(counts[:s + 1])]``: the sorted distinct
    labels (> 0) of the voxels holding its vertices.
    """
    labels = point_labels(vol, tracks.points)
    owner = np.repeat(np.arange(len(tracks), dtype=np.int64), tracks.lengths)
    keep = labels > 0
    owner, labels = owner[keep], labels[keep]
    if labels.size:  # vertices in a row mostly share a voxel: drop repeats first
        change = np.concatenate([[True], (labels[1:] != labels[:-1]) | (owner[1:] != owner[:-1])])
        owner, labels = owner[change], labels[change]
    width = vol.n_nodes + 1
    if len(tracks) * width <= 8 * labels.size + (1 << 16):  # few nodes: mark a dense table
        return _distinct_dense(owner, labels, len(tracks), width)
    key = np.unique(owner * width + labels)  # sorted by streamline, then label
    counts = np.bincount(key // width, minlength=len(tracks)).astype(np.int64)
    return key % width, counts


def _distinct_dense(owner, labels, S: int, width: int, block: int = 1 << 22):
    """:func:`all_voxel_flat`'s sorted distinct labels per streamline from a ``[S, width]``
    table of marks, filled and read ``block`` entries at a time."""
    rows = max(1, block // width)
    cuts = np.searchsorted(owner, np.arange(0, S + rows, rows))
    nodes, counts = [], np.zeros(S, dtype=np.int64)
    for b, (lo, hi) in enumerate(zip(cuts[:-1].tolist(), cuts[1:].tolist())):
        first = b * rows
        n = min(rows, S - first)
        if n <= 0:
            break
        marks = np.zeros((n, width), dtype=bool)
        marks[owner[lo:hi] - first, labels[lo:hi]] = True
        counts[first : first + n] = np.count_nonzero(marks, axis=1)
        nodes.append(np.nonzero(marks)[1])
    return (np.concatenate(nodes) if nodes else np.zeros(0, np.int64)), counts


def split_lists(nodes: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``S`` arrays (views of ``nodes``) from the packed form of :func:`all_voxel_flat`."""
    ends = np.cumsum(counts).tolist()
    return [nodes[b - c : b] for b, c in zip(ends, counts.tolist())]


def pack_lists(lists) -> tuple[np.ndarray, np.ndarray]:
    """``(nodes [M] int64, counts [S] int64)``: node arrays packed, the inverse of
    :func:`split_lists`."""
    counts = np.fromiter((np.size(n) for n in lists), dtype=np.int64, count=len(lists))
    if not counts.sum():
        return np.zeros(0, np.int64), counts
    return np.concatenate([np.asarray(n, np.int64).ravel() for n in lists]), counts


def all_voxel_nodes(vol: LabelVolume, tracks: Packed) -> list[np.ndarray]:
    """Sorted distinct labels (> 0) of the voxels holding each streamline's vertices.

    Returns:
        ``S`` int64 arrays (possibly empty), one per streamline.
    """
    return split_lists(*all_voxel_flat(vol, tracks))


def node_list_pairs(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The edges each streamline's node list adds to, in MRtrix's order.

    Returns:
        ``(pairs [E, 2] int64, owner [E] int64)``: every ``(list[i], list[j])`` with
        ``i <= j``; ``(0, a)`` for a single node; ``(0, 0)`` for none; ``owner`` is the
        streamline index of each edge.
    """
    return packed_pairs(*pack_lists(lists))


def packed_pairs(nodes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`node_list_pairs` of packed lists (:func:`all_voxel_flat`), without a loop.

    Each list becomes rows ``(left, right[...])``: a list of two or more nodes gives one row
    per node i, ``(list[i], list[i:])``; a single node a gives ``(0, [a])``; an empty list
    ``(0, [0])`` (so the right-hand sides are ``nodes`` with a 0 for each empty list).
    """
    S = counts.shape[0]
    width = np.maximum(counts, 1)
    ext = np.zeros(int(width.sum()), dtype=np.int64)
    ext[~np.repeat(counts == 0, width)] = nodes
    group = np.repeat(np.arange(S, dtype=np.int64), width)
    pos = np.arange(ext.size, dtype=np.int64)
    row_len = np.cumsum(width)[group] - pos  # from this node to its list's end
    left = np.where(counts[group] >= 2, ext, 0)
    row_start = np.cumsum(row_len) - row_len
    right = np.repeat(pos - row_start, row_len) + np.arange(int(row_len.sum()), dtype=np.int64)
    pairs = np.stack([np.repeat(left, row_len), ext[right]], axis=1)
    return pairs, np.repeat(group, row_len)
