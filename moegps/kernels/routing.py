"""Routing metadata for the grouped expert GEMMs, built on the device in one Triton launch.

A (token, slot) pair p = t * k + j of `topk_ids [T, k]` is routed to expert topk_ids[t, j]. The
grouped kernels want the pairs sorted by expert, each expert's run padded to a multiple of the
block size BLOCK_M, so that every block of BLOCK_M sorted rows belongs to one expert:

    sorted_pair_ids [max_padded]  pair index per sorted row; padding rows hold n_pairs (a sentinel)
    block_expert    [max_blocks]  expert of each BLOCK_M block (valid for blocks < n_padded / BLOCK_M)
    n_padded        [1]           rows actually used (sum over experts of the padded counts)
    pair_slot       [n_pairs]     the inverse map: sorted row of each pair

All sizes are the worst case (n_pairs + E * (BLOCK_M - 1)), so nothing is read back to the host:
the kernels read `n_padded` and skip blocks past it. One program per expert reads the ids twice
(a histogram, which gives every expert's padded offset, then its own rows in order), so the
whole step is a single launch instead of the dozen small torch ops (sort, bincount, cumsum, ...)
an eager version takes; vLLM's `moe_align_block_size` does the same job in its own CUDA kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SCAN = 1024  # ids read per loop step


@dataclass
class RoutingMeta:
    sorted_pair_ids: torch.Tensor  # [max_padded] int32
    block_expert: torch.Tensor  # [max_blocks] int32
    n_padded: torch.Tensor  # [1] int32, on the device
    pair_slot: torch.Tensor  # [n_pairs] int32
    block_m: int
    n_pairs: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


@triton.jit(do_not_specialize=["n_pairs"])
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, n_padded_ptr, pair_slot_ptr, n_pairs,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, SCAN: tl.constexpr,
):
    expert = tl.program_id(0)
    # Pass 1: every program counts all experts (the ids are tiny and sit in L2), so that each
    # knows its own padded offset without a second launch.
    counts = tl.zeros([E_POW2], tl.int32)
    for start in range(0, n_pairs, SCAN):
        offs = start + tl.arange(0, SCAN)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_POW2)
    bins = tl.arange(0, E_POW2)
    n_masked = tl.cdiv(n_pairs, SCAN) * SCAN - n_pairs  # masked lanes were counted as expert 0
    counts -= tl.where(bins == 0, n_masked, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    my_start = tl.sum(tl.where(bins == expert, ends - padded, 0), 0)
    my_count = tl.sum(tl.where(bins == expert, counts, 0), 0)
    my_padded = tl.sum(tl.where(bins == expert, padded, 0), 0)
    if expert == 0:
        tl.store(n_padded_ptr, tl.sum(padded, 0))
    # Pass 2: this expert's pairs, in pair order (a stable sort), at my_start onwards.
    running = my_start
    for start in range(0, n_pairs, SCAN):
        offs = start + tl.arange(0, SCAN)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
        match = ids == expert
        slot = running + tl.cumsum(match.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + slot, offs, mask=match)
        tl.store(pair_slot_ptr + offs, slot, mask=match)
        running += tl.sum(match.to(tl.int32), 0)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + my_start + my_count + pad, n_pairs, mask=pad < my_padded - my_count)
    first_block = my_start // BLOCK_M
    for b in range(0, my_padded // BLOCK_M, BLOCK_M):
        blocks = b + tl.arange(0, BLOCK_M)
        tl.store(block_expert_ptr + first_block + blocks, expert, mask=blocks < my_padded // BLOCK_M)


def align(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> RoutingMeta:
    """Sort the (token, slot) pairs of topk_ids [T, k] by expert, padded per expert to block_m.

    Returns a RoutingMeta (see the module docstring) on topk_ids' device; no host sync.
    """
    ids = topk_ids.reshape(-1).contiguous()  # any integer dtype
    n_pairs = ids.numel()
    max_padded = triton.cdiv(n_pairs + n_experts * (block_m - 1), block_m) * block_m
    device = topk_ids.device
    sorted_pair_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    n_padded = torch.empty(1, dtype=torch.int32, device=device)
    pair_slot = torch.empty(n_pairs, dtype=torch.int32, device=device)
    _align_kernel[(n_experts,)](
        ids, sorted_pair_ids, block_expert, n_padded, pair_slot, n_pairs,
        E_POW2=triton.next_power_of_2(n_experts), BLOCK_M=block_m, SCAN=SCAN, num_warps=8,
    )
    return RoutingMeta(sorted_pair_ids, block_expert, n_padded, pair_slot, block_m, n_pairs)
