"""Programmatic dependent launch (PDL): a kernel is scheduled while the one before it drains.

On Hopper and later, a kernel launched with PDL may start once every program of the kernel
before it in the stream has executed ``griddepcontrol.launch_dependents`` (or ended); it then
blocks at ``griddepcontrol.wait`` until that kernel has finished and its writes are visible. A
decode step is a chain of short bandwidth-bound launches; with PDL each launch's scheduling and
ramp overlap the tail of the one before it, inside a CUDA graph as well (captured as
programmatic edges). Learned from CUDA's programming guide ("Programmatic Dependent Launch")
and from SGLang and FlashInfer, which launch their decode kernels this way.

Every kernel that takes a ``PDL`` flag calls :func:`wait_then_release` before its first load:
it waits for its predecessor, then lets its successor be scheduled. Waiting before releasing
keeps at most one kernel launched ahead of the running one, and since a kernel waits before
touching memory, the order of reads and writes is that of plain stream order: writes of any
earlier kernel are visible too (each earlier kernel finished before its successor's wait
returned).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


MODES = {"off": 0, "early": 1, "exit": 2}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """PDL 0: nothing. 1 ("early"): wait for the previous kernel in the stream, then let the next one
    be scheduled. 2 ("exit"): wait only; the next kernel is scheduled as this one's programs end."""
    if PDL >= 1:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def mode(t: torch.Tensor) -> int:
    """The PDL mode of kernels on ``t``'s device (MODES): ``$MOEGPS_PDL`` ("off", "early" or "exit",
    default "off"; read at every launch, so a benchmark can time each in one process: a CUDA graph
    keeps the launches of its capture) on a GPU of compute capability 9.0 or later, else off."""
    name = os.environ.get("MOEGPS_PDL", "off")
    if name not in MODES:
        raise ValueError(f"environment variable MOEGPS_PDL must be one of {sorted(MODES)}, got {name!r}")
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return MODES[name] if _capable(index) else 0


def launch_flags(t: torch.Tensor) -> dict:
    """Keyword arguments of a kernel launch on ``t``'s device: the kernel's ``PDL`` mode and
    Triton's ``launch_pdl`` option, or nothing (both default to off)."""
    pdl = mode(t)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {}
