"""Torch reference for the fused MoE expert FFN: a plain loop over experts.

Used by the tests (on float64 inputs) and as the CPU path of the executor. Works on any device
and dtype: the two matmuls run in the input dtype (a GPU's bf16 matmul accumulates in fp32), the
combine of each token's k outputs accumulates in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """One expert's hidden activations: x [m, H] rows, w_gate_up [2F, H] (w1 rows, then w3 rows)
    -> silu(x @ w1^T) * (x @ w3^T), [m, F] in x's dtype."""
    ffn = w_gate_up.shape[0] // 2
    gate_up = x @ w_gate_up.T  # [m, 2F]
    return F.silu(gate_up[:, :ffn]) * gate_up[:, ffn:]


def moe_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """Mixtral/SwiGLU expert FFN, one expert at a time.

    x: [T, H] tokens. w_gate_up: [E, 2F, H], rows 0..F-1 the gate projection (w1), rows F..2F-1 the
    up projection (w3). w_down: [E, H, F] (w2). topk_ids: [T, k] int expert ids in [0, E).
    topk_weights: [T, k] gate weights. Returns [T, H] in x's dtype:
    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])), e = topk_ids[t, j].
    `config` is accepted (and ignored) so that this function and `fused_moe` are interchangeable.
    """
    n_tokens, hidden = x.shape
    n_experts = w_gate_up.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(n_tokens, hidden, dtype=acc_dtype, device=x.device)
    ids = topk_ids.long()
    for expert in range(n_experts):
        token, slot = (ids == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = swiglu(x[token], w_gate_up[expert]) @ w_down[expert].T  # [m, H]
        gate = topk_weights[token, slot].to(acc_dtype)[:, None]
        out.index_add_(0, token, y.to(acc_dtype) * gate)
    return out.to(x.dtype)
