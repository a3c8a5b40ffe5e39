"""Triton expert kernels: the fused MoE FFN, its routing metadata, torch reference and benchmark.

    from moegps.kernels import fused_moe, available
    out = fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)   # [T, H]

The CPU path (and the tests' reference) is `moegps.kernels.reference.moe_reference`, same signature.
"""

from .launch import available, default_config, deterministic_algorithms, fused_moe, get_config
from .reference import moe_reference
from .routing import RoutingMeta, align

__all__ = ["available", "default_config", "deterministic_algorithms", "fused_moe", "get_config", "moe_reference",
           "RoutingMeta", "align"]
