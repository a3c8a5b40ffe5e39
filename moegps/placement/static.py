"""Static baselines every serving system starts from: contiguous and round-robin, no replicas."""

from __future__ import annotations

import math

import numpy as np

from .placement import Placement


def _slots(n_experts: int, n_gpus: int, slots_per_gpu: int | None) -> int:
    need = math.ceil(n_experts / n_gpus)
    slots = need if slots_per_gpu is None else slots_per_gpu
    if slots < need:
        raise ValueError(f"{n_experts} experts need >= {need} slots per GPU on {n_gpus} GPUs, got {slots}")
    return slots


def contiguous(n_layers: int, n_experts: int, n_gpus: int, slots_per_gpu: int | None = None) -> Placement:
    """Expert e on GPU ``e // ceil(E / G)`` in every layer; spare slots stay empty.

    Returns a Placement with slot_expert [n_layers, n_gpus, slots_per_gpu].
    """
    slots = _slots(n_experts, n_gpus, slots_per_gpu)
    per_gpu = math.ceil(n_experts / n_gpus)
    table = np.full((n_gpus, slots), -1, dtype=np.int32)
    e = np.arange(n_experts)
    table[e // per_gpu, e % per_gpu] = e
    return Placement(np.broadcast_to(table, (n_layers, n_gpus, slots)).copy(), n_experts)


def round_robin(n_layers: int, n_experts: int, n_gpus: int, slots_per_gpu: int | None = None) -> Placement:
    """Expert e on GPU ``e % G`` in every layer; spare slots stay empty."""
    slots = _slots(n_experts, n_gpus, slots_per_gpu)
    table = np.full((n_gpus, slots), -1, dtype=np.int32)
    e = np.arange(n_experts)
    table[e % n_gpus, e // n_gpus] = e
    return Placement(np.broadcast_to(table, (n_layers, n_gpus, slots)).copy(), n_experts)
