"""Incremental re-placement: move few expert weights, gain most of the balance.

A rebalance in vLLM or SGLang recomputes the placement from scratch, and nearly every slot's
weights move (users report 0.9-1.8 s stalls). Here a budget bounds the expert copies per layer:
starting from the current placement, the move that gains most per copy is taken (a swap of two
slots between the busiest GPU and another costs up to 2 copies, turning a redundant replica into
a new replica of a hot expert costs 1), until the budget is spent or no move helps. A copy is
free where the GPU already held that expert before the re-placement.

For comparison, ``from_scratch_matched`` places from scratch and then renumbers each layer's GPUs
to keep as many experts where they already are as possible (a linear assignment), the best a
from-scratch rebalance can do for bytes moved.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .balanced import balanced_duplication
from .metrics import _held, experts_moved, placement_imbalance
from .packing import local_search, phase_scale
from .placement import Placement


def incremental(current: Placement, loads: np.ndarray, max_copies_per_layer: float | None) -> Placement:
    """Improve ``current`` for ``loads [layer, expert]`` moving at most ``max_copies_per_layer`` experts.

    ``None`` = no bound. Returns a Placement with the same shape (even split);
    ``experts_moved(current, result) <= max_copies_per_layer`` in every layer.
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.shape != (current.n_layers, current.n_experts):
        raise ValueError(f"loads has shape {loads.shape}, expected [layer, expert] = {(current.n_layers, current.n_experts)}")
    if max_copies_per_layer is not None and max_copies_per_layer <= 0:
        return Placement(current.slot_expert.copy(), current.n_experts)
    norm = (loads / phase_scale(loads[None], current.n_gpus)[0])[None]
    budget = None if max_copies_per_layer is None else np.full(current.n_layers, float(max_copies_per_layer))
    slot_key = local_search(current.slot_expert.astype(np.int64), norm, np.ones(1), budget=budget,
                            held_before=_held(current), max_iters=4 * current.n_gpus * current.slots_per_gpu)
    return Placement(slot_key, current.n_experts)


def match_gpus(new: Placement, current: Placement) -> Placement:
    """Renumber each layer's GPUs in ``new`` to keep the most experts where ``current`` has them.

    Balance is unchanged (GPUs are interchangeable); ``experts_moved(current, result)`` is the
    least over all GPU renumberings. Slot order inside a GPU keeps staying experts in place.
    """
    held_new, held_cur = _held(new).astype(float), _held(current).astype(float)
    out = new.slot_expert.copy()
    share = new.replica_share.copy()
    for layer in range(new.n_layers):  # one small assignment problem per layer
        overlap = held_new[layer] @ held_cur[layer].T  # [new gpu, current gpu]
        rows, cols = linear_sum_assignment(-overlap)
        out[layer, cols] = new.slot_expert[layer, rows]
        share[layer, cols] = new.replica_share[layer, rows]
    return Placement(out, new.n_experts, share, new.split_rule)


def from_scratch_matched(current: Placement, loads: np.ndarray) -> Placement:
    """EPLB-style balanced duplication for ``loads [layer, expert]``, GPUs matched to ``current``."""
    fresh = balanced_duplication(loads, current.n_gpus, current.slots_per_gpu)
    return match_gpus(fresh, current)


def replacement_curve(current: Placement, loads: np.ndarray, budgets: list[float | None], expert_bytes: float = 1.0) -> list[dict]:
    """Bytes moved against imbalance gained, one row per budget plus from-scratch rows.

    Returns rows with: method, budget (copies per layer), copies (total), bytes, imbalance_mean,
    imbalance_max (over layers), before_mean (imbalance of ``current``).
    """
    before = placement_imbalance(current, loads)
    rows = []
    candidates = [("incremental", b, incremental(current, loads, b)) for b in budgets]
    fresh = balanced_duplication(loads, current.n_gpus, current.slots_per_gpu)
    candidates += [("from_scratch", None, fresh), ("from_scratch_matched", None, match_gpus(fresh, current))]
    for method, budget, p in candidates:
        moved = experts_moved(current, p)
        imb = placement_imbalance(p, loads)
        rows.append(dict(method=method, budget=np.inf if budget is None else budget, copies=int(moved.sum()), bytes=float(moved.sum() * expert_bytes),
                         imbalance_mean=float(imb.mean()), imbalance_max=float(imb.max()), before_mean=float(before.mean())))
    return rows
