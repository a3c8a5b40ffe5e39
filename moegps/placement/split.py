"""Token-to-replica splitting rules: how a replicated expert's tokens are shared among its replicas.

- ``even``: every replica gets 1/r of its expert's tokens (what EPLB assumes; ``Placement``'s default).
- ``load_proportional``: replicas on busy GPUs take less and replicas on idle GPUs more; each
  replica's share is pulled towards the inverse of its GPU's load, iterated until the GPUs that
  share experts level out (the best iterate per layer is kept, so never worse than ``even``).
- ``locality_first``: a token goes to a replica on the GPU where the token already sits, if there
  is one, and to the expert's replicas by the placement's shares otherwise; this cuts all-to-all
  traffic instead of balancing. It needs to know where tokens are:
  ``source_counts [layer, gpu, expert]``, the top-k selections of expert ``e`` made by tokens
  that live on GPU ``g`` (with data-parallel attention, the GPU serving the token's request;
  see ``source_counts_by_request``).

All functions are vectorised over layers. ``routed [layer, src_gpu, gpu, slot]`` counts the tokens
sent from the GPU holding them to each slot; its sum over ``src_gpu`` is the per-slot load.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .placement import Placement


def even(placement: Placement) -> Placement:
    """The placement with an even split: shares ``1 / replicas`` (``[layer, gpu, slot]``)."""
    return Placement(placement.slot_expert, placement.n_experts)


def _expert_sums(placement: Placement, per_slot: np.ndarray) -> np.ndarray:
    """``per_slot [layer, gpu, slot]`` -> ``[layer, expert]`` sums over each expert's slots."""
    L, E = placement.n_layers, placement.n_experts
    se = placement.slot_expert
    idx = np.where(se >= 0, se, E) + (E + 1) * np.arange(L)[:, None, None]
    return np.bincount(idx.reshape(-1), per_slot.reshape(-1), minlength=L * (E + 1)).reshape(L, E + 1)[:, :E]


def load_proportional(placement: Placement, loads: np.ndarray, iterations: int = 64, step: float = 0.5) -> Placement:
    """Shares that level the GPUs holding replicas of one expert: ``loads [layer, expert]``.

    Each iteration moves every replica's share a ``step`` of the way towards ``(1 / gpu_load)``
    normalised over the expert's replicas. Returns a Placement with split_rule "load_proportional".
    """
    loads = np.asarray(loads, dtype=np.float64)
    se = placement.slot_expert
    L = placement.n_layers
    layer = np.arange(L)[:, None, None]
    e = np.maximum(se, 0)
    held = se >= 0
    share = even(placement).replica_share
    best = share.copy()
    best_max = placement.gpu_loads(loads).max(-1)
    for _ in range(iterations):
        gpu = (loads[layer, e] * share).sum(-1)  # [L, G]
        pull = np.where(held, 1.0 / np.maximum(gpu, 1e-12)[:, :, None], 0.0)
        target = pull / np.maximum(_expert_sums(placement, pull)[layer, e], 1e-300)
        share = np.where(held, (1 - step) * share + step * target, 0.0)
        share /= np.where(held, _expert_sums(placement, share)[layer, e], 1.0)
        now_max = (loads[layer, e] * share).sum(-1).max(-1)
        better = now_max < best_max
        best[better] = share[better]
        best_max = np.minimum(best_max, now_max)
    return replace(placement, replica_share=best, split_rule="load_proportional").validate()


def source_counts_by_request(request_loads: np.ndarray, n_gpus: int, request_gpu: np.ndarray | None = None) -> np.ndarray:
    """``request_loads [request, layer, expert]`` -> ``source_counts [layer, gpu, expert]``.

    ``request_gpu [request]`` is the GPU whose attention serves each request (default: request
    index modulo n_gpus, i.e. requests dealt round-robin over data-parallel ranks).
    """
    R, L, E = request_loads.shape
    request_gpu = np.arange(R) % n_gpus if request_gpu is None else np.asarray(request_gpu)
    if request_gpu.shape != (R,) or (request_gpu < 0).any() or (request_gpu >= n_gpus).any():
        raise ValueError(f"request_gpu must be [request]={R} GPU ids in 0..{n_gpus - 1}")
    out = np.zeros((n_gpus, L, E))
    np.add.at(out, request_gpu, request_loads)
    return out.transpose(1, 0, 2)


def routed_by_shares(placement: Placement, source_counts: np.ndarray) -> np.ndarray:
    """Tokens routed by the placement's shares regardless of where they sit: ``[layer, src_gpu, gpu, slot]``."""
    se = placement.slot_expert
    layer = np.arange(placement.n_layers)[:, None, None, None]
    src = np.arange(source_counts.shape[1])[None, :, None, None]
    return source_counts[layer, src, np.maximum(se, 0)[:, None]] * placement.replica_share[:, None]


def locality_routing(placement: Placement, source_counts: np.ndarray) -> np.ndarray:
    """Locality-first routing ``[layer, src_gpu, gpu, slot]`` from ``source_counts [layer, gpu, expert]``.

    A token whose GPU holds a replica of its expert stays there (split evenly among local
    replicas); otherwise it goes to the expert's replicas by the placement's shares.
    """
    source_counts = np.asarray(source_counts, dtype=np.float64)
    L, G, S = placement.slot_expert.shape
    if source_counts.shape != (L, G, placement.n_experts):
        raise ValueError(f"source_counts has shape {source_counts.shape}, expected [layer, gpu, expert] = "
                         f"{(L, G, placement.n_experts)}")
    se = placement.slot_expert
    e = np.maximum(se, 0)
    li = np.arange(L)[:, None, None]
    local = np.zeros((L, G, placement.n_experts + 1))
    np.add.at(local, (li, np.arange(G)[None, :, None], np.where(se >= 0, se, placement.n_experts)), 1.0)
    local = local[..., :-1]  # [L, G, E] replicas of e on g
    # has_local[l, src, g, s]: the token's own GPU src holds the slot's expert
    has_local = local[li[..., None], np.arange(G)[None, :, None, None], e[:, None]] > 0  # [L, Gs, G, S]
    own = (np.arange(G)[:, None] == np.arange(G)[None, :])[None, :, :, None] & (se >= 0)[:, None]
    n_local = np.maximum(local[li[..., None], np.arange(G)[None, :, None, None], e[:, None]], 1)
    frac = np.where(has_local, own / n_local, placement.replica_share[:, None])
    return source_counts[li[..., None], np.arange(G)[None, :, None, None], e[:, None]] * frac * (se >= 0)[:, None]


def locality_first(placement: Placement, source_counts: np.ndarray) -> Placement:
    """The placement with the shares that locality-first routing produces in aggregate."""
    routed = locality_routing(placement, source_counts)
    per_slot = routed.sum(1)
    L = placement.n_layers
    totals = _expert_sums(placement, per_slot)
    se = placement.slot_expert
    e = np.maximum(se, 0)
    tot = totals[np.arange(L)[:, None, None], e]
    share = np.where(tot > 0, per_slot / np.where(tot > 0, tot, 1.0), even(placement).replica_share)
    return replace(placement, replica_share=np.where(se >= 0, share, 0.0), split_rule="locality_first").validate()


def tokens_crossing(routed: np.ndarray) -> np.ndarray:
    """``routed [layer, src_gpu, gpu, slot]`` -> ``[layer]`` token-expert selections leaving their GPU."""
    G = routed.shape[1]
    stay = routed[:, np.arange(G), np.arange(G)].sum((-1, -2))
    return routed.sum((1, 2, 3)) - stay
