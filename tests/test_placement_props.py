"""Invariants of every placement algorithm on random shapes and loads (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moegps.placement import split
from moegps.placement.balanced import balanced_duplication
from moegps.placement.hierarchical import hierarchical_duplication
from moegps.placement.incremental import incremental
from moegps.placement.metrics import balance_bound, experts_moved, placement_imbalance
from moegps.placement.prefill_aware import prefill_aware
from moegps.placement.static import contiguous, round_robin


@st.composite
def systems(draw):
    G = draw(st.integers(1, 6))
    E = draw(st.integers(1, 12))
    S = -(-E // G) + draw(st.integers(0, 2))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    skew = draw(st.floats(0.0, 2.0))
    loads = rng.integers(0, 50, size=(2, L, E)) * (1.0 + 10 * rng.random((2, L, E)) ** (1 + 4 * skew))
    loads[:, :, 0] += 1  # never an all-zero layer
    return G, S, loads, rng


def _check(p, loads, G, S):
    """Every expert placed, no GPU over its slots, tokens conserved, never below the bound."""
    L, E = loads.shape[-2:]
    assert p.slot_expert.shape == (L, G, S)  # S slots per GPU: none overfilled
    p.validate(n_layers=L)
    assert (p.replica_count() >= 1).all()
    assert np.allclose(p.expert_share_sums(), 1.0)
    gpu = p.gpu_loads(loads)
    assert np.allclose(gpu.sum(-1), loads.sum(-1))
    assert (placement_imbalance(p, loads[-1]) >= balance_bound(loads[-1], G, S) - 1e-9).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(systems())
def test_invariants(system):
    G, S, loads, rng = system
    L, E = loads.shape[1:]
    decode = loads[1]
    for p in (contiguous(L, E, G, S), round_robin(L, E, G, S), balanced_duplication(decode, G, S),
              balanced_duplication(decode, G, S, restarts=2), prefill_aware(loads, G, S),
              prefill_aware(loads, G, S, objective="weighted", phase_weights=np.array([0.3, 0.7]))):
        _check(p, loads, G, S)
    p = balanced_duplication(decode, G, S)
    lp = split.load_proportional(p, decode)
    _check(lp, loads, G, S)
    assert (lp.gpu_loads(decode).max(-1) <= p.gpu_loads(decode).max(-1) + 1e-9).all()
    # token splits sum to the expert's load, under every rule
    src = rng.random((L, G, E)) * decode[:, None, :]
    src *= decode[:, None, :] / np.maximum(src.sum(1, keepdims=True), 1e-300)
    for routed in (split.locality_routing(p, src), split.routed_by_shares(p, src)):
        per_expert = np.zeros((L, E))
        li, gi, si = np.nonzero(p.slot_expert >= 0)
        np.add.at(per_expert, (li, p.slot_expert[li, gi, si]), routed[li, :, gi, si].sum(-1))
        assert np.allclose(per_expert, decode)
    _check(split.locality_first(p, src), loads, G, S)
    # incremental: within its budget, never worse than where it started
    budget = int(rng.integers(0, 4))
    q = incremental(p, loads[0], budget)
    _check(q, loads, G, S)
    assert (experts_moved(p, q) <= budget).all()
    assert (placement_imbalance(q, loads[0]) <= placement_imbalance(p, loads[0]) + 1e-9).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2**32 - 1))
def test_hierarchical_invariants(nodes, gpus_per_node, groups_per_node, extra, seed):
    rng = np.random.default_rng(seed)
    G = nodes * gpus_per_node
    n_groups = nodes * groups_per_node
    E = n_groups * int(rng.integers(1, 4))
    S = -(-E // G) + extra
    loads = rng.lognormal(0, 1.0, (2, 2, E))
    p = hierarchical_duplication(loads[1], G, S, nodes, n_groups)
    _check(p, loads, G, S)
    group = p.slot_expert // (E // n_groups)  # [L, G, S] group of each slot
    node = np.broadcast_to(np.arange(G)[None, :, None] // gpus_per_node, group.shape)
    for layer in range(2):
        for g in range(n_groups):  # every group lives on exactly one node
            assert np.unique(node[layer][group[layer] == g]).size == 1
        for n in range(nodes):  # and every node holds groups_per_node whole groups
            held = group[layer][node[layer] == n]
            assert np.unique(held[held >= 0]).size == groups_per_node
