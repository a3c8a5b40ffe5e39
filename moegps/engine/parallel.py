"""The engine over several GPUs (or CPU processes): its MoE layers become the executor's layers.

* ``expert_parallel(model, comm, placement)``: every rank decodes its own prompts (data-parallel
  attention, each rank its own KV cache) and keeps only its placement slots' expert weights; each
  MoE layer dispatches tokens to the ranks holding their chosen experts and combines the results
  (``executor.layer.ExpertParallelMoE``: any ``Placement``, replicas split by its shares).
* ``tensor_parallel(model, comm)``: every rank holds every expert, its FFN split ``world`` ways
  (``executor.layer.TensorParallelMoE``); all ranks run the same prompts and sum partial outputs.

Every rank must run the same number of MoE layer calls (the same number of prefills and decode
steps, stop tokens left out), and decode runs eagerly: the dispatch's message sizes are read on the
host, which a captured CUDA graph cannot do. ``serve`` keeps expert-parallel ranks in step while each
serves its own requests (``serving_comm``; a rank with no prompt to prefill joins the others' prefill
through ``idle_moe_calls``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..executor.dist import Comm
from ..executor.layer import ExpertParallelMoE, TensorParallelMoE, tp_shard
from ..placement.placement import Placement
from .model import Model


def expert_parallel(model: Model, comm: Comm, placement: Placement) -> Model:
    """A copy of ``model`` (attention weights shared, not copied) whose MoE layer j runs under
    ``placement``'s layer j on ``comm``'s ranks; this rank keeps the weights of its slots only."""
    moe = model.moe_layers
    S = model.shape
    if any(model.layers[i].n_shared for i in moe):
        raise ValueError("expert_parallel: this model holds a shared expert among its experts (Layer.n_shared), "
                         "which a placement of the routed experts does not cover; tensor_parallel splits it")
    if placement.n_experts != S.n_experts:
        raise ValueError(f"placement is for {placement.n_experts} experts, the model has {S.n_experts}")
    if placement.n_layers != len(moe) or placement.n_gpus != comm.world:
        raise ValueError(f"placement has shape [layers={placement.n_layers}, gpus={placement.n_gpus}, slots], "
                         f"expected [{len(moe)} MoE layers, {comm.world} ranks, slots]")
    layers = list(model.layers)
    for j, i in enumerate(moe):
        layer = layers[i]
        slots = placement.slot_expert[j, comm.rank]
        held = np.where(slots >= 0, slots, 0)  # an empty slot holds any weights; none is routed to it
        w_gate_up = layer.w_gate_up[held].to(comm.device).contiguous()
        w_down = layer.w_down[held].to(comm.device).contiguous()
        layers[i] = dataclasses.replace(layer, w_gate_up=w_gate_up, w_down=w_down, experts=ExpertParallelMoE(
            comm, placement.slot_expert[j], placement.replica_share[j], S.n_experts, w_gate_up, w_down))
    return dataclasses.replace(model, layers=layers)


def tensor_parallel(model: Model, comm: Comm) -> Model:
    """A copy of ``model`` whose experts are split ``comm.world`` ways along the FFN dimension."""
    layers = list(model.layers)
    for i in model.moe_layers:
        layer = layers[i]
        w_gate_up, w_down = tp_shard(layer.w_gate_up, layer.w_down, comm.rank, comm.world)
        layers[i] = dataclasses.replace(layer, w_gate_up=w_gate_up, w_down=w_down,
                                        experts=TensorParallelMoE(comm, w_gate_up, w_down))
    return dataclasses.replace(model, layers=layers)


def serving_comm(model: Model) -> Comm | None:
    """The ranks whose steps ``model``'s MoE layers join, when each rank serves requests of its own (expert
    parallel); None for a one-process model. Tensor-parallel ranks must run the same requests, admitted at
    the same steps, which serving on each rank's own clock cannot promise: refused."""
    experts = [layer.experts for layer in model.layers if layer.experts is not None]
    if not experts:
        return None
    if not all(isinstance(e, ExpertParallelMoE) for e in experts):
        raise ValueError("serving needs a one-process or an expert-parallel model (engine.parallel.expert_parallel): "
                         "tensor-parallel ranks would have to admit the same requests at the same steps")
    return experts[0].comm


def idle_moe_calls(model: Model) -> None:
    """Every MoE layer's call with no tokens, in layer order: what a prefill does on the ranks that have no
    prompt to prefill while another rank prefills (each layer's dispatch needs every rank)."""
    S = model.shape
    x = torch.empty(0, S.hidden, dtype=model.dtype, device=model.device)
    ids = torch.empty(0, S.top_k, dtype=torch.int32, device=model.device)
    gates = torch.empty(0, S.top_k, dtype=model.dtype, device=model.device)
    for i in model.moe_layers:
        model.layers[i].experts(x, ids, gates)
