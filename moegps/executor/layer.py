"""MoE layers that apply a ``Placement``: expert-parallel, tensor-parallel, and the single-device reference.

Shapes: tokens ``x [T, H]``; routing ``topk_ids [T, k]`` (logical expert ids) and ``topk_weights
[T, k]`` (gate weights); expert weights in Hugging Face Mixtral's layout, ``w_gate_up [E, 2F, H]``
(gate rows, then up rows) and ``w_down [E, H, F]``; expert FFN ``down(silu(gate x) * up x)``.

Expert parallelism (EP), the way serving systems split MoE layers (DeepEP/vLLM style): every rank
owns ``T_r`` tokens (data-parallel attention) and the weights of its placement slots. Each
(token, expert) assignment picks one physical slot holding that expert (replicas split an expert's
tokens by the placement's ``replica_share``, see :func:`choose_slots`); a token goes once to every
rank that holds at least one of its chosen slots (hidden state + slot ids + gate weights), the rank
runs its local slots through the fused kernel, sums the token's local contributions, and sends the
partial sum back; the owner adds the partials. Two ``all_to_all_single`` calls with variable
splits (after an exchange of counts) for dispatch, one for combine.

Tensor parallelism (TP): every rank holds every expert, with the FFN split column-wise (gate/up
rows) and row-wise (down columns) into ``world`` shards; all ranks see the same tokens and the
partial outputs are summed with one all-reduce.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist import Comm


# ---- expert FFN compute ----------------------------------------------------------------------------

def moe_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Single-device MoE, a plain loop over experts: ``x [T,H]`` -> ``[T,H]`` (x's dtype).

    Accumulates in float32 (float64 when x is float64). Used as the test reference and as the CPU
    path; ids must be in ``0..E-1``.
    """
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    n_ffn = w_down.shape[-1]
    for e in torch.unique(topk_ids).tolist():
        token, j = torch.nonzero(topk_ids == e, as_tuple=True)
        h = x[token].to(acc_dtype)
        gate_up = h @ w_gate_up[e].to(acc_dtype).T
        act = F.silu(gate_up[:, :n_ffn]) * gate_up[:, n_ffn:]
        y = act @ w_down[e].to(acc_dtype).T
        out.index_add_(0, token, y * topk_weights[token, j, None].to(acc_dtype))
    return out.to(x.dtype)


def _kernel(device: torch.device):
    """The expert kernel for ``device``: moegps.kernels' fused Triton kernel on GPU, a torch loop on CPU."""
    return _kernel_for(device.type)


@functools.lru_cache(maxsize=None)
def _kernel_for(device_type: str):
    if device_type == "cuda":
        try:
            from moegps.kernels import fused_moe
            return fused_moe
        except ImportError:
            return moe_reference
    try:
        from moegps.kernels.reference import moe_reference as kernels_reference
        return kernels_reference
    except ImportError:
        return moe_reference


def expert_compute(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   slot_ids: torch.Tensor, weights: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """Weighted sum of each token's local slots' FFN outputs: ``x [N,H]``, ``slot_ids [N,k]`` -> ``[N,H]``.

    ``slot_ids`` may hold -1 (no local slot in that column) unless ``dense``; such columns are
    dropped by compacting to one row per valid (token, slot) pair, so that no padding row ever
    reads a slot's weights.
    """
    kernel = _kernel(x.device)
    if dense:
        return kernel(x, w_gate_up, w_down, slot_ids, weights)
    n, k = slot_ids.shape
    if n == 0:
        return torch.zeros_like(x)
    valid = slot_ids >= 0
    row, col = torch.nonzero(valid, as_tuple=True)
    if row.numel() == n * k:  # every column valid: no compaction needed
        return kernel(x, w_gate_up, w_down, slot_ids, weights)
    y = kernel(x[row], w_gate_up, w_down, slot_ids[row, col, None], weights[row, col, None].to(x.dtype))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    out.index_add_(0, row, y.to(acc))
    return out.to(x.dtype)


# ---- replicas: which physical slot serves each assignment ----------------------------------------

def replica_tables(slot_expert: np.ndarray, replica_share: np.ndarray, n_experts: int):
    """Per-expert replica lists of one layer.

    ``slot_expert [G, S]``, ``replica_share [G, S]`` -> ``(phys [E, R] int64 flat slot g*S+s, -1 padded;
    cum_share [E, R] float64 cumulative shares, padded with 2.0; count [E])``.
    """
    flat = slot_expert.reshape(-1)
    share = replica_share.reshape(-1)
    count = np.bincount(flat[flat >= 0], minlength=n_experts)
    R = max(int(count.max()), 1)
    phys = np.full((n_experts, R), -1, dtype=np.int64)
    cum = np.full((n_experts, R), 2.0)
    fill = np.zeros(n_experts, dtype=np.int64)
    for p in np.flatnonzero(flat >= 0):  # G*S entries: small
        e = flat[p]
        phys[e, fill[e]] = p
        cum[e, fill[e]] = share[p]
        fill[e] += 1
    for e in range(n_experts):
        cum[e, : count[e]] = np.cumsum(cum[e, : count[e]])
    return phys, cum, count


def choose_slots(topk_ids: torch.Tensor, phys: torch.Tensor, cum_share: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
    """Flat physical slot (``gpu * S + slot``) serving each assignment: ``topk_ids [T,k]`` -> ``[T,k]``.

    Split rule: the ``n_e`` assignments of expert ``e`` (token-major order) are numbered ``i =
    0..n_e-1``; assignment ``i`` goes to the replica whose cumulative-share interval holds ``(i +
    0.5) / n_e``. So each replica gets its share of the tokens to within one token, deterministically,
    and a replica with share 0 gets none. Experts with one slot skip all of this.
    """
    ids = topk_ids.reshape(-1).long()
    if int(count.max()) <= 1 or ids.numel() == 0:
        return phys[ids, 0].reshape(topk_ids.shape)
    order = torch.sort(ids, stable=True).indices
    n_per = torch.bincount(ids, minlength=phys.shape[0])
    start = torch.cumsum(n_per, 0) - n_per
    rank_in_expert = torch.empty_like(ids)
    rank_in_expert[order] = torch.arange(ids.numel(), device=ids.device) - start[ids[order]]
    frac = (rank_in_expert.double() + 0.5) / n_per[ids].double()
    replica = (cum_share[ids] <= frac[:, None]).sum(-1)
    replica = torch.minimum(replica, count[ids] - 1)
    return phys[ids, replica].reshape(topk_ids.shape)


# ---- timing -----------------------------------------------------------------------------------------

class PhaseTimer:
    """Marks between phases: device events on CUDA (no sync while running), host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        """``{phase: ms}``, each the time from the previous mark (summed over repeats of a name)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


@dataclass
class LayerStats:
    """What one forward moved: ``bytes_sent`` off-rank (dispatch + combine), assignments computed here."""

    bytes_sent: int = 0
    local_assignments: int = 0
    send_counts: list[int] = field(default_factory=list)


# ---- expert-parallel layer ------------------------------------------------------------------------

class ExpertParallelMoE:
    """One MoE layer's experts under a placement, on ``comm``'s ranks.

    ``slot_expert [G, S]`` and ``replica_share [G, S]`` are one layer of a ``Placement`` (G must be
    ``comm.world``); ``w_gate_up [S, 2F, H]`` and ``w_down [S, H, F]`` are this rank's slots (empty
    slots hold any values and are never read).
    """

    def __init__(self, comm: Comm, slot_expert: np.ndarray, replica_share: np.ndarray, n_experts: int,
                 w_gate_up: torch.Tensor, w_down: torch.Tensor):
        self.comm = comm
        self.n_experts = n_experts
        self.w_gate_up = w_gate_up
        self.w_down = w_down
        self.set_placement(slot_expert, replica_share)

    def set_placement(self, slot_expert: np.ndarray, replica_share: np.ndarray) -> None:
        """Route by a new placement (the weights must already match it: see ``replace.migrate``)."""
        slot_expert = np.asarray(slot_expert)
        if slot_expert.ndim != 2 or slot_expert.shape[0] != self.comm.world:
            raise ValueError(f"slot_expert has shape {slot_expert.shape}, expected [gpus={self.comm.world}, slots]")
        if slot_expert.shape[1] != self.w_gate_up.shape[0]:
            raise ValueError(f"placement has {slot_expert.shape[1]} slots per GPU, weights hold {self.w_gate_up.shape[0]}")
        self.slot_expert = slot_expert
        self.replica_share = np.asarray(replica_share, dtype=np.float64)
        self.slots_per_gpu = slot_expert.shape[1]
        phys, cum, count = replica_tables(slot_expert, self.replica_share, self.n_experts)
        dev = self.comm.device
        self._phys = torch.as_tensor(phys, device=dev)
        self._cum = torch.as_tensor(cum, device=dev)
        self._count = torch.as_tensor(count, device=dev)
        self._single_copy = bool(count.max() <= 1)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 timer: PhaseTimer | None = None, stats: LayerStats | None = None) -> torch.Tensor:
        """``x [T_r, H]`` (this rank's tokens) -> ``[T_r, H]``, the MoE output for those tokens."""
        mark = timer.mark if timer is not None else (lambda name: None)
        mark("start")
        if self._single_copy:
            phys = self._phys[topk_ids.long(), 0]
        else:
            phys = choose_slots(topk_ids, self._phys, self._cum, self._count)
        if not self.comm.distributed:  # one rank: every slot is local, no communication
            mark("dispatch")
            y = expert_compute(x, self.w_gate_up, self.w_down, phys, topk_weights, dense=True)
            mark("expert")
            mark("combine")
            if stats is not None:
                stats.local_assignments += topk_ids.numel()
            return y
        return self._forward_ep(x, phys, topk_weights, mark, stats)

    def _forward_ep(self, x, phys, topk_weights, mark, stats):
        comm, G, S = self.comm, self.comm.world, self.slots_per_gpu
        T, k = phys.shape
        H = x.shape[1]
        gpu = phys // S
        # one message per (token, destination rank), sorted rank-major
        key = (gpu * T + torch.arange(T, device=x.device)[:, None]).reshape(-1)
        pair_key, inverse = torch.unique(key, return_inverse=True)
        pair_gpu, pair_token = pair_key // T, pair_key % T
        P = pair_key.numel()
        col = torch.arange(k, device=x.device).repeat(T)
        meta = torch.zeros(P, 2 * k, dtype=torch.float32, device=x.device)
        meta[:, :k] = -1
        meta[inverse, col] = (phys % S).reshape(-1).float()  # local slot id (exact in float32)
        meta[inverse, k + col] = topk_weights.reshape(-1).float()
        send_counts = torch.bincount(pair_gpu, minlength=G)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=comm.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        N = sum(recv)
        x_recv = x.new_empty(N, H)
        meta_recv = meta.new_empty(N, 2 * k)
        dist.all_to_all_single(x_recv, x[pair_token].contiguous(), recv, send, group=comm.group)
        dist.all_to_all_single(meta_recv, meta, recv, send, group=comm.group)
        mark("dispatch")
        slot_ids = meta_recv[:, :k].long()
        y_recv = expert_compute(x_recv, self.w_gate_up, self.w_down, slot_ids, meta_recv[:, k:])
        mark("expert")
        y_back = x.new_empty(P, H)
        dist.all_to_all_single(y_back, y_recv, send, recv, group=comm.group)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.zeros(T, H, dtype=acc, device=x.device)
        out.index_add_(0, pair_token, y_back.to(acc))
        mark("combine")
        if stats is not None:
            off_sent = sum(c for g, c in enumerate(send) if g != comm.rank)
            off_recv = sum(c for g, c in enumerate(recv) if g != comm.rank)
            row_bytes = H * x.element_size()
            stats.bytes_sent += off_sent * (row_bytes + 2 * k * 4) + off_recv * row_bytes
            stats.local_assignments += int((slot_ids >= 0).sum())
            stats.send_counts = send
        return out.to(x.dtype)


# ---- tensor-parallel layer ------------------------------------------------------------------------

def tp_shard(w_gate_up: torch.Tensor, w_down: torch.Tensor, rank: int, world: int):
    """Rank ``rank``'s shard of every expert: ``[E,2F,H], [E,H,F]`` -> ``[E,2F/w,H], [E,H,F/w]``.

    Gate and up rows are split alike (column parallel), down columns to match (row parallel), so
    ``silu(gate) * up`` stays elementwise on each shard and the shards' outputs sum to the whole.
    """
    n_ffn = w_down.shape[-1]
    if n_ffn % world:
        raise ValueError(f"ffn size {n_ffn} is not divisible by the {world} tensor-parallel ranks")
    f = n_ffn // world
    rows = slice(rank * f, (rank + 1) * f)
    gate_up = torch.cat([w_gate_up[:, :n_ffn][:, rows], w_gate_up[:, n_ffn:][:, rows]], dim=1)
    return gate_up.contiguous(), w_down[:, :, rows].contiguous()


class TensorParallelMoE:
    """Every expert on every rank, FFN split ``world`` ways; all ranks see the same tokens ``x [T, H]``."""

    def __init__(self, comm: Comm, w_gate_up_shard: torch.Tensor, w_down_shard: torch.Tensor):
        self.comm = comm
        self.w_gate_up = w_gate_up_shard
        self.w_down = w_down_shard

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 timer: PhaseTimer | None = None, stats: LayerStats | None = None) -> torch.Tensor:
        mark = timer.mark if timer is not None else (lambda name: None)
        mark("start")
        mark("dispatch")
        y = expert_compute(x, self.w_gate_up, self.w_down, topk_ids.long(), topk_weights, dense=True)
        mark("expert")
        if self.comm.distributed:
            y = y.float() if y.device.type == "cpu" and y.dtype == torch.bfloat16 else y
            dist.all_reduce(y, group=self.comm.group)
            if stats is not None:  # ring all-reduce: each rank sends 2 (w-1)/w of the tensor
                w = self.comm.world
                stats.bytes_sent += int(2 * (w - 1) / w * y.numel() * y.element_size())
        mark("combine")
        if stats is not None:
            stats.local_assignments += topk_ids.numel()
        return y.to(x.dtype)


# ---- weights ---------------------------------------------------------------------------------------

def expert_weights(layer: int, expert: int, hidden: int, ffn: int, dtype=torch.float32, device="cpu",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights of one expert, the same on every rank: ``([2F, H], [H, F])``, scaled 1/sqrt(fan-in).

    Seeded by (seed, layer, expert) so any rank can make any replica without communication.
    """
    gen = torch.Generator(device=device).manual_seed(hash((seed, layer, expert)) % (2**62))
    gate_up = torch.randn(2 * ffn, hidden, generator=gen, device=device, dtype=torch.float32) / hidden**0.5
    down = torch.randn(hidden, ffn, generator=gen, device=device, dtype=torch.float32) / ffn**0.5
    return gate_up.to(dtype), down.to(dtype)


def slot_weights(slot_expert_row: np.ndarray, layer: int, hidden: int, ffn: int, dtype=torch.float32,
                 device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of one rank's slots, ``slot_expert_row [S]`` -> ``([S, 2F, H], [S, H, F])``; empty slots random."""
    S = len(slot_expert_row)
    gate_up = torch.empty(S, 2 * ffn, hidden, dtype=dtype, device=device)
    down = torch.empty(S, hidden, ffn, dtype=dtype, device=device)
    for s, e in enumerate(np.asarray(slot_expert_row).tolist()):
        gate_up[s], down[s] = expert_weights(layer, e if e >= 0 else -1 - s, hidden, ffn, dtype, device, seed)
    return gate_up, down
