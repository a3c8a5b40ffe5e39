"""Programmatic dependent launch (PDL): each kernel is launched while the one before it drains.

On Hopper and later, a kernel launched with PDL may be scheduled before the kernel ahead of it in
the stream has ended (once each of that kernel's programs has ended or executed
``griddepcontrol.launch_dependents``); it blocks at ``griddepcontrol.wait`` until that kernel
has finished and its writes are visible. Inside a CUDA graph the launches become programmatic
edges. A decode step is a chain of some 300 short launches, and each boundary costs the next
kernel's launch; with PDL that overlaps the previous kernel's last programs. Learned from CUDA's
programming guide ("Programmatic Dependent Launch") and from SGLang and FlashInfer, which launch
their decode kernels this way.

Every kernel that takes a ``PDL`` flag calls :func:`wait_for_predecessor` before it reads anything
an earlier kernel writes, and before any write, so reads and writes keep plain stream order (each
earlier kernel finished before its successor's wait returned). None releases its successor early:
releasing right after the wait (``launch_dependents``) made an H200's decode step 1-9% slower and
a chain of projections 21% slower, where waiting only was 0.6% faster on the step and 1-10% on the
chain (benchmarks/engine/h200-2026-12-04; benchmarks/engine/NOTES.md, session e).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has finished (no-op without PDL)."""
    if PDL:
        gdc_wait()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: a GPU of compute capability 9.0 or later,
    unless ``$MOEGPS_PDL`` is "0" (read at every launch, so a benchmark can time both in one
    process: a CUDA graph keeps the launches of its capture)."""
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("MOEGPS_PDL", "1") == "0":
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_flags(t: torch.Tensor) -> dict:
    """Keyword arguments of a kernel launch on ``t``'s device: the kernel's ``PDL`` flag and Triton's
    ``launch_pdl`` option, or nothing (both default to off)."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {}
