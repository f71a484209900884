"""Tracking metadata in ``.trk`` and ``.trx`` files: what a ``.tck`` header keeps.

A ``.tck`` stores the tracking parameters and command line as ``key: value`` header lines and
the seeds in a separate ``-output_seeds`` file. The other formats carry the same:

* ``.trk``: the header lines (``step_size: 0.2``, ..., ``command_history: ...``) as text in
  the TrackVis header's 444-byte ``reserved`` field (command line last, cut with ``...`` if
  it does not fit), and per streamline ``seed_point`` (``[3]``, scanner mm) and
  ``seed_index`` (the seed's vertex) as TrackVis properties.
* ``.trx``: the header lines as a ``TRACKING`` object in ``header.json`` (every key, in
  full), ``seed_point`` / ``seed_index`` as data per streamline, and a group ``tracking``
  holding every streamline whose data per group are the numeric parameters
  (``step_size``, ``max_angle``, ``threshold``, ``min_dist``, ``max_dist``, ``init_direction``
  ..., float32 ``[1, k]``), so TRX tools that merge files keep each run's parameters.

:func:`read_tracking_metadata` reads them back from either.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "TRK_TEXT_BYTES",
    "TRX_HEADER_KEY",
    "per_streamline_seeds",
    "read_tracking_metadata",
    "trk_header_fields",
    "trx_header_fields",
    "trx_group_fields",
    "TRX_GROUP",
]

#: size of the TrackVis header's free ``reserved`` field
TRK_TEXT_BYTES = 444
#: the ``header.json`` key holding the tracking header in a ``.trx``
TRX_HEADER_KEY = "TRACKING"
#: the ``.trx`` group of the streamlines of one tracking run
TRX_GROUP = "tracking"
_LAST = ("command_history",)  # long values written last (.trk cuts what does not fit)


def per_streamline_seeds(seed_points: np.ndarray, seed_index: np.ndarray) -> dict:
    """``data_per_streamline`` entries: ``seed_point`` ``[S, 3]`` float32 (scanner mm) and
    ``seed_index`` ``[S, 1]`` float32 (index of the seed vertex within each streamline)."""
    pts = np.asarray(seed_points, np.float32).reshape(-1, 3)
    idx = np.asarray(seed_index, np.float32).reshape(-1, 1)
    if pts.shape[0] != idx.shape[0]:
        raise ValueError(f"{pts.shape[0]} seed points but {idx.shape[0]} seed indices")
    return {"seed_point": pts, "seed_index": idx}


def _ordered(header: dict) -> list[tuple[str, str]]:
    items = sorted((str(k), str(v)) for k, v in header.items())
    return [kv for kv in items if kv[0] not in _LAST] + [kv for kv in items if kv[0] in _LAST]


def trk_header_fields(header: dict | None) -> dict:
    """``{"reserved": bytes}``: the header as ``key: value`` lines (UTF-8, at most
    :data:`TRK_TEXT_BYTES` bytes; a line that does not fit is cut and ends in ``...``)."""
    if not header:
        return {}
    text = "".join(f"{k}: {v}\n" for k, v in _ordered(header)).encode("utf-8")
    if len(text) > TRK_TEXT_BYTES:
        text = text[: TRK_TEXT_BYTES - 3] + b"..."
    return {"reserved": text}


def trx_header_fields(header: dict | None) -> dict:
    """``{TRX_HEADER_KEY: {key: value}}`` for ``header.json`` (strings, in full)."""
    return {TRX_HEADER_KEY: {k: v for k, v in _ordered(header)}} if header else {}


def _numbers(value: str) -> np.ndarray | None:
    """``[1, k]`` float32 of a header value made of numbers (``"0.2"``, ``"1,0,0"``), else None."""
    tokens = str(value).replace(",", " ").split()
    try:
        out = np.array([[float(t) for t in tokens]], dtype=np.float32)
    except ValueError:
        return None
    return out if tokens and np.all(np.isfinite(out)) else None


def trx_group_fields(header: dict | None, n_streamlines: int) -> tuple[dict, dict]:
    """``(groups, data_per_group)`` for a ``.trx``: the group :data:`TRX_GROUP` (all
    ``n_streamlines`` indices, uint32) and its numeric header entries (``[1, k]`` float32)."""
    if not header or n_streamlines == 0:
        return {}, {}
    values = {k: _numbers(v) for k, v in _ordered(header)}
    dpg = {k: v for k, v in values.items() if v is not None}
    groups = {TRX_GROUP: np.arange(n_streamlines, dtype=np.uint32)}
    return groups, ({TRX_GROUP: dpg} if dpg else {})


def _parse_lines(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key] = value
    return out


def read_tracking_metadata(path: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """``(header, per_streamline)`` stored in a ``.trk`` or ``.trx`` written by invtract.

    Returns:
        The tracking header (``{}`` when none) and the data per streamline (``seed_point``
        ``[S, 3]``, ``seed_index`` ``[S, 1]`` when present).
    """
    path = str(path)
    if path.lower().endswith(".trx"):
        import trx.trx_file_memmap as tmm

        trx = tmm.load(path)
        try:
            header = dict(trx.header.get(TRX_HEADER_KEY, {}))
            data = {k: np.array(v) for k, v in trx.data_per_streamline.items()}
        finally:
            trx.close()
        return header, data
    import nibabel as nib

    f = nib.streamlines.load(path)
    raw = f.header.get("reserved", b"")
    text = raw.rstrip(b"\0").decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    data = {k: np.asarray(v) for k, v in f.tractogram.data_per_streamline.items()}
    return _parse_lines(text), data
