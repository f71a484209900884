"""Run folders: TensorBoard events, ``metrics.jsonl``, JSON/text records, all written safely.

A :class:`RunLogger` owns ``runs/NAME/``; :func:`invtract.fit.optimise.fit` receives one and
never creates writers itself. TensorBoard goes through ``torch.utils.tensorboard`` (no
TensorFlow needed) into ``<run>/tb``. On resume, ``purge_step`` drops events and metric lines
from the interrupted tail so the folder reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_text, check_writable_dir

__all__ = [
    "RunLogger",
    "append_command",
    "resolve_run_dir",
    "atomic_write_text",
    "bundle_figure",
    "strict_json",
    "versions",
]


def resolve_run_dir(run: str | os.PathLike | None, root: str | os.PathLike = "runs") -> Path:
    """``runs/NAME`` for a bare name, the path itself for a path, a timestamped name if None."""
    if run is None:
        return Path(root) / time.strftime("%Y%m%d-%H%M%S_fit")
    s = str(run)
    if os.sep in s or "/" in s or s.startswith("."):
        return Path(s)
    return Path(root) / s


def _jsonable(v):
    """``v`` with non-finite floats as None and numpy / torch scalars as Python numbers."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def strict_json(obj, **kwargs) -> str:
    """JSON text of ``obj`` with NaN / Infinity written as null (valid, strict JSON)."""
    return json.dumps(_jsonable(obj), allow_nan=False, **kwargs)


def versions() -> dict:
    """Python, platform, package versions and the git commit of this checkout."""
    import importlib.metadata as md
    import subprocess

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("invtract", "torch", "numpy", "scipy", "nibabel", "dipy", "tensorboard", "optuna"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout.strip()  # fmt: skip
        out["git_sha"] = sha or None
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = None
    return out


def append_command(
    run_dir: str | os.PathLike, argv: list, name: str = "command.txt", *, timestamp: bool = False
) -> Path:
    """Append one command line (``argv`` joined by spaces) to ``run_dir/name``, flushed.

    With ``timestamp`` the line starts with the local time (``YYYY-mm-ddTHH:MM:SS`` and a tab).
    The run folders of ``fit`` (``command.txt``) and ``calibrate`` (``commands.txt``) both
    record their command lines here.
    """
    path = Path(run_dir) / name
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S") + "\t" if timestamp else ""
    with open(path, "a", encoding="utf-8") as f:
        f.write(stamp + " ".join(str(a) for a in argv) + "\n")
        f.flush()
    return path


class RunLogger:
    """Writer for one run folder.

    Args:
        run_dir: the run folder (created).
        tensorboard: write TensorBoard events under ``run_dir/tb``.
        purge_step: resuming: drop TensorBoard events and ``metrics.jsonl`` lines at or after
            this iteration (the ones the interrupted run wrote after its last checkpoint).
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = True, purge_step=None
    ) -> None:
        self.run_dir = check_writable_dir(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if purge_step is not None:
            self.truncate_metrics(int(purge_step))
        self.writer = None
        if tensorboard:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    # -- scalars / metrics ----------------------------------------------------------------------
    def scalars(self, step: int, values: dict) -> None:
        """``add_scalar(tag, value, step)`` for every finite number in ``values``."""
        if self.writer is None:
            return
        for tag, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.writer.add_scalar(tag, float(v), step)

    def metrics(self, record: dict) -> None:
        """Append one JSON line to ``metrics.jsonl`` (flushed)."""
        line = strict_json(record)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def truncate_metrics(self, keep_below: int) -> None:
        """Keep only metric lines whose ``iteration`` is below ``keep_below``."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("iteration", -1)) < keep_below:
                    keep.append(line)
            except (ValueError, json.JSONDecodeError):
                continue
        atomic_write_text(self.metrics_path, "".join(x + "\n" for x in keep))

    # -- histograms / images --------------------------------------------------------------------
    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None and np.asarray(values).size:
            self.writer.add_histogram(tag, np.asarray(values, np.float64), step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=True)
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """One ``add_hparams`` record (HPARAMS tab), in the run's own event file."""
        if self.writer is None:
            return
        hp = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in hparams.items()
        }
        mt = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        self.writer.add_hparams(hp, mt, run_name=".")

    # -- files ----------------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> Path:
        path = self.run_dir / name
        atomic_write_text(path, strict_json(obj, indent=2) + "\n")
        return path

    def record_run(self, config_toml: str, argv: list, resume: bool) -> None:
        """``config.toml``, ``command.txt`` and ``versions.json`` of a new run; a resumed run
        appends its command line to ``command.txt`` and keeps the rest."""
        if resume:
            append_command(self.run_dir, argv)
            return
        self.write_text("config.toml", config_toml)
        self.write_text("command.txt", " ".join(argv) + "\n")
        self.write_json("versions.json", versions())

    def write_text(self, name: str, text: str) -> Path:
        path = self.run_dir / name
        atomic_write_text(path, text)
        return path

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WriterLogger:
    """Adapter: a bare ``SummaryWriter`` (e.g. an Optuna trial's) used as a :class:`RunLogger`."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def scalars(self, step: int, values: dict) -> None:
        for tag, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.writer.add_scalar(tag, float(v), step)

    def metrics(self, record: dict) -> None:
        pass

    def histogram(self, tag, values, step) -> None:
        pass

    def figure(self, tag, fig, step) -> None:
        import matplotlib.pyplot as plt

        plt.close(fig)

    def flush(self) -> None:
        pass


def bundle_figure(target: list, tracked: list, title: str = "", *, density: bool = False):
    """Matplotlib figure: axial (x-y) and coronal (x-z) projections, target grey vs tracked.

    Args:
        target, tracked: lists of ``[n, 3]`` arrays (mm).
        title: figure title.
        density: draw 2-D vertex-density maps (target | tracked) instead of lines.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=80)
    allp = np.concatenate([np.asarray(s) for s in (target + tracked)] or [np.zeros((1, 3))])
    lo, hi = allp.min(0) - 1, allp.max(0) + 1
    for ax, (i, j, name) in zip(axes, ((0, 1, "x-y"), (0, 2, "x-z"))):
        if density:
            rng = [[lo[i], hi[i]], [lo[j], hi[j]]]
            a = np.concatenate(target or [np.zeros((0, 3))])
            b = np.concatenate(tracked or [np.zeros((0, 3))])
            ha, *_ = np.histogram2d(a[:, i], a[:, j], bins=48, range=rng)
            hb, *_ = np.histogram2d(b[:, i], b[:, j], bins=48, range=rng)
            img = np.stack([ha / max(ha.max(), 1), hb / max(hb.max(), 1), 0 * ha], -1)
            ax.imshow(img.transpose(1, 0, 2), origin="lower", extent=(*rng[0], *rng[1]))
            ax.set_title(f"{name}: density (red target, green fitted)")
        else:
            for s in target:
                ax.plot(s[:, i], s[:, j], color="0.5", lw=0.8, alpha=0.7)
            for s in tracked:
                ax.plot(s[:, i], s[:, j], color="tab:red", lw=0.6, alpha=0.8)
            ax.set_title(f"{name}: target (grey) vs tracked (red)")
            ax.set_xlim(lo[i], hi[i])
            ax.set_ylim(lo[j], hi[j])
        ax.set_aspect("equal")
        ax.set_xlabel("xyz"[i] + " (mm)")
        ax.set_ylabel("xyz"[j] + " (mm)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
