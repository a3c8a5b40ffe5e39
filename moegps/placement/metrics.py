"""Placement metrics: GPU loads, imbalance, the balance bound, tokens crossing GPUs, weights moved."""

from __future__ import annotations

import numpy as np

from .packing import replicate
from .placement import Placement


def imbalance(gpu_loads: np.ndarray) -> np.ndarray:
    """``gpu_loads [..., layer, gpu]`` -> ``[..., layer]`` max/mean GPU load (1 = even; 1 for an empty layer)."""
    gpu_loads = np.asarray(gpu_loads, dtype=np.float64)
    mean = gpu_loads.mean(axis=-1)
    return np.where(mean > 0, gpu_loads.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)


def placement_imbalance(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """``loads [..., layer, expert]`` -> ``[..., layer]`` imbalance of the placement's GPU loads."""
    return imbalance(placement.gpu_loads(loads))


def balance_bound(loads: np.ndarray, n_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Lowest imbalance any placement with this many slots can reach: ``loads [layer, expert]`` -> ``[layer]``.

    The busiest GPU is never below the mean (bound 1.0), and never below the largest load per
    replica when every expert gets at most one replica per GPU and the extra slots go where they
    lower that maximum most (the greedy replica count is optimal for that quantity, whatever
    the split rule). The bound is "reachable" where it equals 1.
    """
    loads = np.asarray(loads, dtype=np.float64)
    L, E = loads.shape
    counts = replicate(loads, n_gpus * slots_per_gpu, n_gpus)
    mean = loads.sum(-1) / n_gpus
    per_replica = (loads / counts).max(-1)
    return np.where(mean > 0, np.maximum(1.0, per_replica / np.where(mean > 0, mean, 1.0)), 1.0)


def experts_moved(old: Placement, new: Placement) -> np.ndarray:
    """``[layer]`` expert copies to transfer to go from ``old`` to ``new``.

    A GPU needs the weights of every expert it holds in ``new`` but not in ``old`` (slot order
    inside a GPU is free; removing a replica costs nothing). Multiply by the bytes of one
    expert (``expert_bytes``) for bytes moved.
    """
    if old.slot_expert.shape[:2] != new.slot_expert.shape[:2] or old.n_experts != new.n_experts:
        raise ValueError(
            f"placements differ in shape: old {old.slot_expert.shape} ({old.n_experts} experts), "
            f"new {new.slot_expert.shape} ({new.n_experts} experts); layers, GPUs and experts must match"
        )
    return (_held(new) & ~_held(old)).sum(axis=(1, 2))


def _held(p: Placement) -> np.ndarray:
    """``[layer, gpu, expert]`` bool: the GPU holds at least one replica of the expert."""
    L, G, S = p.slot_expert.shape
    held = np.zeros((L, G, p.n_experts + 1), dtype=bool)
    li, gi, _ = np.indices(p.slot_expert.shape)
    held[li, gi, np.where(p.slot_expert >= 0, p.slot_expert, p.n_experts)] = True
    return held[..., : p.n_experts]


def expert_bytes(hidden: int, intermediate: int, bytes_per_param: float = 2.0, matrices: int = 3) -> int:
    """Bytes of one expert FFN's weights (gate, up, down for SwiGLU experts; bf16 by default)."""
    return int(matrices * hidden * intermediate * bytes_per_param)
