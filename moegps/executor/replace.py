"""Re-placement: move expert weights between ranks when a new placement is applied, only for changed slots.

A slot changes when it holds a different expert in the new placement. Its weights come from the
rank itself when that rank already holds the expert in another slot (a local copy), otherwise from
an old holder of the expert, chosen round-robin among holders so that no single rank sends every
copy of a hot expert. All ranks compute the same plan from the two placements (no negotiation);
transfers are point-to-point (``batch_isend_irecv``) into fresh buffers, written into the slots only
after every transfer has finished, so a slot that is both a source and a destination is safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .layer import ExpertParallelMoE


@dataclass(frozen=True)
class Move:
    """Slot ``(dst_gpu, dst_slot)`` gets ``expert``'s weights from ``(src_gpu, src_slot)`` of the old placement."""

    dst_gpu: int
    dst_slot: int
    expert: int
    src_gpu: int
    src_slot: int

    @property
    def remote(self) -> bool:
        return self.src_gpu != self.dst_gpu


def plan_moves(old: np.ndarray, new: np.ndarray) -> list[Move]:
    """Moves that turn ``old [G, S]`` into ``new [G, S]`` (one layer); unchanged and emptied slots get none."""
    old, new = np.asarray(old), np.asarray(new)
    if old.shape != new.shape:
        raise ValueError(f"old placement has shape {old.shape}, new has {new.shape}: slots per GPU must match")
    holders: dict[int, list[tuple[int, int]]] = {}
    for g, s in zip(*np.nonzero(old >= 0)):
        holders.setdefault(int(old[g, s]), []).append((int(g), int(s)))
    sent = {h: 0 for hs in holders.values() for h in hs}  # remote copies each old slot has sent
    moves = []
    for g, s in zip(*np.nonzero((new != old) & (new >= 0))):
        g, s, e = int(g), int(s), int(new[g, s])
        if e not in holders:
            raise ValueError(f"new placement puts expert {e} in GPU {g} slot {s}, but no slot holds it now")
        local = [h for h in holders[e] if h[0] == g]
        src = local[0] if local else min(holders[e], key=lambda h: (sent[h], h))
        sent[src] += 0 if local else 1
        moves.append(Move(g, s, e, *src))
    return moves


@dataclass
class MigrationStats:
    changed_slots: int = 0  # slots whose expert changed (incl. local copies)
    remote_slots: int = 0  # of those, filled from another rank
    bytes_migrated: int = 0  # bytes received over the network, all ranks together
    ms: float = 0.0  # wall time of the slowest rank, including the final barrier


def migrate(layer: ExpertParallelMoE, new_slot_expert: np.ndarray, new_share: np.ndarray) -> MigrationStats:
    """Apply a new placement to ``layer`` (weights and routing); returns what moved and how long it took."""
    comm = layer.comm
    moves = plan_moves(layer.slot_expert, new_slot_expert)
    comm.barrier()
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    t0 = time.perf_counter()
    incoming: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ops = []
    for m in moves:
        if m.dst_gpu == comm.rank and not m.remote:
            incoming[m.dst_slot] = (layer.w_gate_up[m.src_slot].clone(), layer.w_down[m.src_slot].clone())
        elif m.dst_gpu == comm.rank:
            buf = (torch.empty_like(layer.w_gate_up[0]), torch.empty_like(layer.w_down[0]))
            incoming[m.dst_slot] = buf
            ops += [dist.P2POp(dist.irecv, b, m.src_gpu, group=comm.group) for b in buf]
        elif m.src_gpu == comm.rank and m.remote:
            ops += [dist.P2POp(dist.isend, w[m.src_slot].contiguous(), m.dst_gpu, group=comm.group)
                    for w in (layer.w_gate_up, layer.w_down)]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for slot, (gate_up, down) in incoming.items():
        layer.w_gate_up[slot].copy_(gate_up)
        layer.w_down[slot].copy_(down)
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    comm.barrier()
    ms = comm.max_over_ranks((time.perf_counter() - t0) * 1e3)
    layer.set_placement(new_slot_expert, new_share)
    expert_bytes = (layer.w_gate_up[0].numel() + layer.w_down[0].numel()) * layer.w_gate_up.element_size()
    remote = sum(m.remote for m in moves)
    return MigrationStats(len(moves), remote, remote * expert_bytes, ms)
