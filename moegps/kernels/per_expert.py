"""The expert FFN as library GEMMs, one per expert and projection: a prefill path for wide experts.

At compute-bound sizes (hundreds of rows per expert) the vendor's dense GEMM (cuBLAS, wgmma with
warp specialisation) runs at 95-100% of the matmul rate, where moegps's Triton grouped GEMMs reach
75-90% on Hopper (docs/kernels.md). This path uses it:

    rows = x[tokens sorted by expert]              one gather
    h_e = rows_e @ w_gate_up[e]^T                  one GEMM per expert that has rows
    a = silu(h[:, :F]) * h[:, F:] * gate           one launch (silu_mul_kernel), gate folded in here
    y_e = a_e @ w_down[e]^T                        one GEMM per expert
    out[t] = sum_j y[row of (t, j)]                one launch (combine_kernel, indexed)

The price is one host synchronisation (each expert's row count sizes its GEMM): the path cannot be
captured in a CUDA graph and leaves the GPU idle while the host launches the next kernels, so it
serves prefill, where a layer's GEMMs take milliseconds; decode keeps the Triton kernels. Each
expert's GEMM costs a launch, so it pays only for few, wide experts (the engine's choice:
``moegps.engine.model.PER_EXPERT_MIN_ROWS``, measured in the kernels benchmark's `experts` column).
The order of operations is transformers' eager expert loop; the gate folded into the activation
before the down projection (it is linear) is vLLM's and SGLang's.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .launch import _check, combine_sum


@triton.jit
def silu_mul_kernel(h_ptr, gate_ptr, out_ptr, F, BLOCK_F: tl.constexpr):
    """out[r, f] = silu(h[r, f]) * h[r, F + f] * gate[r] in fp32, rounded once. h [R, 2F],
    gate [R], out [R, F], contiguous; grid (R, cdiv(F, BLOCK_F))."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = offs < F
    g = tl.load(h_ptr + r * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + r * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(gate_ptr + r).to(tl.float32)
    act = g / (1.0 + tl.exp(-g)) * u * w
    tl.store(out_ptr + r * F + offs, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h [R, 2F]`` (gate projection then up projection), ``gate [R]`` -> ``[R, F]`` in h's dtype."""
    rows, two_ffn = h.shape
    ffn = two_ffn // 2
    out = torch.empty(rows, ffn, dtype=h.dtype, device=h.device)
    if rows:
        block_f = min(2048, triton.next_power_of_2(ffn))
        silu_mul_kernel[(rows, triton.cdiv(ffn, block_f))](h.contiguous(), gate.contiguous(), out, ffn,
                                                           BLOCK_F=block_f, num_warps=8 if block_f >= 2048 else 4)
    return out


def expert_rows(topk_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, list[int]]:
    """``topk_ids [T, k]`` -> (order [T*k] int64: the (token, slot) pairs sorted by expert, stably;
    counts: each expert's number of pairs, on the host). The one host synchronisation of the path."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts.tolist()


def moe_per_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Same contract as ``fused_moe`` (x [T, H], w_gate_up [E, 2F, H], w_down [E, H, F], topk_ids and
    topk_weights [T, k] -> [T, H] in x's dtype); the GEMMs are torch.mm's, so it runs on any device.
    `config` is accepted (and ignored) so that the paths are interchangeable."""
    n_tokens, hidden, n_experts, ffn, top_k = _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    if n_tokens == 0:
        return torch.zeros_like(x)
    order, counts = expert_rows(topk_ids, n_experts)
    rows = x.index_select(0, order // top_k)
    n_pairs = order.numel()
    h = torch.empty(n_pairs, 2 * ffn, dtype=x.dtype, device=x.device)
    bounds = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, itertools.accumulate(counts))) if n]
    for e, start, end in bounds:
        torch.mm(rows[start:end], w_gate_up[e].T, out=h[start:end])
    act = silu_mul(h, topk_weights.reshape(-1).index_select(0, order).float())
    del h
    y = torch.empty(n_pairs, hidden, dtype=x.dtype, device=x.device)
    for e, start, end in bounds:
        torch.mm(act[start:end], w_down[e].T, out=y[start:end])
    position = torch.empty_like(order)  # the sorted row of each (token, slot) pair
    position[order] = torch.arange(n_pairs, device=x.device)
    return combine_sum(y, top_k, rows=position)
