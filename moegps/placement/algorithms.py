"""Every placement algorithm by name, with the fields its config may set: the one dispatcher that the
placement CLI, the simulator, sweeps and the executor share.

    from moegps.placement.algorithms import place
    p = place("balanced", loads, n_gpus=8, slots_per_gpu=9, refine=True, restarts=4)   # loads [layer, expert]
    p = place("prefill_aware", phase_loads, 8, 9, objective="max")                     # [phase, layer, expert]

A field an algorithm does not take is an error naming the algorithm and the fields it takes, so a
config (``moegps/conf/placement/<name>.yaml``) can never claim a setting that did not run.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from .balanced import balanced_duplication
from .hierarchical import hierarchical_duplication
from .optimal import optimal
from .placement import Placement
from .prefill_aware import prefill_aware
from .split import load_proportional
from .static import contiguous, round_robin

# descriptive keys of a config file, not arguments
CONFIG_KEYS = ("name", "_target_")


def _contiguous(loads, n_gpus, slots, gpus_per_node):
    return contiguous(loads.shape[-2], loads.shape[-1], n_gpus, slots)


def _round_robin(loads, n_gpus, slots, gpus_per_node):
    return round_robin(loads.shape[-2], loads.shape[-1], n_gpus, slots)


def _balanced(loads, n_gpus, slots, gpus_per_node, refine=True, restarts=0, seed=0):
    return balanced_duplication(_all_phases(loads), n_gpus, slots, refine=refine, restarts=int(restarts), seed=seed)


def _balanced_lp(loads, n_gpus, slots, gpus_per_node, refine=True, restarts=0, seed=0):
    flat = _all_phases(loads)
    return load_proportional(balanced_duplication(flat, n_gpus, slots, refine=refine, restarts=int(restarts),
                                                  seed=seed), flat)


def _hierarchical(loads, n_gpus, slots, gpus_per_node, refine=True):
    nodes = max(1, n_gpus // (gpus_per_node or n_gpus))
    return hierarchical_duplication(_all_phases(loads), n_gpus, slots, nodes, nodes, refine=refine)


def _prefill_aware(loads, n_gpus, slots, gpus_per_node, objective="max", phase_weights=None, refine=True):
    if loads.ndim != 3:
        raise ValueError("placement 'prefill_aware' needs per-phase loads [phase, layer, expert]")
    weights = None if phase_weights is None else np.asarray(phase_weights, dtype=np.float64)
    return prefill_aware(loads, n_gpus, slots, phase_weights=weights, objective=objective, refine=refine)


def _optimal(loads, n_gpus, slots, gpus_per_node, split="free", time_limit=30.0, objective="max",
             phase_weights=None):
    weights = None if phase_weights is None else np.asarray(phase_weights, dtype=np.float64)
    return optimal(loads, n_gpus, slots, split=split, phase_weights=weights, objective=objective,
                   time_limit=float(time_limit))[0]


def _all_phases(loads: np.ndarray) -> np.ndarray:
    """``[layer, expert]`` loads from ``[layer, expert]`` or ``[phase, layer, expert]`` (summed)."""
    return loads.sum(0) if loads.ndim == 3 else loads


ALGORITHMS: dict[str, Callable[..., Placement]] = {
    "contiguous": _contiguous, "round_robin": _round_robin, "balanced": _balanced, "balanced_lp": _balanced_lp,
    "hierarchical": _hierarchical, "prefill_aware": _prefill_aware, "optimal": _optimal,
}
ALIASES = {"static": "contiguous"}


def fields_of(name: str) -> list[str]:
    """The config fields algorithm ``name`` takes."""
    params = list(inspect.signature(ALGORITHMS[canonical(name)]).parameters)
    return params[4:]


def canonical(name: str) -> str:
    """The algorithm's name (``static`` is ``contiguous``); an unknown name is an error listing the known."""
    name = ALIASES.get(name, name)
    if name not in ALGORITHMS:
        raise ValueError(f"unknown placement {name!r}; known: {sorted(ALGORITHMS) + sorted(ALIASES)}")
    return name


def check_fields(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without the descriptive keys, after checking that ``name`` takes every one."""
    args = {k: v for k, v in fields.items() if k not in CONFIG_KEYS}
    unknown = sorted(set(args) - set(fields_of(name)))
    if unknown:
        raise ValueError(f"placement {name!r} has no field(s) {unknown}; it takes {fields_of(name)}")
    return args


def place(name: str, loads: np.ndarray, n_gpus: int, slots_per_gpu: int, gpus_per_node: int | None = None,
          **fields) -> Placement:
    """Placement ``name`` of ``loads [layer, expert]`` (or ``[phase, layer, expert]``; phases are summed
    by the algorithms that do not tell them apart) on ``n_gpus x slots_per_gpu`` slots."""
    args = check_fields(name, fields)
    return ALGORITHMS[canonical(name)](np.asarray(loads, dtype=np.float64), n_gpus, slots_per_gpu, gpus_per_node,
                                       **args)
