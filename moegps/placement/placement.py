"""The ``Placement`` type: for each MoE layer, the logical expert held by each physical slot of each GPU.

Replicas are allowed (an expert in several slots); every expert must be held at least once.
``replica_share[layer, gpu, slot]`` is the fraction of its expert's tokens that a slot receives
(the split rule, fixed when the placement is made: even, load-proportional, ...); the shares of one
expert's replicas sum to 1. Empty slots hold -1 and share 0.

Interchange with DeepSeek EPLB's tensor form (consumed by vLLM and SGLang): ``phy2log [layer,
replica]`` with replicas numbered GPU-major (gpu * slots_per_gpu + slot), ``log2phy [layer, expert,
max_replicas]`` padded with -1, ``logcnt [layer, expert]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    """An invalid placement; the message names the layer, GPU or expert at fault."""


@dataclass
class Placement:
    slot_expert: np.ndarray  # [layer, gpu, slot] int32 logical expert id, -1 = empty slot
    n_experts: int
    replica_share: np.ndarray | None = None  # [layer, gpu, slot] float64; None = even split
    split_rule: str = "even"

    def __post_init__(self):
        self.slot_expert = np.asarray(self.slot_expert, dtype=np.int32)
        if self.slot_expert.ndim != 3:
            raise PlacementError(
                f"slot_expert has shape {self.slot_expert.shape}, expected [layer, gpu, slot]"
            )
        if self.replica_share is None:
            self.replica_share = self._even_shares()
        self.replica_share = np.asarray(self.replica_share, dtype=np.float64)
        self.validate()

    @property
    def n_layers(self) -> int:
        return self.slot_expert.shape[0]

    @property
    def n_gpus(self) -> int:
        return self.slot_expert.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        return self.slot_expert.shape[2]

    def share(self) -> np.ndarray:
        """``[layer, expert, gpu]``: the fraction of each expert's tokens that each GPU receives (its
        replicas' shares summed per GPU); each expert's row sums to 1."""
        se = self.slot_expert
        L, G, _ = se.shape
        share = np.zeros((L, self.n_experts, G))
        layer = np.broadcast_to(np.arange(L)[:, None, None], se.shape)
        gpu = np.broadcast_to(np.arange(G)[None, :, None], se.shape)
        ok = se >= 0
        np.add.at(share, (layer[ok], se[ok], gpu[ok]), self.replica_share[ok])
        return share

    def replica_count(self) -> np.ndarray:
        """``[layer, expert]`` number of slots holding each expert."""
        L, E = self.n_layers, self.n_experts
        held = self.slot_expert.reshape(L, -1)
        counts = np.zeros((L, E), dtype=np.int64)
        rows = np.repeat(np.arange(L), held.shape[1])
        ok = held.reshape(-1) >= 0
        np.add.at(counts, (rows[ok], held.reshape(-1)[ok]), 1)
        return counts

    def _even_shares(self) -> np.ndarray:
        counts = self.replica_count()
        layer = np.arange(self.n_layers)[:, None, None]
        e = np.maximum(self.slot_expert, 0)
        return np.where(self.slot_expert >= 0, 1.0 / np.maximum(counts[layer, e], 1), 0.0)

    def validate(self, n_layers: int | None = None) -> "Placement":
        """Every expert held at least once, ids in range, shares of each expert's replicas summing to 1."""
        se = self.slot_expert
        if n_layers is not None and se.shape[0] != n_layers:
            raise PlacementError(f"placement has {se.shape[0]} layers, the trace/loads have {n_layers}")
        if (se < -1).any() or (se >= self.n_experts).any():
            layer, gpu, slot = np.argwhere((se < -1) | (se >= self.n_experts))[0]
            raise PlacementError(
                f"layer {layer} GPU {gpu} slot {slot} holds expert {se[layer, gpu, slot]}, "
                f"expected -1 (empty) or 0..{self.n_experts - 1}"
            )
        counts = self.replica_count()
        if (counts == 0).any():
            layer, expert = np.argwhere(counts == 0)[0]
            raise PlacementError(f"layer {layer}: expert {expert} has no slot (every expert needs at least one)")
        if self.replica_share.shape != se.shape:
            raise PlacementError(f"replica_share has shape {self.replica_share.shape}, expected {se.shape}")
        if (self.replica_share < 0).any() or (self.replica_share[se < 0] != 0).any():
            raise PlacementError("replica_share must be >= 0, and 0 for empty slots")
        sums = self.expert_share_sums()
        if not np.allclose(sums, 1.0, atol=1e-9):
            layer, expert = np.argwhere(~np.isclose(sums, 1.0, atol=1e-9))[0]
            raise PlacementError(
                f"layer {layer}: the replica shares of expert {expert} sum to {sums[layer, expert]:.6f}, expected 1"
            )
        return self

    def expert_share_sums(self) -> np.ndarray:
        """``[layer, expert]`` sum of replica shares (1 for a valid placement)."""
        L = self.n_layers
        sums = np.zeros((L, self.n_experts))
        ok = self.slot_expert >= 0
        layer = np.broadcast_to(np.arange(L)[:, None, None], self.slot_expert.shape)
        np.add.at(sums, (layer[ok], self.slot_expert[ok]), self.replica_share[ok])
        return sums

    def gpu_loads(self, loads: np.ndarray) -> np.ndarray:
        """Tokens each GPU computes: ``loads [..., layer, expert]`` -> ``[..., layer, gpu]`` (same units)."""
        loads = np.asarray(loads, dtype=np.float64)
        e = np.maximum(self.slot_expert, 0)  # [L, G, S]
        layer = np.arange(self.n_layers)[:, None, None]
        per_slot = loads[..., layer, e] * self.replica_share  # [..., L, G, S]
        return per_slot.sum(axis=-1)

    # ---- DeepSeek EPLB tensor form ------------------------------------------------------
    def to_eplb(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(phy2log [layer, replica], log2phy [layer, expert, max_replicas] (-1 padded), logcnt [layer, expert])``."""
        L, E = self.n_layers, self.n_experts
        phy2log = self.slot_expert.reshape(L, -1).astype(np.int64)
        logcnt = self.replica_count()
        max_rep = int(logcnt.max())
        log2phy = np.full((L, E, max_rep), -1, dtype=np.int64)
        for layer in range(L):  # small: layers x replicas
            fill = np.zeros(E, dtype=np.int64)
            for phys, expert in enumerate(phy2log[layer]):
                if expert >= 0:
                    log2phy[layer, expert, fill[expert]] = phys
                    fill[expert] += 1
        return phy2log, log2phy, logcnt

    @classmethod
    def from_eplb(cls, phy2log: np.ndarray, n_gpus: int, n_experts: int | None = None) -> "Placement":
        """From EPLB's ``phy2log [layer, replicas]`` (replicas GPU-major); even split among replicas."""
        phy2log = np.asarray(phy2log)
        L, R = phy2log.shape
        if R % n_gpus:
            raise PlacementError(f"phy2log has {R} replicas per layer, not a multiple of n_gpus={n_gpus}")
        n_experts = int(phy2log.max()) + 1 if n_experts is None else n_experts
        return cls(phy2log.reshape(L, n_gpus, R // n_gpus), n_experts)
