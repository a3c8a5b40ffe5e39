"""Hopper-only grouped expert GEMMs in Gluon: persistent and warp-specialised (the "wgmma" path).

The Triton kernels of fused_moe.py stay 10-20 points under cuBLAS's batched GEMM at
compute-bound sizes (Mixtral at 2048 tokens 84% of floor against 100%; NOTES.md, session 8):
their warps both issue the copies and run the tensor cores, and Triton 3.6's own warp
specialisation does not compile those loops on Hopper. Here the schedule is written out, after
CUTLASS's "TMA warp-specialised" Hopper kernels and the Gluon tutorials (warp specialisation):

    a producer warp         claims each next tile from the launch's counter (an atomic add),
                            hands its index to the consumers, waits for a free stage of the
                            ring, issues the TMA copies of the token rows [128, BLOCK_K] and the weight rows
                            [BLOCK_N, BLOCK_K] (gate/up: the gate and the up rows side by side)
    two consumer warpgroups one partition each, 64 rows of every tile each: wait for a full
                            stage, run wgmma asynchronously, free the stage of the step before
                            (a stage's barrier counts one arrival per warpgroup), then store
                            the tile's epilogue (SiLU(gate) * up into h, or the routing weight
                            times the down projection into y) through shared memory and TMA

One program per SM; the tiles (row block, N tile) are numbered with the row blocks of a group
adjacent and claimed in that order, so the tiles running at once are always consecutive ones and
share each expert's weight slab through L2. (A fixed stride, program p taking tiles p, p + 132,
..., let the programs drift apart on uneven routing, whose short tail blocks run faster: the
weights were read from DRAM about three times at Mixtral's 2048 tokens; NOTES.md, session 11.)
On an expert's last block of 64 rows (align's half_tail) the warpgroups split the columns instead of the rows, so
its MMAs take half a tile's time; its weight loads do not shrink, and where they set the pace it
gains nothing over one warpgroup idling (NOTES.md, session 10).

Operands are in expert order (rows sorted by expert, each expert padded to whole blocks by
routing.align): TMA has no row gather on Hopper, so launch.gather_rows copies the token rows into
that order first (one launch, ~1% of a compute-bound Mixtral call), or, with the gate/up tile's
"gather" (GATHER warps), the producer is a warpgroup that copies each block's rows straight from x
by cp.async (the 64 experts from 8192 tokens: 1-6% faster; Mixtral 2-6% slower; NOTES.md v21-22).
h and y stay in expert order and the k-way combine reads y through the routing's inverse map.
Padding rows are not copied: they hold whatever the buffer held and compute garbage never read.

With config "one_launch" (launch_moe) both GEMMs are one launch: the down GEMM's tiles are numbered
after the gate/up GEMM's, so an SM done with gate/up goes on to down tiles instead of idling
through the first launch's tail. A down tile reads h that other SMs wrote: the consumers hand
each gate/up tile's h to the producer in their epilogue buffers, the producer stores it by TMA,
waits for the stores and counts them on the block (a release add), and a down tile's producer
waits for its block's count (an acquire load) before its copies. The counting is the producer's so
that the tensor cores' warpgroups never wait on a store (NOTES.md v41, v43).

GPU-only: Gluon has no CPU interpreter. benchmarks/kernels/wgmma_probe.py checks the kernels on
the GPU against the fp32 reference; tests/test_wgmma_moe.py compiles them for sm_90 on the CPU
(no spills, shared memory within bounds) and tests the rest (tile order, config checks).
NOTES.md, session 9 on, has the measurements.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

try:  # Gluon ships with Triton >= 3.4; its Hopper modules are only needed on a Hopper GPU
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                  tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.6 (the lent GPU's) names the TMA copies async_copy_global_to_shared and
    # async_copy_shared_to_global; later releases async_load and async_store (old names raise)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # cp.async (the rows a producer gathers itself): 3.6's async_copy_global_to_shared, later async_load
    _partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (3.9's name, 3.6's)
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # and a shared buffer's reinterpretation _reinterpret (3.9: reinterpret)
    _NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    HAVE_GLUON = True
except (ImportError, AssertionError):  # pragma: no cover - depends on the Triton build
    # (Gluon's module asserts at import when Triton's CPU interpreter replaced triton.jit)
    HAVE_GLUON = False


def supported(device: torch.device | None = None) -> bool:
    """True on a Hopper GPU (sm_90) with Gluon: the only place these kernels run."""
    if not (HAVE_GLUON and torch.cuda.is_available()):
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return device.type == "cuda" and _capability(device) == (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, asked once (get_config asks on every MoE call)."""
    return torch.cuda.get_device_capability(device)


def tile_order(tile: int, n_blocks: int, n_tiles_n: int, group: int) -> tuple[int, int]:
    """(row block, N tile) of the tile-th tile: row blocks in groups of `group`, and within a
    group the row blocks fastest, so tiles that run at once share a weight slab. The kernels'
    `_tile` is the same arithmetic; this copy is what the CPU tests check it with."""
    per_group = group * n_tiles_n
    first = (tile // per_group) * group
    size = min(n_blocks - first, group)
    within = tile % per_group
    return first + within % size, within // size


if HAVE_GLUON:
    TILE_RING = gl.constexpr(4)  # tile ids in flight from the producer to the consumers
    # TIMELINE: each partition's record of its tiles (benchmarks/kernels/timeline.py reads it):
    # int64 [programs, 3 partitions (consumer 0, consumer 1, producer), TIMELINE_TILES, FIELDS]
    TIMELINE_TILES = gl.constexpr(256)
    FIELDS = gl.constexpr(6)

    @gluon.jit
    def _clock():
        """The SM's cycle counter (%clock64)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _globaltimer():
        """The GPU's nanosecond timer (%globaltimer), the same on every SM."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _record(timeline_ptr, role, i):
        """The first field of partition `role`'s record of its i-th tile (past TIMELINE_TILES, the
        last record, taken over and over: benchmarks/kernels/timeline.py refuses such a launch)."""
        slot = gl.minimum(i, TIMELINE_TILES - 1)
        return timeline_ptr + ((gl.program_id(0) * 3 + role) * TIMELINE_TILES + slot) * FIELDS

    @gluon.jit
    def _tile(tile, n_blocks, n_tiles_n, group):
        per_group = group * n_tiles_n
        first = (tile // per_group) * group
        size = gl.minimum(n_blocks - first, group)
        within = tile % per_group
        return first + within % size, within // size

    @gluon.jit
    def _block(tile, n_blocks_ptr, n_tiles_n, group, block_start_ptr):
        """(row block, N tile, the block's first sorted row, its rows) of the tile-th tile."""
        block, tile_n = _tile(tile, gl.load(n_blocks_ptr), n_tiles_n, group)
        row = gl.load(block_start_ptr + block)
        return block, tile_n, row, gl.load(block_start_ptr + block + 1) - row

    @gluon.jit
    def _barriers(STAGES: gl.constexpr, READY_COUNT: gl.constexpr):
        """The schedule's barriers, initialised: each stage's ready (READY_COUNT arrivals, the
        producer's) and empty (one arrival from each consumer warpgroup), and the ring of claimed
        tile ids, producer to consumers, with its full and empty barriers."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        tile_ids = gl.allocate_shared_memory(gl.int32, [TILE_RING, 1],
                                             gl.SwizzledSharedLayout(1, 1, 1, [0]))
        tile_full = gl.allocate_shared_memory(gl.int64, [TILE_RING, 1], mbarrier.MBarrierLayout())
        tile_empty = gl.allocate_shared_memory(gl.int64, [TILE_RING, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=READY_COUNT)
            mbarrier.init(empty.index(i), count=2)
        for i in gl.static_range(TILE_RING):
            mbarrier.init(tile_full.index(i), count=1)
            mbarrier.init(tile_empty.index(i), count=2)
        return ready, empty, tile_ids, tile_full, tile_empty

    @gluon.jit
    def _claim(tile_counter_ptr, i, DYNAMIC: gl.constexpr):
        """The producer's i-th tile: the next of the launch's tile counter (DYNAMIC), or this
        program's i-th in a fixed stride over the programs."""
        if DYNAMIC:
            return gl.atomic_add(tile_counter_ptr, 1)
        else:
            return gl.program_id(0) + i * gl.num_programs(0)

    @gluon.jit
    def _publish(tile_ids, tile_full, tile_empty, i, tile):
        """The producer hands its i-th tile to both consumer partitions (a ring of tile ids)."""
        D: gl.constexpr = tile_ids.shape[0]
        slot = i % D
        mbarrier.wait(tile_empty.index(slot), ((i // D) & 1) ^ 1)
        tile_ids.index(slot).store(gl.full([1], tile, gl.int32, gl.BlockedLayout([1], [32], [gl.num_warps()], [0])))
        mbarrier.arrive(tile_full.index(slot))

    @gluon.jit
    def _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC: gl.constexpr):
        """A consumer's i-th tile: the one the producer handed over (DYNAMIC), or the same fixed
        stride as the producer's."""
        if DYNAMIC:
            D: gl.constexpr = tile_ids.shape[0]
            slot = i % D
            mbarrier.wait(tile_full.index(slot), (i // D) & 1)
            tile = tile_ids.index(slot).load(gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))
            mbarrier.arrive(tile_empty.index(slot))
            return gl.max(tile, 0)
        else:
            return gl.program_id(0) + i * gl.num_programs(0)

    @gluon.jit
    def _tile_counts(first, second, n_blocks_ptr, FUSED: gl.constexpr):
        """(the first GEMM's N tiles a block, its tiles, the launch's tiles: FUSED, the down GEMM's
        follow) from each GEMM's tuple (launch's _gemm)."""
        (a_desc, b_desc, b_half_desc, out_desc, out_half_desc, n_tiles_n, k_dim, b_rows,
         up_offset) = first
        (a2_desc, b2_desc, b2_half_desc, out2_desc, out2_half_desc, n_tiles_n2, k_dim2, b_rows2,
         up_offset2) = second
        n_blocks = gl.load(n_blocks_ptr)
        n_first = n_blocks * n_tiles_n
        return n_tiles_n, n_first, n_first + n_blocks * n_tiles_n2 if FUSED else n_first

    @gluon.jit
    def _producer(p, GATE_UP: gl.constexpr, DYNAMIC: gl.constexpr, GATHER: gl.constexpr,
                  TIMELINE: gl.constexpr, FUSED: gl.constexpr):
        """One warp (GATHER: that many): copies of every tile's operands into the ring of stages, by
        TMA, or for GATHER the token rows by cp.async, each thread arriving on the stage. DYNAMIC: it
        claims each next tile from the launch's counter and hands it to the consumers, so the
        tiles that run at once are always a window of consecutive ones (they share weight slabs
        through L2) however much the programs' paces differ (NOTES.md, session 11). FUSED: the
        tiles past the first GEMM's are the down GEMM's, each started once its block's h is stored."""
        first, second, s = p
        (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
         block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
         tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free) = s
        n_tiles_n, n_first, n_tiles = _tile_counts(first, second, n_blocks_ptr, FUSED)
        step = 0
        i = 0
        none = n_first * 0 - 1
        # FUSED: the gate/up tile before's h in the consumers' epilogue buffers, to store (its block,
        # first row, column, half height: prev_block >= 0), the block whose stores are not yet
        # counted, and the hand-overs stored so far
        hand = (none, none, none, none, none, n_first * 0)
        tile = _claim(tile_counter_ptr, i, DYNAMIC)
        if DYNAMIC:  # (past the last tile: the consumers stop)
            _publish(tile_ids, tile_full, tile_empty, i, tile)
        while tile < n_tiles:
            if FUSED:  # (as in _consumer, a branch for each)
                if tile >= n_first:  # once h of its block is in: a count for each of its gate/up
                    # tiles (the producer counts a tile's two stores once)
                    step, tile, hand = _produce_tile(second, s, tile, n_first, step, i, False, DYNAMIC,
                                                     0, GATHER, TIMELINE, n_tiles_n, first, hand, True)
                else:
                    step, tile, hand = _produce_tile(first, s, tile, 0, step, i, GATE_UP, DYNAMIC,
                                                     GATHER, GATHER, TIMELINE, 0, first, hand, True)
            else:
                step, tile, hand = _produce_tile(first, s, tile, 0, step, i, GATE_UP, DYNAMIC, GATHER,
                                                 GATHER, TIMELINE, 0, first, hand, False)
            i += 1
        if FUSED:  # the last gate/up tile's h, if the launch ended on one, and the last count
            _flush_handed(s, first, hand)

    @gluon.jit
    def _produce_tile(g, s, tile, tile_base, step, i, GATE_UP: gl.constexpr, DYNAMIC: gl.constexpr,
                      GATHER: gl.constexpr, ROW_ARRIVALS: gl.constexpr, TIMELINE: gl.constexpr,
                      h_ready, hand_g, hand, FUSED: gl.constexpr):
        """The producer's copies of one tile (tile - tile_base of GEMM g) into the ring; returns the
        step count and the next tile, claimed while this one's copies fill the ring. ROW_ARRIVALS:
        the producer's warps whose every thread arrives on each stage (the kernel's GATHER, whose
        barriers count them, whether or not this GEMM gathers). h_ready > 0: wait for the block's
        counter (after the tile counter) to reach it before the first copy."""
        (a_desc, b_desc, b_half_desc, out_desc, out_half_desc, n_tiles_n, k_dim, b_rows, up_offset) = g
        (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
         block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
         tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free) = s
        prev_block, prev_row, prev_col, prev_half, pend, n_stored = hand
        STAGES: gl.constexpr = a_bufs.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        ROWS: gl.constexpr = BLOCK_M // 2
        QUARTER: gl.constexpr = BLOCK_N // 2
        # the bytes a stage's TMA copies bring (GATHER: the token rows come by cp.async instead)
        A_BYTES: gl.constexpr = 0 if GATHER else a_desc.block_type.nbytes
        if GATE_UP:
            nbytes: gl.constexpr = A_BYTES + 2 * b_desc.block_type.nbytes
        else:
            nbytes: gl.constexpr = A_BYTES + b_desc.block_type.nbytes
        # GATHER: 16-byte pieces of the token rows, 8 rows x 4 pieces a warp
        ROW_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [gl.num_warps(), 1], [1, 0])
        # each next tile is claimed and handed over while this one's copies fill the ring, where
        # the producer waits for free stages anyway: at a tile's end neither the claim's round trip
        # nor the consumers' wait for the next tile id stands between two tiles (NOTES.md v36)
        CLAIM_STEP = gl.minimum(STAGES - 1, (k_dim + BLOCK_K - 1) // BLOCK_K - 1)
        if TIMELINE:  # tile, its start (clock), then below: metadata read, last copy issued, waits
            record = _record(timeline_ptr, 2, i)
            gl.store(record, tile.to(gl.int64))
            gl.store(record + 1, _clock())
            gl.store(record + 5, _globaltimer())
            waited = gl.to_tensor(0).to(gl.int64)
        block, tile_n, row, n_rows = _block(tile - tile_base, n_blocks_ptr, n_tiles_n, group,
                                            block_start_ptr)
        half_block = n_rows <= ROWS
        w_row = gl.load(block_expert_ptr + block) * b_rows + tile_n * BLOCK_N
        if TIMELINE:
            gl.store(record + 2, _clock())
        if GATHER:  # the block's token rows of x (padding rows and those past the block: none)
            r = gl.arange(0, BLOCK_M, gl.SliceLayout(1, ROW_LAYOUT))
            c = gl.arange(0, BLOCK_K, gl.SliceLayout(0, ROW_LAYOUT))
            pair = gl.load(sorted_ptr + row + r, mask=r < n_rows, other=-1)
            keep = (pair >= 0) & (pair < n_pairs)
            # k_dim (H) is a multiple of 8 (TMA already needs the weights' rows 16-byte aligned),
            # so every row starts 16-byte aligned: one cp.async per 8 columns
            start = gl.multiple_of(gl.where(keep, pair // top_k, 0).to(gl.int64) * k_dim, 8)
            src = x_ptr + start[:, None] + c[None, :]
        if h_ready > 0:  # (FUSED) the gate/up tiles' stores this producer holds first: none may wait
            n_stored = _flush_handed(s, hand_g, hand)
            prev_block = prev_block * 0 - 1
            pend = pend * 0 - 1
            _wait_count(tile_counter_ptr + 1 + block, h_ready)
        # the consumers' epilogue of the tile before ends about when this tile's first STAGES copies
        # are in the ring, where the producer waits for a free stage anyway: its h is stored then,
        # and the buffers are freed STAGES steps on, when the stores have long read them (the
        # consumers need them again only at this tile's end)
        STORE_STEP = gl.minimum(STAGES, (k_dim + BLOCK_K - 1) // BLOCK_K - 1)
        FREE_STEP = gl.minimum(STORE_STEP + STAGES, (k_dim + BLOCK_K - 1) // BLOCK_K - 1)
        stored_before = n_stored
        next_tile = tile
        for k in range(0, k_dim, BLOCK_K):
            stage = step % STAGES
            if TIMELINE:
                before = _clock()
            # a fresh mbarrier counts as having completed the phase before phase 0
            mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
            if TIMELINE:
                waited += _clock() - before
            bar = ready.index(stage)
            mbarrier.expect(bar, nbytes)
            if GATHER:  # each thread's copies arrive on the stage's barrier when they land
                _cp_async(a_bufs.index(stage), src + k, mask=keep[:, None])
            else:
                _tma_load(a_desc, [row, k], bar, a_bufs.index(stage))
            if ROW_ARRIVALS:  # (with no copies of its own, a thread's arrival is at once)
                async_copy.mbarrier_arrive(bar, increment_count=False)
            if GATE_UP:  # gate rows over up rows, one [2 * BLOCK_N, BLOCK_K] stage buffer
                b = b_bufs.index(stage)
                if half_block:  # each warpgroup's column half: its gate rows over its up rows
                    _tma_load(b_half_desc, [w_row, k], bar, b.slice(0, QUARTER))
                    _tma_load(b_half_desc, [w_row + up_offset, k], bar, b.slice(QUARTER, QUARTER))
                    _tma_load(b_half_desc, [w_row + QUARTER, k], bar, b.slice(BLOCK_N, QUARTER))
                    _tma_load(b_half_desc, [w_row + up_offset + QUARTER, k], bar,
                              b.slice(BLOCK_N + QUARTER, QUARTER))
                else:
                    _tma_load(b_desc, [w_row, k], bar, b.slice(0, BLOCK_N))
                    _tma_load(b_desc, [w_row + up_offset, k], bar, b.slice(BLOCK_N, BLOCK_N))
            else:
                _tma_load(b_desc, [w_row, k], bar, b_bufs.index(stage))
            if k == CLAIM_STEP * BLOCK_K:
                next_tile = _claim(tile_counter_ptr, i + 1, DYNAMIC)
                if DYNAMIC:
                    _publish(tile_ids, tile_full, tile_empty, i + 1, next_tile)
            if FUSED:
                if k == STORE_STEP * BLOCK_K:
                    if prev_block >= 0:
                        pend, n_stored = _issue_handed(s, hand_g, prev_block, prev_row, prev_col,
                                                       prev_half, pend, n_stored)
                        prev_block = prev_block * 0 - 1
                if k == FREE_STEP * BLOCK_K:
                    if n_stored > stored_before:
                        _free_handed(out_free)
            step += 1
        if TIMELINE:
            gl.store(record + 3, _clock())
            gl.store(record + 4, waited)
        if FUSED:
            if GATE_UP:  # this tile's h: the consumers hand it over at their epilogue
                prev_block = block
                prev_row = row
                prev_col = tile_n * BLOCK_N
                prev_half = half_block.to(gl.int32)
        return step, next_tile, (prev_block, prev_row, prev_col, prev_half, pend, n_stored)

    @gluon.jit
    def _flush_handed(s, g, hand):
        """Everything the producer holds, at once (before a down tile, which may wait for it, or at
        the launch's end): the handed-over h it has not stored (stored, the buffers freed) and
        every count it owes. Returns the hand-overs stored; nothing is held or owed after."""
        (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
         block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
         tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free) = s
        prev_block, prev_row, prev_col, prev_half, pend, n_stored = hand
        if prev_block >= 0:
            pend, n_stored = _issue_handed(s, g, prev_block, prev_row, prev_col, prev_half, pend,
                                           n_stored)
            _free_handed(out_free)
        if pend >= 0:
            _count_stores(tile_counter_ptr + 1 + pend)
        return n_stored

    @gluon.jit
    def _issue_handed(s, g, block, row, col, half, pend, n_stored):
        """The producer stores a gate/up tile's h that the consumers handed over in their epilogue
        buffers (FUSED: its TMA stores and their count are then off the tensor cores' path,
        NOTES.md v43), first counting the stores of the tile before (`pend`), which are in memory
        by now. Returns (block, hand-overs stored); _free_handed gives the buffers back."""
        (a_desc, b_desc, b_half_desc, out_desc, out_half_desc, n_tiles_n, k_dim, b_rows, up_offset) = g
        (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
         block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
         tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free) = s
        if pend >= 0:
            _count_stores(tile_counter_ptr + 1 + pend)
        mbarrier.wait(out_full.index(0), n_stored & 1)
        mbarrier.wait(out_full.index(1), n_stored & 1)
        if half > 0:  # each warpgroup's column half of the block's rows
            HALF_N: gl.constexpr = out_half_desc.block_type.shape[1]
            _tma_store(out_half_desc, [row, col], _view_as(out_bufs.index(0), out_half_desc))
            _tma_store(out_half_desc, [row, col + HALF_N], _view_as(out_bufs.index(1), out_half_desc))
        else:  # each warpgroup's rows
            ROWS: gl.constexpr = out_desc.block_type.shape[0]
            _tma_store(out_desc, [row, col], out_bufs.index(0))
            _tma_store(out_desc, [row + ROWS, col], out_bufs.index(1))
        return block, n_stored + 1

    @gluon.jit
    def _free_handed(out_free):
        """Once the producer's stores have read the epilogue buffers, give them back."""
        tma.store_wait(0)
        mbarrier.arrive(out_free.index(0))
        mbarrier.arrive(out_free.index(1))

    @gluon.jit
    def _consumer(p, GATE_UP: gl.constexpr, HALF: gl.constexpr, DYNAMIC: gl.constexpr,
                  GATHER: gl.constexpr, TIMELINE: gl.constexpr, FUSED: gl.constexpr):
        """One warpgroup: rows HALF * BLOCK_M / 2 onwards of every tile, or on a block of at most
        BLOCK_M / 2 rows all its rows and column half HALF (each consumer frees each stage once: a
        stage's barrier counts two arrivals). FUSED: the down GEMM's tiles follow the gate/up
        GEMM's, and a gate/up tile's h goes to the producer through the epilogue buffer, which
        stores and counts it (NOTES.md v43): a count on the warpgroup's own path cost it more than
        one launch gains (v41)."""
        first, second, s = p
        (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
         block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
         tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free) = s
        n_tiles_n, n_first, n_tiles = _tile_counts(first, second, n_blocks_ptr, FUSED)
        step = 0
        i = 0
        n_hand = n_first * 0  # FUSED: gate/up epilogues handed to the producer to store
        tile = _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC)
        while tile < n_tiles:
            record = timeline_ptr
            if TIMELINE:  # tile, its start (clock), then in _tile_mma: first stage, MMAs, epilogue
                record = _record(timeline_ptr, HALF, i)
                gl.store(record, tile.to(gl.int64))
                gl.store(record + 1, _clock())
            # (Triton 3.6 miscompiles the unfused kernel where one `if` over a static False picks
            # the GEMM: its own branch for each)
            if FUSED:
                if tile >= n_first:
                    step = _consume_tile(second, s, tile - n_first, step, False, HALF, 0, record,
                                         TIMELINE, n_hand, True)
                else:
                    step = _consume_tile(first, s, tile, step, GATE_UP, HALF, GATHER, record,
                                         TIMELINE, n_hand, True)
                    n_hand += 1
            else:
                step = _consume_tile(first, s, tile, step, GATE_UP, HALF, GATHER, record, TIMELINE,
                                     n_hand, False)
            i += 1
            tile = _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC)
        tma.store_wait(0)

    @gluon.jit
    def _consume_tile(g, s, tile, step, GATE_UP: gl.constexpr, HALF: gl.constexpr,
                      GATHER: gl.constexpr, record, TIMELINE: gl.constexpr, n_hand,
                      FUSED: gl.constexpr):
        """One warpgroup's part of tile `tile` of GEMM g (_tile_mma, after the block's shape);
        returns the step count. FUSED: the epilogue buffer is the producer's until it has stored
        the last hand-over (n_hand of them so far), and a gate/up tile hands its h over."""
        (a_desc, b_desc, b_half_desc, out_desc, out_half_desc, n_tiles_n, k_dim, b_rows, up_offset) = g
        (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
         block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
         tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free) = s
        hand = (out_full, out_free, n_hand)
        ROWS: gl.constexpr = a_bufs.shape[1] // 2
        block, tile_n, start, n_rows = _block(tile, n_blocks_ptr, n_tiles_n, group, block_start_ptr)
        if n_rows > ROWS:
            step = _tile_mma(a_bufs, b_bufs, out_desc, _view_as(out_bufs.index(HALF), out_desc),
                             ready, empty, sorted_ptr, weights_ptr, k_dim, n_pairs, step,
                             start + HALF * ROWS, tile_n, GATE_UP, HALF, False, GATHER, record,
                             TIMELINE, hand, FUSED)
        else:  # a half-height block (an expert's last, align's half_tail): its rows, half the columns
            step = _tile_mma(a_bufs, b_bufs, out_half_desc,
                             _view_as(out_bufs.index(HALF), out_half_desc), ready, empty,
                             sorted_ptr, weights_ptr, k_dim, n_pairs, step, start, tile_n, GATE_UP,
                             HALF, True, GATHER, record, TIMELINE, hand, FUSED)
        return step

    @gluon.jit
    def _tile_mma(a_bufs, b_bufs, out_desc, out_smem, ready, empty, sorted_ptr, weights_ptr,
                  k_dim, n_pairs, step, start, tile_n, GATE_UP: gl.constexpr,
                  HALF: gl.constexpr, SPLIT_N: gl.constexpr, GATHER: gl.constexpr, record,
                  TIMELINE: gl.constexpr, hand, FUSED: gl.constexpr):
        """One warpgroup's share of a tile: rows start.. (its row half; with SPLIT_N the tile's
        only rows, and its column half HALF), the MMAs over K, then the epilogue through shared
        memory and a TMA store, which runs on while the next tile's MMAs start (every block is a
        whole number of half-blocks of the sorted order: align pads each expert to one, so a box
        never reaches into another block's rows). Returns the step count. FUSED (hand: the
        epilogue buffers' barriers and the hand-overs so far): the buffer is written once the
        producer has stored the last hand-over from it, and gate/up's h is handed over, not stored.
        TIMELINE: the tile's record gets the clock at its first full stage, at its MMAs' end and
        after its epilogue, and the cycles its K loop spent waiting for the other stages."""
        STAGES: gl.constexpr = a_bufs.shape[0]
        BLOCK_K: gl.constexpr = a_bufs.shape[2]
        ROWS: gl.constexpr = a_bufs.shape[1] // 2
        TILE_N: gl.constexpr = b_bufs.shape[1] // 2 if GATE_UP else b_bufs.shape[1]  # output columns
        # this warpgroup's weight rows of the stage (gate/up: gate and up columns side by side)
        WIDTH: gl.constexpr = b_bufs.shape[1] // 2 if SPLIT_N else b_bufs.shape[1]
        BLOCK_N: gl.constexpr = WIDTH // 2 if GATE_UP else WIDTH
        A_ROW: gl.constexpr = 0 if SPLIT_N else HALF * ROWS
        B_ROW: gl.constexpr = HALF * WIDTH if SPLIT_N else 0
        col = tile_n * TILE_N + (HALF * BLOCK_N if SPLIT_N else 0)
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, WIDTH, 16])
        acc = gl.zeros([ROWS, WIDTH], gl.float32, layout)
        if not GATE_UP:  # the rows' routing weights, read while the MMAs run: in the epilogue their
            # two dependent loads left the tensor cores idle (NOTES.md v35)
            rows = start + gl.arange(0, ROWS, gl.SliceLayout(1, layout))
            pair = gl.load(sorted_ptr + rows)  # padding rows hold n_pairs
            weight = gl.load(weights_ptr + pair, mask=pair < n_pairs, other=0.0).to(gl.float32)
        first = step
        if TIMELINE:
            waited = gl.to_tensor(0).to(gl.int64)
        for k in range(0, k_dim, BLOCK_K):
            stage = step % STAGES
            if TIMELINE:
                before = _clock()
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            if TIMELINE:  # the first stage's wait is the record's own field
                now = _clock()
                waited += gl.where(step == first, 0, now - before)
                if step == first:
                    gl.store(record + 2, now)
            if GATHER:  # rows written by cp.async (generic proxy), read by wgmma (async proxy)
                fence_async_shared()
            acc = warpgroup_mma(a_bufs.index(stage).slice(A_ROW, ROWS),
                                b_bufs.index(stage).slice(B_ROW, WIDTH).permute((1, 0)), acc,
                                is_async=True)
            # this step's MMA may run on; the step before's is done with its stage
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=step > first)
            step += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))
        if TIMELINE:
            gl.store(record + 3, _clock())
            gl.store(record + 5, waited)
        if FUSED:
            out_full, out_free, n_hand = hand
            mbarrier.wait(out_free.index(HALF), (n_hand & 1) ^ 1)
        if GATE_UP:  # h in expert order: h[row] = silu(gate) * up
            gate, up = acc.reshape([ROWS, 2, BLOCK_N]).permute(0, 2, 1).split()
            if FUSED:  # handed to the producer, which stores it and counts it for the down tiles
                out_smem.store((_silu(gate) * up).to(out_desc.dtype))
                fence_async_shared()
                mbarrier.arrive(out_full.index(HALF))
            else:
                _store(out_desc, out_smem, _silu(gate) * up, start, col)
        else:  # y in expert order: y[row] = routing weight of the row's pair * (h @ w2^T)
            value = acc * weight[:, None]
            if out_smem.shape[1] == BLOCK_N:
                _store(out_desc, out_smem, value, start, col)
            else:  # two column halves through one buffer
                left, right = value.reshape([ROWS, 2, BLOCK_N // 2]).permute(0, 2, 1).split()
                _store(out_desc, out_smem, left, start, col)
                _store(out_desc, out_smem, right, start, col + BLOCK_N // 2)
        if TIMELINE:
            gl.store(record + 4, _clock())
        return step

    @gluon.jit
    def _count_stores(count_ptr):
        """Once this partition's TMA stores are in memory, one more on *count_ptr (release, GPU
        scope): the down tiles' producers wait for a block's count before their copies read h.
        Every thread waits for its own stores (only the issuing thread has any) and orders them
        (async proxy) before its generic accesses; the partition's barrier orders them before the
        count, which Triton issues from one thread of the partition (as the tile claims). The
        partition's warps need not start at a warpgroup: a one-warp producer runs as warp 10."""
        gl.inline_asm_elementwise("cp.async.bulk.wait_group 0;\nfence.proxy.async.global;\nmov.u32 $0, 0;",
                                  "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        _partition_barrier()
        gl.atomic_add(count_ptr, 1, sem="release", scope="gpu")

    @gluon.jit
    def _load_acquire(ptr):
        return gl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr],
                                         dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _wait_count(count_ptr, target):
        """Spin until *count_ptr (acquire, GPU scope) reaches target, then order this thread's
        later TMA copies (async proxy) after what it read."""
        count = _load_acquire(count_ptr)
        while count < target:
            count = _load_acquire(count_ptr)
        gl.inline_asm_elementwise("fence.proxy.async.global;\nmov.u32 $0, 0;", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _silu(x):
        """x * sigmoid(x) as x/2 (1 + tanh(x/2)), by tanh.approx.f32: one MUFU op an element, where
        x / (1 + exp(-x)) takes two (EX2, RCP) and a division's range check; while the tensor cores
        wait for the epilogue, MUFU sets its pace (16 results a cycle an SM; NOTES.md v27). The
        error is tanh.approx's (2^-11) times |x| / 2: at most |x| 2^-12 absolute, which shows only
        where silu is near 0 (x << 0); h against fp32 kept its 1.66e-3 on the H200."""
        half = 0.5 * x
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [half], dtype=gl.float32,
                                      is_pure=True, pack=1)
        return half + half * t

    @gluon.jit
    def _view_as(buffer, desc):
        """The start of a shared buffer as a buffer of desc's box (its dtype, shape and layout)."""
        if _NEW_REINTERPRET:
            return buffer.reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
        else:
            return buffer._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)

    @gluon.jit
    def _store(out_desc, out_smem, value, row, col):
        tma.store_wait(0)  # the previous store has read the buffer
        out_smem.store(value.to(out_desc.dtype))
        fence_async_shared()
        _tma_store(out_desc, [row, col], out_smem)

    @gluon.jit
    def grouped_gemm_kernel(a_desc, b_desc, b_half_desc, out_desc, out_half_desc, sorted_ptr,
                            weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr,
                            n_tiles_n, group, k_dim, n_pairs, b_rows, up_offset, tile_counter_ptr,
                            x_ptr, top_k, timeline_ptr, a2_desc, b2_desc, b2_half_desc, out2_desc,
                            out2_half_desc, n_tiles_n2, k_dim2, b_rows2, GATE_UP: gl.constexpr,
                            STAGES: gl.constexpr, DYNAMIC: gl.constexpr, GATHER: gl.constexpr,
                            TIMELINE: gl.constexpr = False, FUSED: gl.constexpr = False):
        """GATE_UP: out = h [max_padded, F] (expert order) = silu(A @ w1^T) * (A @ w3^T), with A
        the gathered token rows and b_desc over w_gate_up [E * 2F, H] (up rows at +up_offset).
        Otherwise: out = y [max_padded, H] (expert order) = routing weight * (h @ w2^T), b_desc
        over w_down [E * H, F]. b_rows: weight rows per expert (2F or H). b_half_desc and
        out_half_desc: the same tensors in boxes of half the columns (the blocks of half height).
        Four warps (the default partition: the low half of each tile's rows) and two worker
        partitions: the high half's warpgroup and the producer warp. DYNAMIC: tiles are claimed
        from tile_counter_ptr (one int32, zero at launch), else each program takes every
        num_programs-th. GATHER > 0 (gate/up): A is x [T, H] in token order (x_ptr; a_desc only
        gives the stages' box and layout) and a producer of GATHER warps copies each block's rows
        of the sorted pairs' tokens (pair // top_k) itself. TIMELINE: each partition records its
        tiles' times into timeline_ptr (int64, TIMELINE_TILES records of FIELDS a partition and
        program; otherwise it is never read).
        FUSED (with GATE_UP and DYNAMIC): both GEMMs in one launch, the down GEMM's (the *2
        arguments, over h = out and y) tiles numbered after the gate/up GEMM's; tile_counter_ptr
        is then int32 [1 + max_blocks], zeros: the tile counter, then each block's count of h
        stores (one count a gate/up tile, by the producer), which its down tiles wait for. The stages are shared: the down
        GEMM's boxes must be the gate/up GEMM's (launch_moe checks). Otherwise the *2 arguments
        are never read."""
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        WIDTH: gl.constexpr = 2 * BLOCK_N if GATE_UP else BLOCK_N
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape,
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, WIDTH, BLOCK_K], b_desc.layout)
        out_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape,
                                             out_desc.layout)
        # GATHER (> 0): a producer of that many warps, which arrives on a stage once for its TMA
        # copies and once a thread for its row copies
        PRODUCER_WARPS: gl.constexpr = GATHER if GATHER else 1
        ready, empty, tile_ids, tile_full, tile_empty = _barriers(STAGES, 1 + 32 * GATHER)
        first = (a_desc, b_desc, b_half_desc, out_desc, out_half_desc, n_tiles_n, k_dim, b_rows,
                 up_offset)
        second = (a2_desc, b2_desc, b2_half_desc, out2_desc, out2_half_desc, n_tiles_n2, k_dim2,
                  b_rows2, 0)
        # FUSED: each consumer's epilogue buffer handed to the producer (full) and back (free)
        out_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        out_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for h in gl.static_range(2):
            mbarrier.init(out_full.index(h), count=1)
            mbarrier.init(out_free.index(h), count=1)
        shared = (a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
                  block_start_ptr, n_blocks_ptr, group, n_pairs, tile_ids, tile_full, tile_empty,
                  tile_counter_ptr, x_ptr, top_k, timeline_ptr, out_full, out_free)
        p = (first, second, shared)
        gl.warp_specialize([(_consumer, (p, GATE_UP, 0, DYNAMIC, GATHER, TIMELINE, FUSED)),
                            (_consumer, (p, GATE_UP, 1, DYNAMIC, GATHER, TIMELINE, FUSED)),
                            (_producer, (p, GATE_UP, DYNAMIC, GATHER, TIMELINE, FUSED))],
                           [4, PRODUCER_WARPS], [232, 80 if GATHER else 24])


# Registers a thread at launch: 168 x 3 warpgroups fill the SM's 64k; the producer's gives all but 24
# of its own to the consumers (setmaxnreg), which leaves them 232-248 each.
MAX_REGISTERS = 168


def _descriptor(t: torch.Tensor, block: list[int]):
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16
                                                  else gl.float16)
    return TensorDescriptor.from_tensor(t, block, layout)


class _Gemm(NamedTuple):
    """One GEMM's kernel arguments (_gemm)."""
    descs: tuple  # a, the weights, the weights in half-width boxes, out, out in half-width boxes
    n_tiles_n: int
    k_dim: int
    b_rows: int
    up_offset: int

    def as_second(self) -> tuple:
        """The kernel's arguments of the second GEMM (a2_desc ... out2_half_desc, n_tiles_n2,
        k_dim2, b_rows2)."""
        return (*self.descs, self.n_tiles_n, self.k_dim, self.b_rows)


def _gemm(a, w2d, out, tile: dict, block_m: int, b_rows: int, up_offset: int) -> _Gemm:
    """One GEMM's kernel arguments: descriptors of a [max_padded, K] (its boxes: a block's rows),
    the weights w2d [E * b_rows, K] and out [max_padded, N] (whole and half-width boxes), then its
    N tiles, K, b_rows and up_offset."""
    block_n, block_k = tile["block_n"], tile["block_k"]
    descs = (_descriptor(a, [block_m, block_k]), _descriptor(w2d, [block_n, block_k]),
             _descriptor(w2d, [block_n // 2, block_k]),
             _descriptor(out, [block_m // 2, min(block_n, 128)]),
             _descriptor(out, [block_m // 2, block_n // 2]))
    return _Gemm(descs, triton.cdiv(out.shape[1], block_n), a.shape[1], b_rows, up_offset)


def _run(first: _Gemm, second: _Gemm | None, a, weights, routing, tile: dict, gate_up: bool,
         top_k: int | None, timeline: torch.Tensor | None) -> None:
    """grouped_gemm_kernel on GEMM `first` (its tile settings `tile`), and with `second` the down
    GEMM's tiles after it in the same launch (FUSED); one program per SM, or fewer where there are
    fewer tiles. a: the first GEMM's A (x itself where top_k is given: the producer gathers)."""
    fused = second is not None
    n_tiles_n = first.n_tiles_n + (second.n_tiles_n if fused else 0)
    programs = min(torch.cuda.get_device_properties(a.device).multi_processor_count,
                   routing.max_blocks * n_tiles_n)
    grouped_gemm_kernel[(programs,)](
        *first.descs, routing.sorted_pair_ids,
        routing.sorted_pair_ids if weights is None else weights,  # gate/up never reads it
        routing.block_expert, routing.block_start, routing.n_blocks, first.n_tiles_n,
        tile.get("group_m", 8), first.k_dim, routing.n_pairs, first.b_rows, first.up_offset,
        # the tile counter, then (FUSED) each block's count of h stores: a memset
        torch.zeros(1 + (routing.max_blocks if fused else 0), dtype=torch.int32, device=a.device),
        a, top_k or 1,  # GATHER's x and k (its descriptor above only gives the stages' layout)
        routing.n_blocks if timeline is None else timeline,  # (never read without TIMELINE)
        *(second or first).as_second(),  # (no second GEMM: never read)
        GATE_UP=gate_up, STAGES=tile["num_stages"], DYNAMIC=fused or tile.get("dynamic", True),
        GATHER=0 if top_k is None else tile["gather"], TIMELINE=timeline is not None,
        FUSED=fused, num_warps=4, maxnreg=MAX_REGISTERS)


def _launch(a, w2d, out, weights, routing, tile: dict, b_rows: int, up_offset: int,
            gate_up: bool, top_k: int | None = None, timeline: torch.Tensor | None = None) -> None:
    """One grouped GEMM: a [max_padded, K] and out [max_padded, N] in expert order, w2d the
    weights [E * b_rows, K], `weights` the routing weights [T*k] (the down GEMM's; None for
    gate/up); one program per SM. With top_k, a is x [T, K] in token order instead and the
    producer gathers each block's rows itself (gate/up only). With `timeline` (int64, from
    new_timeline), the kernel records its tiles' times into it."""
    _run(_gemm(a, w2d, out, tile, routing.block_m, b_rows, up_offset), None, a, weights, routing,
         tile, gate_up, top_k, timeline)


def new_timeline(device) -> torch.Tensor:
    """A buffer for one launch's TIMELINE records: int64 [programs (one an SM), 3 partitions
    (consumer warpgroups 0 and 1, producer), tiles (the first TIMELINE_TILES), fields]. A
    consumer's fields: tile, clocks at its start, first full stage, MMAs done, epilogue issued, and
    the cycles spent waiting for full stages after the first; the producer's: tile, clocks at its
    start, metadata read, last copy issued, the cycles spent waiting for free stages, and
    %globaltimer (ns) at its start. Clocks are the SM's %clock64; records of tiles never run stay -1."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.full((sms, 3, TIMELINE_TILES.value, FIELDS.value), -1, dtype=torch.int64,
                      device=device)


def check_config(config: dict, x: torch.Tensor) -> None:
    """A wgmma config's constraints, as errors naming the field."""
    if config["block_m"] != 128:
        raise ValueError(f"config field 'block_m' must be 128 on the 'wgmma' path (a warpgroup's "
                         f"64 rows each for two), got {config['block_m']}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the 'wgmma' path takes bf16 or fp16 x, got {x.dtype}")
    for gemm in ("gate_up", "down"):
        tile = config[gemm]
        if tile["block_k"] * x.element_size() % 128:
            raise ValueError(f"config field '{gemm}.block_k' must span a multiple of 128 bytes, "
                             f"got {tile['block_k']}")
    # one warp (NOTES.md v22) was 5-18% slower, and its producer spills registers (56 bytes of
    # stack, compiled for sm_90 under Triton 3.9): not offered
    if config["gate_up"].get("gather", 0) not in (0, 2, 4):
        raise ValueError(f"config field 'gate_up.gather' is the producer's warps that copy the token "
                         f"rows (2 or 4; 0 or absent: a launch of their own), got {config['gate_up']['gather']!r}")
    if "gather" in config["down"]:
        raise ValueError("config field 'down.gather': only the gate/up GEMM reads token rows")
    if config.get("one_launch"):  # both GEMMs in one launch share the stages and the tile order
        gate_up, down = config["gate_up"], config["down"]
        shared = [(f"down.{field}", down.get(field, default), f"gate_up.{field}", gate_up.get(field, default))
                  for field, default in (("block_k", None), ("num_stages", None), ("group_m", 8))]
        shared.append(("down.block_n", down["block_n"], "2 x gate_up.block_n", 2 * gate_up["block_n"]))
        for name, value, other, want in shared:
            if value != want:
                raise ValueError(f"config field 'one_launch' needs {name} = {other} (the GEMMs share "
                                 f"the stages and the tile order), got {value} against {want}")
        if not (gate_up.get("dynamic", True) and down.get("dynamic", True)):
            raise ValueError("config field 'one_launch' needs dynamic tiles (gate_up/down.dynamic "
                             "true or absent): a down tile may wait for gate/up tiles")


def launch_gate_up(a, w_gate_up, routing, config: dict, top_k: int | None = None,
                   timeline: torch.Tensor | None = None) -> torch.Tensor:
    """h [max_padded, F] in expert order = silu(rows @ w1^T) * (rows @ w3^T) per sorted row: a is
    the token rows in expert order (launch.gather_rows), or with top_k, x [T, H] in token order,
    whose rows the kernel's producer gathers itself (cp.async; the tile's "gather": its warps)."""
    n_experts, two_f, hidden = w_gate_up.shape
    h = torch.empty(routing.sorted_pair_ids.numel(), two_f // 2, dtype=a.dtype, device=a.device)
    _launch(a, w_gate_up.view(n_experts * two_f, hidden), h, None, routing,
            config["gate_up"], two_f, two_f // 2, gate_up=True, top_k=top_k, timeline=timeline)
    return h


def launch_down(h, w_down, weights, routing, config: dict,
                timeline: torch.Tensor | None = None) -> torch.Tensor:
    """y [max_padded, H] in expert order = the routing weight of each sorted row's pair *
    (h @ w2^T), h from launch_gate_up; `combine_sum(y, k, slots=routing.pair_slot)` sums it."""
    n_experts, hidden, ffn = w_down.shape
    y = torch.empty(h.shape[0], hidden, dtype=h.dtype, device=h.device)
    _launch(h, w_down.view(n_experts * hidden, ffn), y, weights, routing, config["down"],
            hidden, 0, gate_up=False, timeline=timeline)
    return y


def launch_moe(a, w_gate_up, w_down, weights, routing, config: dict, top_k: int | None = None,
               timeline: torch.Tensor | None = None) -> torch.Tensor:
    """y [max_padded, H] in expert order, as launch_down(launch_gate_up(...)) but in one launch
    (config "one_launch"): the gate/up GEMM's tiles, then the down GEMM's, each down tile's copies
    waiting until its block's h is stored. An SM that finishes its last gate/up tile goes on to
    down tiles instead of idling through the gate/up launch's tail, and the second launch's start
    is gone (NOTES.md v41, v43, v45: 1-4% faster at the 64 experts' 640-4096 tokens, about 1% at 8192, none at 16384).
    a, top_k and timeline as launch_gate_up (the records of both GEMMs' tiles, the down ones
    numbered after the gate/up ones); the GEMMs share their stages, so the config's down tile is
    the gate/up tile's width (check_config)."""
    n_experts, two_f, hidden = w_gate_up.shape
    gate_up, down = config["gate_up"], config["down"]
    rows = routing.sorted_pair_ids.numel()
    h = torch.empty(rows, two_f // 2, dtype=a.dtype, device=a.device)
    y = torch.empty(rows, hidden, dtype=a.dtype, device=a.device)
    first = _gemm(a, w_gate_up.view(n_experts * two_f, hidden), h, gate_up, routing.block_m, two_f,
                  two_f // 2)
    second = _gemm(h, w_down.view(n_experts * hidden, two_f // 2), y, down, routing.block_m, hidden, 0)
    _run(first, second, a, weights, routing, gate_up, True, top_k, timeline)
    return y
