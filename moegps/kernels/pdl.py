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


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream, then let the next one be scheduled (no-op
    without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: a GPU of compute capability 9.0 or
    later, unless the environment sets ``MOEGPS_PDL=0`` (read at every launch, so a benchmark can
    time both in one process: a CUDA graph keeps the launches of its capture)."""
    return (t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("MOEGPS_PDL", "1") != "0" and _capable(t.device.index or 0))


def launch_flags(t: torch.Tensor) -> dict:
    """Keyword arguments of a kernel launch on ``t``'s device: the kernel's ``PDL`` flag and
    Triton's ``launch_pdl`` option, or nothing (both default to off)."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {}
