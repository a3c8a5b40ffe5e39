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

import math
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


@triton.jit
def expert_counts(ids_ptr, n_pairs, E_POW2: tl.constexpr, SCAN: tl.constexpr):
    """[E_POW2] int32: how many of the n_pairs ids name each expert (one program scans them all)."""
    counts = tl.zeros([E_POW2], tl.int32)
    for start in range(0, n_pairs, SCAN):
        offs = start + tl.arange(0, SCAN)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_POW2)
    bins = tl.arange(0, E_POW2)
    n_masked = tl.cdiv(n_pairs, SCAN) * SCAN - n_pairs  # masked lanes were counted as expert 0
    return counts - tl.where(bins == 0, n_masked, 0)


@triton.jit
def expert_pairs_in_order(ids_ptr, dest_ptr, pair_slot_ptr, expert, first, n_pairs,
                          SCAN: tl.constexpr, WRITE_SLOT: tl.constexpr):
    """A stable scan of the ids: dest[first + i] = the i-th pair routed to expert (and with
    WRITE_SLOT, pair_slot[pair] = its position). first: an int32 tensor. Returns first + count."""
    running = first
    for start in range(0, n_pairs, SCAN):
        offs = start + tl.arange(0, SCAN)
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
        match = ids == expert
        slot = running + tl.cumsum(match.to(tl.int32), 0) - 1
        tl.store(dest_ptr + slot, offs, mask=match)
        if WRITE_SLOT:
            tl.store(pair_slot_ptr + offs, slot, mask=match)
        running += tl.sum(match.to(tl.int32), 0)
    return running


@triton.jit(do_not_specialize=["n_pairs"])
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, n_padded_ptr, pair_slot_ptr, n_pairs,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, SCAN: tl.constexpr,
):
    expert = tl.program_id(0)
    # Pass 1: every program counts all experts (the ids are tiny and sit in L2), so that each
    # knows its own padded offset without a second launch.
    counts = expert_counts(ids_ptr, n_pairs, E_POW2, SCAN)
    bins = tl.arange(0, E_POW2)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    my_start = tl.sum(tl.where(bins == expert, ends - padded, 0), 0)
    my_count = tl.sum(tl.where(bins == expert, counts, 0), 0)
    my_padded = tl.sum(tl.where(bins == expert, padded, 0), 0)
    if expert == 0:
        tl.store(n_padded_ptr, tl.sum(padded, 0))
    # Pass 2: this expert's pairs, in pair order (a stable sort), at my_start onwards.
    expert_pairs_in_order(ids_ptr, sorted_ptr, pair_slot_ptr, expert, my_start, n_pairs, SCAN, True)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + my_start + my_count + pad, n_pairs, mask=pad < my_padded - my_count)
    first_block = my_start // BLOCK_M
    for b in range(0, my_padded // BLOCK_M, BLOCK_M):
        blocks = b + tl.arange(0, BLOCK_M)
        tl.store(block_expert_ptr + first_block + blocks, expert, mask=blocks < my_padded // BLOCK_M)


@triton.jit(do_not_specialize=["n_pairs"])
def _chunk_hist_kernel(ids_ptr, chunk_counts_ptr, n_pairs, E_POW2: tl.constexpr, SCAN: tl.constexpr):
    """chunk_counts[c, e] = pairs of chunk c (SCAN ids) routed to expert e."""
    chunk = tl.program_id(0)
    offs = chunk * SCAN + tl.arange(0, SCAN)
    ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=0).to(tl.int32)
    counts = tl.histogram(ids, E_POW2)
    bins = tl.arange(0, E_POW2)
    n_masked = tl.maximum((chunk + 1) * SCAN - n_pairs, 0)
    counts -= tl.where(bins == 0, n_masked, 0)
    tl.store(chunk_counts_ptr + chunk * E_POW2 + bins, counts)


@triton.jit(do_not_specialize=["n_pairs", "n_chunks", "n_experts"])
def _chunk_scatter_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ptr, block_expert_ptr, n_padded_ptr, pair_slot_ptr,
    n_pairs, n_chunks, n_experts,
    E_POW2: tl.constexpr, CHUNKS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, SCAN: tl.constexpr,
):
    """Chunk c places its pairs: expert e's padded start + e's pairs in earlier chunks + rank
    within the chunk. Each program also fills its share of padding and block -> expert rows."""
    chunk = tl.program_id(0)
    rows = tl.arange(0, CHUNKS_POW2)
    bins = tl.arange(0, E_POW2)
    counts = tl.load(chunk_counts_ptr + rows[:, None] * E_POW2 + bins[None, :],
                     mask=rows[:, None] < n_chunks, other=0)
    totals = tl.sum(counts, 0)
    before = tl.sum(tl.where(rows[:, None] < chunk, counts, 0), 0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    base = starts + before
    offs = chunk * SCAN + tl.arange(0, SCAN)
    ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=-1)
    for expert in range(0, n_experts):
        match = ids == expert
        slot = tl.sum(tl.where(bins == expert, base, 0), 0) + tl.cumsum(match.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + slot, offs, mask=match)
        tl.store(pair_slot_ptr + offs, slot, mask=match)
    # padding rows of the experts this program owns (expert % n_chunks == chunk)
    pad = tl.arange(0, BLOCK_M)
    for expert in range(chunk, n_experts, n_chunks):
        e_start = tl.sum(tl.where(bins == expert, starts, 0), 0)
        e_count = tl.sum(tl.where(bins == expert, totals, 0), 0)
        e_padded = tl.sum(tl.where(bins == expert, padded, 0), 0)
        tl.store(sorted_ptr + e_start + e_count + pad, n_pairs, mask=pad < e_padded - e_count)
    # block -> expert for this program's share of the used blocks
    n_blocks = tl.sum(padded, 0) // BLOCK_M
    per = tl.cdiv(n_blocks, n_chunks)
    for b0 in range(chunk * per, tl.minimum(chunk * per + per, n_blocks), 256):
        blocks = b0 + tl.arange(0, 256)
        owner = tl.sum((ends[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, owner,
                 mask=(blocks < n_blocks) & (blocks < chunk * per + per))
    if chunk == 0:
        tl.store(n_padded_ptr, tl.sum(padded, 0))


def align(topk_ids: torch.Tensor, n_experts: int, block_m: int, scan: int = SCAN) -> RoutingMeta:
    """Sort the (token, slot) pairs of topk_ids [T, k] by expert, padded per expert to block_m.

    Returns a RoutingMeta (see the module docstring) on topk_ids' device; no host sync. Up to a
    few `scan` chunks of pairs: one launch, one program per expert walking all ids. More: two
    launches over chunks of `scan` pairs (per-chunk histograms, then each chunk places its
    pairs), whose cost stays flat as the batch grows instead of growing with the serial walk.
    """
    ids = topk_ids.reshape(-1).contiguous()  # any integer dtype
    n_pairs = ids.numel()
    max_padded = triton.cdiv(n_pairs + n_experts * (block_m - 1), block_m) * block_m
    device = topk_ids.device
    sorted_pair_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    n_padded = torch.empty(1, dtype=torch.int32, device=device)
    pair_slot = torch.empty(n_pairs, dtype=torch.int32, device=device)
    e_pow2 = triton.next_power_of_2(n_experts)
    # Measured on an H100 (NOTES.md, v3): one launch costs ~4 us + ~2.2 us per scan chunk, the
    # chunked version ~5 us + ~0.9 us per expert (its per-expert placement loop), so switch
    # at about 0.4 * E chunks (E=8: past 4096 pairs; E=64: past ~26k pairs).
    if n_pairs <= scan * max(4, math.ceil(0.4 * n_experts)):
        _align_kernel[(n_experts,)](
            ids, sorted_pair_ids, block_expert, n_padded, pair_slot, n_pairs,
            E_POW2=e_pow2, BLOCK_M=block_m, SCAN=scan, num_warps=8,
        )
    else:
        n_chunks = triton.cdiv(n_pairs, scan)
        chunk_counts = torch.empty(n_chunks, e_pow2, dtype=torch.int32, device=device)
        _chunk_hist_kernel[(n_chunks,)](ids, chunk_counts, n_pairs, E_POW2=e_pow2, SCAN=scan,
                                        num_warps=4)
        _chunk_scatter_kernel[(n_chunks,)](
            ids, chunk_counts, sorted_pair_ids, block_expert, n_padded, pair_slot,
            n_pairs, n_chunks, n_experts, E_POW2=e_pow2,
            CHUNKS_POW2=triton.next_power_of_2(n_chunks), BLOCK_M=block_m, SCAN=scan,
            num_warps=8,
        )
    return RoutingMeta(sorted_pair_ids, block_expert, n_padded, pair_slot, block_m, n_pairs)
