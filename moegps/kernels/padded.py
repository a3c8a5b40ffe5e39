"""The MoE FFN of long prompts as cuBLAS batched GEMMs: tokens grouped by expert into a padded
``[E, capacity, H]`` batch (as GShard-style capacity batching does), two ``torch.bmm`` and one fused
SwiGLU between them.

At prefill sizes the expert GEMMs are compute-bound, and on an H200 cuBLAS's batched GEMM reaches
101% of the kernels' floor at 2048 Mixtral-8x7B tokens where the Triton kernels reach 85%
(``python -m moegps.kernels.bench --shapes mixtral-8x7b --tokens 2048``, bmm column). Padding costs
FLOPs in proportion to the imbalance, so the path is taken only when the busiest expert holds at most
``max_padding`` times the mean (``fused_moe`` otherwise); counting the tokens syncs with the host,
which a prefill can afford and a captured decode step cannot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import fused_moe


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, F, BLOCK: tl.constexpr):
    """``out[r] = silu(h[r, :F]) * h[r, F:]`` for row r = program 0, columns by program 1."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(h_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * F + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``h [..., 2F]`` -> ``silu(h[..., :F]) * h[..., F:]`` in one pass (torch takes three)."""
    F = h.shape[-1] // 2
    rows = h.numel() // (2 * F)
    out = torch.empty(*h.shape[:-1], F, dtype=h.dtype, device=h.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(F, block))](h.contiguous(), out, F, BLOCK=block, num_warps=4)
    return out


def moe_padded_bmm(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, max_padding: float = 1.25) -> torch.Tensor:
    """Same contract as ``fused_moe``/``moe_reference``: ``x [T, H]``, ``w_gate_up [E, 2F, H]`` (gate rows
    first), ``w_down [E, H, F]``, ``topk_ids/topk_weights [T, k]`` -> ``[T, H]`` in x's dtype."""
    T, H = x.shape
    E = w_gate_up.shape[0]
    k = topk_ids.shape[1]
    expert = topk_ids.reshape(-1).long()                      # [T k]
    counts = torch.bincount(expert, minlength=E)
    capacity = int(counts.max())                              # host sync
    if capacity * E > max_padding * T * k:
        return fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)
    order = expert.argsort(stable=True)                       # pairs grouped by expert
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(T * k, device=x.device) - first[expert[order]]
    slot = expert[order] * capacity + rank                    # row of each pair in [E * capacity]
    token = order // k
    grouped = x.new_zeros(E * capacity, H)
    grouped[slot] = x[token]
    h = torch.bmm(grouped.view(E, capacity, H), w_gate_up.transpose(1, 2))   # [E, capacity, 2F]
    y = torch.bmm(silu_mul(h), w_down.transpose(1, 2)).view(E * capacity, H)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y[slot].float() * topk_weights.reshape(-1)[order, None].float())
    return out.to(x.dtype)
