"""Routing metadata for the grouped expert GEMMs, built on the device in Triton (no host sync).

A (token, slot) pair p = t * k + j of `topk_ids [T, k]` is routed to expert topk_ids[t, j]. The
grouped kernels want the pairs sorted by expert, each expert's run padded to a multiple of the
block size BLOCK_M, so that every block of BLOCK_M sorted rows belongs to one expert:

    sorted_pair_ids [max_padded]    pair index per sorted row; padding rows hold n_pairs (a sentinel)
    block_expert    [max_blocks]    expert of each block (valid for blocks < n_blocks)
    block_start     [max_blocks+1]  first sorted row of each block, and n_padded after the last, so
                                    block b has block_start[b + 1] - block_start[b] rows
    n_blocks        [1]             blocks actually used
    n_padded        [1]             rows actually used (sum over experts of the padded counts)
    pair_slot       [n_pairs]       the inverse map: sorted row of each pair

With `half_tail`, each expert's run is padded only to a multiple of BLOCK_M / 2, and its last
block has BLOCK_M / 2 rows where that is all it needs. The kernels then run that block at half
height: at 64 experts and 2048 tokens (~192 rows each) that is 15.6% padded MMA rows instead of
33% (the issue's "no padded blocks"; NOTES.md v10). Blocks per expert are the same either way.
With `pad_m`, a divisor of BLOCK_M, runs are padded to a multiple of pad_m and an expert's run
is split into its ceil(padded / BLOCK_M) blocks as evenly as pad_m allows (the swap path: BLOCK_M
up to 256, pad_m 32): an expert of 544 padded rows in blocks of up to 160 takes 128, 128, 128 and
160 rows, not 160, 160, 160 and 64, since a short block reads a whole weight tile for few columns.

All sizes are the worst case (n_pairs + E * (BLOCK_M - 1)), so nothing is read back to the host:
the kernels read `n_blocks` and skip blocks past it. Up to a few thousand pairs, one program per
expert reads the ids twice (a histogram, which gives every expert's padded offset, then its own
rows in order): a single launch instead of the dozen small torch ops (sort, bincount, cumsum, ...)
an eager version takes. Beyond that, two launches over 1024-pair chunks, each chunk sorting
its pairs in registers, whose cost stays about flat (12.6-19.1 us on an H200 from 1k to 131k pairs,
CUDA graphs, L2 flushed; NOTES.md session 20). vLLM's
`moe_align_block_size` does the same job in its own CUDA kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import launch_flags, wait_for_predecessor

SCAN = 1024  # ids read per loop step
# align's one-launch method up to this many SCAN chunks of pairs, the chunked launches above:
# measured on an H100 (NOTES.md v11; `bench --align`), one launch 5.8-7.6 us at 1 chunk, 10.9 at
# 3, 12.2 at 4, 26 at 12; the chunked launches 14-20 us at any size up to 96 chunks (on an H200, two of
# them: 12.6-19.1 us up to 128 chunks, the one launch 6.3-12.7 us up to 4; NOTES.md session 20).
ONE_LAUNCH_CHUNKS = 4


@dataclass
class RoutingMeta:
    sorted_pair_ids: torch.Tensor  # [max_padded] int32
    block_expert: torch.Tensor  # [max_blocks] int32
    block_start: torch.Tensor  # [max_blocks + 1] int32
    n_blocks: torch.Tensor  # [1] int32, on the device
    n_padded: torch.Tensor  # [1] int32, on the device
    pair_slot: torch.Tensor  # [n_pairs] int32
    block_m: int
    n_pairs: int
    half_tail: bool = False

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


@triton.jit
def _padded_layout(counts, BLOCK_M: tl.constexpr, PAD_M: tl.constexpr):
    """Per expert ([E_POW2] each): padded rows, first sorted row, blocks, first block index."""
    padded = (counts + PAD_M - 1) // PAD_M * PAD_M
    blocks = (padded + BLOCK_M - 1) // BLOCK_M
    return padded, tl.cumsum(padded, 0) - padded, blocks, tl.cumsum(blocks, 0) - blocks


@triton.jit
def _store_totals(block_start_ptr, n_blocks_ptr, n_padded_ptr, padded, blocks):
    n_blocks = tl.sum(blocks, 0)
    tl.store(n_padded_ptr, tl.sum(padded, 0))
    tl.store(n_blocks_ptr, n_blocks)
    tl.store(block_start_ptr + n_blocks, tl.sum(padded, 0))


@triton.jit
def _expert_layout(counts, expert, BLOCK_M: tl.constexpr, PAD_M: tl.constexpr):
    """From every expert's count ([E_POW2]): this expert's first sorted row, count, padded rows,
    blocks and first block, and the [E_POW2] padded rows and blocks of all (for the totals) and
    first sorted rows of all."""
    padded, starts, blocks, first_blocks = _padded_layout(counts, BLOCK_M, PAD_M)
    mine = tl.arange(0, counts.shape[0]) == expert
    return (tl.sum(tl.where(mine, starts, 0), 0), tl.sum(tl.where(mine, counts, 0), 0),
            tl.sum(tl.where(mine, padded, 0), 0), tl.sum(tl.where(mine, blocks, 0), 0),
            tl.sum(tl.where(mine, first_blocks, 0), 0), padded, blocks, starts)


@triton.jit
def _write_expert_blocks(sorted_ptr, block_expert_ptr, block_start_ptr, expert, start, count,
                         padded, blocks, first_block, n_pairs, BLOCK_M: tl.constexpr,
                         PAD_M: tl.constexpr, EVEN: tl.constexpr):
    """The expert's padding rows (the sentinel n_pairs, fewer than PAD_M) and its blocks' expert
    and first row (BLOCK_M need not be a power of two: the swap path's 160). EVEN: the padded rows
    split into `blocks` blocks of as equal heights as PAD_M allows, else BLOCK_M rows each and the
    rest in the last."""
    pad = tl.arange(0, PAD_M)
    tl.store(sorted_ptr + start + count + pad, n_pairs, mask=pad < padded - count)
    for b in range(0, blocks, 64):
        block = b + tl.arange(0, 64)
        if EVEN:
            first_row = start + block * (padded // PAD_M) // blocks * PAD_M
        else:
            first_row = start + block * BLOCK_M
        tl.store(block_expert_ptr + first_block + block, expert, mask=block < blocks)
        tl.store(block_start_ptr + first_block + block, first_row, mask=block < blocks)


@triton.jit(do_not_specialize=["n_pairs"])
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_padded_ptr,
    pair_slot_ptr, n_pairs,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, PAD_M: tl.constexpr, EVEN: tl.constexpr,
    SCAN: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    expert = tl.program_id(0)
    # Pass 1: every program counts all experts (the ids are tiny and sit in L2), so that each
    # knows its own padded offset without a second launch.
    counts = expert_counts(ids_ptr, n_pairs, E_POW2, SCAN)
    start, count, padded, blocks, first_block, all_padded, all_blocks, _ = _expert_layout(
        counts, expert, BLOCK_M, PAD_M)
    if expert == 0:
        _store_totals(block_start_ptr, n_blocks_ptr, n_padded_ptr, all_padded, all_blocks)
    # Pass 2: this expert's pairs, in pair order (a stable sort), at its first row onwards.
    expert_pairs_in_order(ids_ptr, sorted_ptr, pair_slot_ptr, expert, start, n_pairs, SCAN, True)
    _write_expert_blocks(sorted_ptr, block_expert_ptr, block_start_ptr, expert, start, count,
                         padded, blocks, first_block, n_pairs, BLOCK_M, PAD_M, EVEN)


@triton.jit(do_not_specialize=["n_pairs"])
def _chunk_hist_kernel(ids_ptr, chunk_counts_ptr, n_pairs, E_POW2: tl.constexpr, SCAN: tl.constexpr,
                       PDL: tl.constexpr = False):
    """chunk_counts[c, e] = pairs of chunk c (SCAN ids) routed to expert e."""
    wait_for_predecessor(PDL)
    chunk = tl.program_id(0)
    offs = chunk * SCAN + tl.arange(0, SCAN)
    ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=0).to(tl.int32)
    counts = tl.histogram(ids, E_POW2)
    bins = tl.arange(0, E_POW2)
    n_masked = tl.maximum((chunk + 1) * SCAN - n_pairs, 0)
    counts -= tl.where(bins == 0, n_masked, 0)
    tl.store(chunk_counts_ptr + chunk * E_POW2 + bins, counts)


@triton.jit(do_not_specialize=["n_pairs", "n_chunks", "n_experts"])
def _chunk_place_kernel(
    ids_ptr, chunk_counts_ptr, delta_ptr, sorted_ptr, block_expert_ptr, block_start_ptr,
    n_blocks_ptr, n_padded_ptr, pair_slot_ptr, n_pairs, n_chunks, n_experts,
    E_POW2: tl.constexpr, CHUNKS_POW2: tl.constexpr, SCAN: tl.constexpr, BLOCK_M: tl.constexpr,
    PAD_M: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr = False,
):
    """From the per-chunk counts [n_chunks, E_POW2] (every program reads them all: a few KB in
    L2), program p writes expert p's padding rows and blocks (p < n_experts) and places chunk p's
    pairs (p < n_chunks): it sorts them by (expert, pair) in registers (one bitonic sort of SCAN
    keys, instead of a scan per expert) and writes the i-th pair of expert e to sorted row
    delta[p, e] + i, where delta (scratch, [n_chunks, E_POW2], row p its own) is
        e's first row + e's pairs in earlier chunks - the chunk's pairs of smaller experts.
    Each program works out every expert's layout itself, so no launch between the counts and the
    placing (three launches before: the offsets had one of their own)."""
    wait_for_predecessor(PDL)
    program = tl.program_id(0)
    rows = tl.arange(0, CHUNKS_POW2)[:, None]
    bins = tl.arange(0, E_POW2)
    counts = tl.load(chunk_counts_ptr + rows * E_POW2 + bins[None, :], mask=rows < n_chunks, other=0)
    start, count, padded, blocks, first_block, all_padded, all_blocks, starts = _expert_layout(
        tl.sum(counts, 0), program, BLOCK_M, PAD_M)
    if program == 0:
        _store_totals(block_start_ptr, n_blocks_ptr, n_padded_ptr, all_padded, all_blocks)
    if program < n_experts:
        _write_expert_blocks(sorted_ptr, block_expert_ptr, block_start_ptr, program, start, count,
                             padded, blocks, first_block, n_pairs, BLOCK_M, PAD_M, EVEN)
    if program < n_chunks:
        before = tl.sum(tl.where(rows < program, counts, 0), 0)  # its pairs in earlier chunks
        mine = tl.sum(tl.where(rows == program, counts, 0), 0)
        # e's first sorted row + its pairs in earlier chunks - this chunk's pairs of smaller experts,
        # through memory: a register tensor cannot be indexed by each pair's expert
        tl.store(delta_ptr + program * E_POW2 + bins, starts + before - (tl.cumsum(mine, 0) - mine))
        tl.debug_barrier()
        lane = tl.arange(0, SCAN)
        offs = program * SCAN + lane
        ids = tl.load(ids_ptr + offs, mask=offs < n_pairs, other=E_POW2).to(tl.int32)  # last
        key = tl.sort(ids * SCAN + lane)
        expert = key // SCAN
        pair = program * SCAN + key % SCAN
        real = expert < E_POW2
        slot = tl.load(delta_ptr + program * E_POW2 + expert, mask=real, other=0) + lane
        tl.store(sorted_ptr + slot, pair, mask=real)
        tl.store(pair_slot_ptr + pair, slot, mask=real)


def align_variant(n_pairs: int, scan: int = SCAN) -> tuple:
    """What of ``n_pairs`` picks a compiled kernel of ``align``: its method (``"one"`` up to ONE_LAUNCH_CHUNKS
    chunks of ``scan`` pairs, else ``"chunked"``) and, chunked, the chunk count's next power of two (a constexpr).
    A warm-up that means to compile every kernel a range of token counts runs covers each
    (engine.serve.packed_prefill_sizes)."""
    chunks = triton.cdiv(n_pairs, scan)
    return ("one",) if chunks <= ONE_LAUNCH_CHUNKS else ("chunked", triton.next_power_of_2(chunks))


def align(topk_ids: torch.Tensor, n_experts: int, block_m: int, scan: int = SCAN,
          half_tail: bool = False, method: str | None = None,
          pad_m: int | None = None) -> RoutingMeta:
    """Sort the (token, slot) pairs of topk_ids [T, k] by expert, padded per expert to block_m
    (to block_m / 2 with `half_tail`, whose last block per expert may be a half block; to `pad_m`,
    a divisor of block_m, where given: the swap path's blocks of up to 256 rows padded to 32, each
    expert's run split evenly over its blocks).

    Returns a RoutingMeta (see the module docstring) on topk_ids' device; no host sync.
    method "one": one launch, one program per expert walking all ids (cheapest for a few `scan`
    chunks of pairs). "chunked": two launches over chunks of `scan` pairs (per-chunk
    histograms; then each program works out every expert's offsets from them, writes one
    expert's padding and blocks and sorts and places one chunk's pairs), whose cost stays about
    flat as the batch grows. None: by the number of chunks.
    """
    if half_tail and (block_m < 32 or block_m & (block_m - 1)):
        raise ValueError(f"half_tail needs block_m a power of two >= 32 (half blocks of >= 16 "
                         f"rows for the tensor cores), got block_m={block_m}")
    even = pad_m is not None
    if pad_m is None:
        pad_m = block_m // 2 if half_tail else block_m
    elif half_tail or block_m % pad_m:
        raise ValueError(f"pad_m must divide block_m={block_m} (and not come with half_tail), "
                         f"got pad_m={pad_m}")
    if pad_m < 1 or pad_m & (pad_m - 1):
        raise ValueError(f"the padding (block_m, or pad_m where given) must be a power of two, "
                         f"got {pad_m}")
    ids = topk_ids.reshape(-1).contiguous()  # any integer dtype
    n_pairs = ids.numel()
    max_padded = triton.cdiv(n_pairs + n_experts * (pad_m - 1), pad_m) * pad_m
    # an expert's blocks are ceil(count / block_m) either way
    max_blocks = triton.cdiv(n_pairs + n_experts * (block_m - 1), block_m)
    device = topk_ids.device
    sorted_pair_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    block_start = torch.empty(max_blocks + 1, dtype=torch.int32, device=device)
    n_blocks = torch.empty(1, dtype=torch.int32, device=device)
    n_padded = torch.empty(1, dtype=torch.int32, device=device)
    pair_slot = torch.empty(n_pairs, dtype=torch.int32, device=device)
    outputs = (sorted_pair_ids, block_expert, block_start, n_blocks, n_padded, pair_slot)
    e_pow2 = triton.next_power_of_2(n_experts)
    # One launch costs ~4 us + ~2 us per scan chunk (each program walks all ids twice); the
    # chunked launches cost about the same at any size (ONE_LAUNCH_CHUNKS).
    if method is None:
        method = align_variant(n_pairs, scan)[0]
    pdl = launch_flags(topk_ids)
    if method == "one":
        _align_kernel[(n_experts,)](ids, *outputs, n_pairs, E_POW2=e_pow2, BLOCK_M=block_m,
                                    PAD_M=pad_m, EVEN=even, SCAN=scan, num_warps=8, **pdl)
    elif method == "chunked":
        n_chunks = triton.cdiv(n_pairs, scan)
        chunk_counts = torch.empty(n_chunks, e_pow2, dtype=torch.int32, device=device)
        delta = torch.empty(n_chunks, e_pow2, dtype=torch.int32, device=device)
        _chunk_hist_kernel[(n_chunks,)](ids, chunk_counts, n_pairs, E_POW2=e_pow2, SCAN=scan,
                                        num_warps=4, **pdl)
        _chunk_place_kernel[(max(n_chunks, n_experts),)](
            ids, chunk_counts, delta, *outputs[:5], pair_slot, n_pairs, n_chunks, n_experts,
            E_POW2=e_pow2, CHUNKS_POW2=triton.next_power_of_2(n_chunks), SCAN=scan,
            BLOCK_M=block_m, PAD_M=pad_m, EVEN=even, num_warps=8, **pdl)
    else:
        raise ValueError(f"align method must be 'one', 'chunked' or None, got {method!r}")
    return RoutingMeta(*outputs, block_m, n_pairs, half_tail)
