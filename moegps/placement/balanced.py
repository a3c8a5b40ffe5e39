"""Balanced duplication in the manner of DeepSeek's EPLB (global policy), vectorised over layers.

Replicas go to the experts with the highest load per replica; replicas are then packed heaviest
first onto the lightest GPU with a free slot, and a swap search lowers the busiest GPU further.
"""

from __future__ import annotations

import numpy as np

from .packing import balance_rows
from .placement import Placement


def balanced_duplication(
    loads: np.ndarray, n_gpus: int, slots_per_gpu: int, refine: bool = True, restarts: int = 0, seed: int = 0
) -> Placement:
    """Place ``loads [layer, expert]`` (tokens or fractions) onto ``n_gpus x slots_per_gpu`` slots.

    Every slot is filled: ``n_gpus * slots_per_gpu - n_experts`` extra replicas, at most one
    replica of an expert per GPU where the slots allow it. Tokens split evenly among replicas.
    ``restarts`` > 0 adds starts from perturbed replica counts (slower, closer to the optimum).
    Returns a Placement with slot_expert [layer, n_gpus, slots_per_gpu].
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2:
        raise ValueError(f"loads has shape {loads.shape}, expected [layer, expert]")
    slot_expert = balance_rows(loads[None], n_gpus, slots_per_gpu, refine=refine, restarts=restarts, seed=seed)
    return Placement(slot_expert, loads.shape[1])
