"""Process groups with timeouts, and a launcher for tests: one obvious place for torch.distributed setup.

``init()`` works three ways with the same code: under ``torchrun`` (env RANK/WORLD_SIZE set; NCCL on
GPUs, gloo on CPUs), under :func:`spawn` (tests: gloo on CPU, a free port), and with no launcher at
all (one rank, no process group, no communication). Every group gets a timeout, so a collective
whose peer died fails with an error instead of waiting forever.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


@dataclass
class Comm:
    """Who this process is: ``rank`` of ``world`` on ``device``; ``group`` is None for one rank."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def max_over_ranks(self, value: float) -> float:
        """The largest ``value`` over ranks (wall time of a step is its slowest rank's)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def sum_over_ranks(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, group=self.group)
        return float(t.item())


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> Comm:
    """Join the process group described by the environment (torchrun), or return a one-rank Comm.

    ``backend``: None = NCCL when CUDA is available, else gloo. ``device``: None = ``cuda:LOCAL_RANK``
    when CUDA is available, else CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    cuda = torch.cuda.is_available() and device != "cpu"
    if device is None:
        dev = torch.device(f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if cuda else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return Comm(0, 1, dev, "none", None)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
    return Comm(rank, world, dev, backend, dist.group.WORLD)


def shutdown(comm: Comm) -> None:
    if comm.distributed and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now (bind to 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, fn: Callable, world: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # world processes share a few cores; threads would oversubscribe them
    comm = init("gloo", timeout_s=timeout_s, device="cpu")
    try:
        fn(comm, *args)
    finally:
        shutdown(comm)


def spawn(fn: Callable, world: int, *args, timeout_s: float = 30.0) -> None:
    """Run ``fn(comm, *args)`` in ``world`` CPU processes joined by gloo (tests, CPU experiments).

    ``fn`` must be importable by name (module level). If any rank raises, the others are
    terminated and ``torch.multiprocessing.ProcessRaisedException`` carries that rank's traceback;
    a rank stuck in a collective whose peer is gone fails after ``timeout_s``.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    # forkserver: torch is imported once by the server and every rank forks from it, which is several
    # times cheaper than a fresh interpreter per rank, and unlike a plain fork it inherits no threads
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "moegps.executor.layer"])
    mp.start_processes(_spawned, args=(fn, world, free_port(), timeout_s, args), nprocs=world,
                       join=True, start_method="forkserver")
