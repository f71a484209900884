"""Data-parallel fitting on ``torch.distributed``: who this process is, and how ranks combine.

A fit's training seeds are sharded across ranks (:meth:`World.shard`); every rank tracks and
back-propagates its shard, with its loss scaled so that the sum over ranks is the
single-process loss, and the gradients are summed (:meth:`World.all_reduce_`) before the
optimiser step, which every rank takes identically. Rank 0 logs and writes checkpoints.

``invtract fit ... --nproc N`` starts N local processes (:func:`spawn`, backend gloo); under
``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...) is used as is
(:func:`from_environment`), gloo on CPU, NCCL with ``--device cuda``.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["World", "SINGLE", "from_environment", "spawn", "free_port"]


class World:
    """A rank of a process group (``size == 1``: a plain single-process fit)."""

    def __init__(self, rank: int = 0, size: int = 1, comm_device: str = "cpu") -> None:
        self.rank = int(rank)
        self.size = int(size)
        #: where collective buffers live (``cuda`` for NCCL, ``cpu`` for gloo)
        self.comm_device = torch.device(comm_device)

    @property
    def is_main(self) -> bool:
        """Whether this rank logs and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> np.ndarray:
        """Indices ``[n_r]`` of this rank's contiguous share of ``range(n)``."""
        return np.array_split(np.arange(n), self.size)[self.rank]

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks, in place (one flat buffer, float64)."""
        if self.size == 1 or not tensors:
            return
        import torch.distributed as dist

        dev = self.comm_device
        flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        a = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[a : a + n].reshape(t.shape).to(t.device, t.dtype))
            a += n

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks: a new tensor (no gradient), float64 on ``t``'s device
        (with one rank, ``t`` detached and cast)."""
        out = t.detach().to(torch.float64)
        if self.size == 1:
            return out
        import torch.distributed as dist

        flat = out.to(self.comm_device).clone()
        dist.all_reduce(flat)
        return flat.to(t.device)

    def sum(self, values: dict) -> dict:
        """``{key: float}`` summed over ranks, in rank order; a key missing on a rank counts
        as 0 there (rank 0 alone computes the parameter terms)."""
        if self.size == 1:
            return {k: float(v) for k, v in values.items()}
        import torch.distributed as dist

        parts: list = [None] * self.size
        dist.all_gather_object(parts, {k: float(v) for k, v in values.items()})
        keys = list(dict.fromkeys(k for p in parts for k in p))
        return {k: sum(p.get(k, 0.0) for p in parts) for k in keys}

    def box(self, a_lo: torch.Tensor, c_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(max over ranks of a_lo, min over ranks of c_hi)`` (0-d tensors; the ``margin``
        term's batch bounds)."""
        if self.size == 1:
            return a_lo, c_hi
        import torch.distributed as dist

        dev = self.comm_device
        t = torch.stack([a_lo.detach().to(dev).double(), -c_hi.detach().to(dev).double()])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].to(a_lo), (-t[1]).to(c_hi)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable):
        """``fn()`` computed on rank 0 alone and given to every rank (one broadcast; the value
        must pickle); an exception raised there is raised on every rank, so none waits."""
        if self.size == 1:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # every rank raises it
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


#: the single-process world
SINGLE = World(0, 1)


def from_environment(device: str = "cpu") -> World:
    """The world of a ``torchrun`` / :func:`spawn` process (initialising the default process
    group once), or :data:`SINGLE` when ``WORLD_SIZE`` is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:  # one GPU per local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), "cuda" if cuda else "cpu")


def free_port() -> int:
    """A free TCP port on this machine (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    import torch.distributed as dist

    try:
        code = fn(*args)
        _all_arrived(dist)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # leave without the interpreter's teardown: a rank that finished its work could abort in
    # C++ static destructors of the communication threads ("terminate called without an
    # active exception", SIGABRT: seen in CI after the fit had written its results)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def _all_arrived(dist) -> None:
    """Wait (at most a minute) until every rank has finished, so no rank tears the group (and
    rank 0's store) down while another still uses it."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:  # a rank that never arrives: tear down regardless
        pass


def spawn(fn: Callable, args: tuple, nproc: int) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes forming one gloo group (blocks).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank failed (its error re-raised).
    """
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(nproc, free_port(), fn, args), nprocs=nproc, start_method="spawn"
    )
