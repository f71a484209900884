"""The ``torch`` engine: :func:`invtract.tracking.tracker.track_torch` (any torch device).

The plain PyTorch reference implementation of SD_Stream; it imports no numba. With ``act``
(an :class:`~invtract.tracking.act.ActImage`) :func:`invtract.tracking.act_torch.track_torch_act`
tracks with MRtrix's ACT rules.
"""

from __future__ import annotations

from ..tracker import track_torch, track_torch_peaks

__all__ = ["track", "track_peaks"]

#: the "record peaks" mode (:func:`~invtract.tracking.tracker.track_torch_peaks`): any device,
#: float32 or float64, ``refine``
track_peaks = track_torch_peaks


def track(field, seeds, init_dirs, params, rois=None, batch_size=4096, progress=None, act=None):
    """:func:`~invtract.tracking.tracker.track_torch`, or with ``act`` the ACT tracker."""
    if act is None:
        return track_torch(field, seeds, init_dirs, params, rois, batch_size, progress)
    from ..act_torch import track_torch_act

    out = track_torch_act(field, seeds, init_dirs, params, act, rois, batch_size)
    if progress is not None:
        progress(int(out.status.shape[0]))
    return out
