"""Hierarchical balanced duplication (EPLB's prefill policy): groups to nodes, then within nodes.

1. expert groups (consecutive experts, e.g. DeepSeek-V3's 8 groups of 32) are packed onto nodes,
   the same number of groups per node, balancing the nodes' loads; experts of a group stay on one
   node, so group-limited routing keeps its traffic inside a node;
2. inside each node, replicas go to the experts with the highest load per replica;
3. the node's replicas are packed onto its GPUs (greedy, then swaps).
All layers and nodes are processed together as rows of one array.
"""

from __future__ import annotations

import numpy as np

from .packing import balance_rows, local_search, pack_greedy
from .placement import Placement


def hierarchical_duplication(
    loads: np.ndarray, n_gpus: int, slots_per_gpu: int, n_nodes: int, n_groups: int, refine: bool = True
) -> Placement:
    """``loads [layer, expert]`` -> Placement ``[layer, n_gpus, slots_per_gpu]`` (GPUs node-major).

    Needs ``n_experts % n_groups == 0``, ``n_groups % n_nodes == 0``, ``n_gpus % n_nodes == 0``.
    """
    loads = np.asarray(loads, dtype=np.float64)
    L, E = loads.shape
    for a, b, what in ((E, n_groups, "n_experts % n_groups"), (n_groups, n_nodes, "n_groups % n_nodes"),
                       (n_gpus, n_nodes, "n_gpus % n_nodes")):
        if a % b:
            raise ValueError(f"hierarchical placement needs {what} == 0, got {a} % {b}")
    group_size = E // n_groups
    groups_per_node = n_groups // n_nodes
    gpus_per_node = n_gpus // n_nodes
    # 1. groups -> nodes
    group_load = loads.reshape(L, n_groups, group_size).sum(-1)
    group_load = group_load / np.maximum(group_load.sum(-1, keepdims=True), 1e-300)
    node_slots = pack_greedy(group_load[None], np.arange(n_groups)[None].repeat(L, 0), n_nodes, groups_per_node)
    if refine:
        node_slots = local_search(node_slots, group_load[None] * n_nodes, np.ones(1), rewrites=False)
    # node_experts [L, node, experts_per_node]: logical ids held by each node
    node_experts = (node_slots[..., None] * group_size + np.arange(group_size)).reshape(L, n_nodes, -1)
    node_loads = np.take_along_axis(loads, node_experts.reshape(L, -1), -1).reshape(L * n_nodes, -1)
    # 2.+3. replicate within each node and pack onto its GPUs
    local = balance_rows(node_loads[None], gpus_per_node, slots_per_gpu, refine=refine,
                         rows_per_layer=n_nodes)  # [L*N, Gn, S]
    rows = np.arange(L * n_nodes)[:, None, None]
    slot_expert = np.where(local >= 0, node_experts.reshape(L * n_nodes, -1)[rows, np.maximum(local, 0)], -1)
    return Placement(slot_expert.reshape(L, n_gpus, slots_per_gpu), E)
