"""Prefill-aware placement: one placement that keeps both prefill and decode balanced.

Prefill and decode route differently (prefill sees whole prompts, decode one token per request),
so a placement tuned on one phase can be uneven on the other. Each phase's loads are normalised by
their own mean GPU load; the objective of a layer is either the max of the phases' imbalances
(``objective="max"``) or their weighted sum, weights being the phases' shares of MoE time.
"""

from __future__ import annotations

import numpy as np

from .packing import balance_rows
from .placement import Placement


def prefill_aware(
    phase_loads: np.ndarray,
    n_gpus: int,
    slots_per_gpu: int,
    phase_weights: np.ndarray | None = None,
    objective: str = "max",
    refine: bool = True,
) -> Placement:
    """``phase_loads [phase, layer, expert]`` (e.g. phase 0 prefill, 1 decode) -> Placement.

    phase_weights [phase]: the phases' shares of time (used by ``objective="weighted"`` and to
    rank replicas); default equal.
    """
    phase_loads = np.asarray(phase_loads, dtype=np.float64)
    if phase_loads.ndim != 3:
        raise ValueError(f"phase_loads has shape {phase_loads.shape}, expected [phase, layer, expert]")
    slot_expert = balance_rows(phase_loads, n_gpus, slots_per_gpu, phase_weights, objective, refine=refine)
    return Placement(slot_expert, phase_loads.shape[2])
