"""The MoE as one cuBLAS GEMM per expert, for prefills of many rows an expert.

    out = per_expert_moe(x, w_gate_up, w_down, topk_ids, topk_weights)   # fused_moe's signature

At a few hundred rows an expert and up, each expert's two projections are ordinary GEMMs that cuBLAS
runs near the matmul rate whatever the routing's unevenness (an expert of 700 rows beside one of 300 is
two GEMMs of their own sizes, where a grouped kernel pads each expert's tail to its block and runs the
tails' tiles beside the full ones). What it pays instead: the experts' row counts on the host (one
synchronisation a call; the slices' bounds are host numbers, so it cannot be captured in a CUDA graph),
and the intermediates through memory: the gathered rows, ``h [T*k, 2F]``, ``a [T*k, F]`` and
``y [T*k, H]`` once each (at Mixtral's size and 2048 tokens about 0.9 GB, some 0.2 ms against 1.8 ms of
matmul). So it pays only where the GEMMs are long: ``pays`` says where, from measurements
(docs/kernels.md, "One cuBLAS GEMM per expert"). vLLM and SGLang run a grouped Triton kernel at every
size; TensorRT-LLM grouped CUTLASS GEMMs; this is the plain loop, kept for where it measured faster.

One launch each besides the GEMMs: the sort by expert (torch), the row gather (torch ``index_select``),
SiLU(gate) * up * gate weight (``silu_mul_kernel``: the gate weights applied before the down GEMM, which
is linear, so the k-way combine after it is a plain sum) and the combine (``combine_kernel``, reading
y in expert order).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import combine_sum

# Rows an expert from which the per-expert GEMMs beat the grouped kernels, by device name (the mean over
# the experts, tokens * k / E): measured on each device (docs/kernels.md). A device not named here keeps
# the grouped kernels at every size. MOEGPS_PER_EXPERT_ROWS=N sets N for every device, the CPU included
# (where the torch fallbacks below run: how the tests take the engine through this path); =off: never.
MIN_ROWS: dict[str, int] = {}


def min_rows(device: torch.device) -> int | None:
    """The rows an expert from which ``pays`` picks this path on ``device`` (None: never)."""
    forced = os.environ.get("MOEGPS_PER_EXPERT_ROWS")
    if forced is not None:
        if forced == "off":
            return None
        if not forced.isdigit():
            raise ValueError(f"MOEGPS_PER_EXPERT_ROWS must be a whole number of rows or 'off', got {forced!r}")
        return int(forced)
    return MIN_ROWS.get(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def pays(n_tokens: int, n_experts: int, top_k: int, device: torch.device) -> bool:
    """Whether ``per_expert_moe`` is the faster call for this many tokens on this device; never while a CUDA
    graph is being captured (it reads the experts' row counts on the host)."""
    least = min_rows(device)
    if least is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    return n_tokens * top_k >= least * n_experts


@triton.jit
def silu_mul_kernel(h_ptr, w_ptr, a_ptr, F_DIM, BLOCK_F: tl.constexpr):
    """a[r, f tile] = silu(h[r, f]) * h[r, F + f] * w[r], in fp32, rounded once. h [R, 2F] (gate columns,
    then up columns) and a [R, F] contiguous, w [R]; grid (R, cdiv(F, BLOCK_F))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = offs < F_DIM
    gate = tl.load(h_ptr + row * 2 * F_DIM + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * F_DIM + F_DIM + offs, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(w_ptr + row).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up * weight
    tl.store(a_ptr + row * F_DIM + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


def _triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def silu_mul(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``h [R, 2F]`` (gate, then up), ``weights [R]`` -> ``silu(gate) * up * weights [R, F]`` in h's dtype."""
    rows, ffn = h.shape[0], h.shape[1] // 2
    if not _triton(h):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        g, u = h.to(acc).chunk(2, dim=-1)
        return (F.silu(g) * u * weights.to(acc)[:, None]).to(h.dtype)
    a = torch.empty(rows, ffn, dtype=h.dtype, device=h.device)
    if rows:
        block_f = min(2048, triton.next_power_of_2(ffn))
        silu_mul_kernel[(rows, triton.cdiv(ffn, block_f))](h, weights.contiguous(), a, ffn, BLOCK_F=block_f,
                                                            num_warps=8 if block_f >= 2048 else 4)
    return a


def per_expert_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``fused_moe``'s call (x [T, H], w_gate_up [E, 2F, H], w_down [E, H, F], topk_ids and topk_weights
    [T, k]; ``config`` ignored) -> [T, H] in x's dtype, each expert's rows through two GEMMs of their own.
    The k outputs of a token are added in fp32 (float64 for float64 inputs) and rounded once."""
    n_tokens, hidden = x.shape
    n_experts, top_k = w_gate_up.shape[0], topk_ids.shape[1]
    ffn = w_down.shape[2]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)           # [T*k] pairs in expert order
    counts = torch.bincount(flat, minlength=n_experts).tolist()  # the call's one host synchronisation
    rows = x.index_select(0, order // top_k)           # [T*k, H] the token rows in expert order
    h = torch.empty(len(flat), 2 * ffn, dtype=x.dtype, device=x.device)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    for expert, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        if end > start:
            torch.mm(rows[start:end], w_gate_up[expert].T, out=h[start:end])
    a = silu_mul(h, topk_weights.reshape(-1)[order])
    y = torch.empty(len(flat), hidden, dtype=x.dtype, device=x.device)
    for expert, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        if end > start:
            torch.mm(a[start:end], w_down[expert].T, out=y[start:end])
    slots = torch.empty_like(order)
    slots[order] = torch.arange(len(flat), device=x.device)  # pair p's row of y
    if _triton(y):
        return combine_sum(y, top_k, slots=slots)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y.index_select(0, slots).view(n_tokens, top_k, hidden).to(acc).sum(1).to(x.dtype)
