"""Where each MoE family keeps its router in a transformers model, and how to read its decision.

In transformers 5 (checked against 5.17 and 5.23: the router classes are identical), every MoE
block holds its router as a separate module, ``<decoder layer>.mlp.gate``, whose forward returns
``(router_logits [tokens, n_experts], top_k_weights [tokens, k], top_k_index [tokens, k])`` and the
block feeds exactly those weights and indices to its experts. A forward hook on that module
therefore sees the routing the model really used, without re-implementing any of it.

Families and their rule (the hook records the result; the rule is documented for readers and
re-derived independently in ``tests/test_collect.py``):

==========  ========================  =================================================================
family      router class              selection and gate weights
==========  ========================  =================================================================
mixtral     MixtralTopKRouter         softmax(logits) over all experts, top-k, renormalised to sum 1
olmoe       OlmoeTopKRouter           softmax, top-k; renormalised only if ``norm_topk_prob`` (OLMoE: no)
qwen2_moe   Qwen2MoeTopKRouter        softmax, top-k, renormalised if ``norm_topk_prob``; plus a shared
                                      expert that every token uses (not routed, not recorded)
qwen3_moe   Qwen3MoeTopKRouter        softmax, top-k, renormalised if ``norm_topk_prob``
deepseek_v3 DeepseekV3TopkRouter      sigmoid scores + correction bias, best ``topk_group`` of
                                      ``n_group`` groups, top-k; weights = sigmoid scores of the
                                      chosen, renormalised if ``norm_topk_prob``, times
                                      ``routed_scaling_factor``; shared experts not recorded
==========  ========================  =================================================================

Other transformers MoE models whose router class is named ``*TopKRouter`` and returns the same
triple are picked up too (family ``generic``).

``cache_argument`` names the KV cache's argument and output field for the transformers release installed
(``cache`` from 5.24, ``past_key_values`` before): collect, the executor's and the engine's benchmarks and the
demo pass it by that name.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MoEFamily:
    name: str
    model_types: tuple[str, ...]  # ``config.model_type`` values
    router_class: str  # class name of the router module
    rule: str  # how the router selects and weighs experts (see module docstring)


FAMILIES: dict[str, MoEFamily] = {
    f.name: f
    for f in (
        MoEFamily("mixtral", ("mixtral",), "MixtralTopKRouter", "softmax-topk-renorm"),
        MoEFamily("olmoe", ("olmoe",), "OlmoeTopKRouter", "softmax-topk[-renorm if norm_topk_prob]"),
        MoEFamily("qwen2_moe", ("qwen2_moe",), "Qwen2MoeTopKRouter", "softmax-topk[-renorm if norm_topk_prob]"),
        MoEFamily("qwen3_moe", ("qwen3_moe",), "Qwen3MoeTopKRouter", "softmax-topk[-renorm if norm_topk_prob]"),
        MoEFamily("deepseek_v3", ("deepseek_v3",), "DeepseekV3TopkRouter", "sigmoid-bias-grouped-topk[-renorm]*scale"),
    )
}
GENERIC = MoEFamily("generic", (), "*TopKRouter", "as the router returns it")


class AdapterError(ValueError):
    """A model whose routers cannot be found or read; the message says what was expected."""


@dataclass
class MoERouter:
    """One MoE layer's router: its position among MoE layers, the model's layer number, the module."""

    index: int  # 0..n_moe_layers-1: the trace's ``layer``
    layer_number: int  # the decoder layer it sits in: the trace's ``meta.layer_ids[index]``
    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    module: nn.Module
    n_experts: int
    top_k: int


def family_of(model: nn.Module) -> MoEFamily:
    """The family of a transformers model, from ``config.model_type`` (``generic`` if unknown)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return GENERIC


def find_routers(model: nn.Module) -> list[MoERouter]:
    """The MoE routers of ``model`` in layer order; dense layers (e.g. DeepSeek's first) are skipped."""
    family = family_of(model)
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        is_router = cls == family.router_class if family is not GENERIC else re.search(r"Top[kK]Router$", cls)
        if not is_router:
            continue
        match = _LAYER_NUMBER.search(name)
        if match is None:
            raise AdapterError(f"router {name} ({cls}) is not inside a '.layers.<n>.' decoder layer")
        n_experts = getattr(module, "num_experts", None) or getattr(module, "n_routed_experts", None)
        top_k = getattr(module, "top_k", None)
        if not n_experts or not top_k:
            raise AdapterError(f"router {name} ({cls}) lacks 'num_experts'/'top_k' attributes")
        found.append((int(match.group(1)), name, module, int(n_experts), int(top_k)))
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise AdapterError(
            f"no MoE router modules found in {type(model).__name__} (model_type {model_type!r}); expected "
            f"{family.router_class} modules (transformers >= 5, families: {', '.join(FAMILIES)})"
        )
    found.sort(key=lambda f: f[0])
    return [MoERouter(i, *f) for i, f in enumerate(found)]


def routing_from_output(output, top_k: int, where: str = "router") -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts [tokens, k] int64, weights [tokens, k] float)`` from a router's forward output.

    The output is ``(logits, top_k_weights, top_k_index)``; the weights are those the MoE block
    multiplies expert outputs by, in router order (``topk`` order, i.e. by descending score for
    softmax routers; DeepSeek-V3 uses unsorted ``topk``, recorded as it comes).
    """
    if not isinstance(output, (tuple, list)) or len(output) != 3:
        raise AdapterError(
            f"{where}: expected the router to return (logits, weights, indices), got {type(output).__name__}"
        )
    _, weights, experts = output
    if experts.shape[-1] != top_k or weights.shape != experts.shape:
        raise AdapterError(
            f"{where}: router returned indices {tuple(experts.shape)} and weights {tuple(weights.shape)}, "
            f"expected [tokens, top_k={top_k}] each"
        )
    return experts.reshape(-1, top_k), weights.reshape(-1, top_k)


def cache_argument(model) -> str:
    """The name a transformers model's forward takes and returns its KV cache by: ``cache`` from transformers
    5.24, ``past_key_values`` before (the GPU machines' 5.17); the old name warns from 5.24 on."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
