"""Hopper grouped expert GEMMs on tall tiles: blocks of up to 256 token rows over 128 weight rows.

wgmma_moe.py's tiles are 128 token rows over 256 weight rows (gate/up: 128 gate and 128 up rows).
An expert of 129-256 rows is then two blocks, each reading the expert's weight slab: at the 64
experts' 2048 tokens (192 +- 13 rows an expert) half the blocks are 64-row tails that take a whole
weight tile for half the MMAs, and their K loops wait on copies 40-50% of the time (NOTES.md,
session 18). cuBLAS's kernel there reads each weight tile once for an expert's 192 rows (256
weight rows against 96 tokens, in clusters of two; session 16). Here a tile is one block of up to
256 rows, padded to 64 (align's pad_m), against 128 weight rows (gate/up: 64 gate and the matching
64 up rows), so an expert of up to 256 rows reads each weight tile once:

    a producer warp          as wgmma_moe's: claims each next tile, waits for a free stage, copies
                             the block's 64-row slabs of token rows (only those it has) and the
                             tile's weight rows by TMA
    two consumer warpgroups  warpgroup h takes slabs h and h + 2 of every block: two [64, 128]
                             accumulators (128 registers, as wgmma_moe's one [64, 256]), one MMA
                             each a K step; a warpgroup with no slab in a block only frees its
                             stages. The SM's tensor cores serve whichever warpgroup issues, so a
                             block of three slabs runs three MMAs a K step whoever owns them.

At blocks of 256 rows a tile reads as many bytes a FLOP as wgmma_moe's (384 rows of 64 columns
for 256 x 128 outputs); at 192 rows, 40 KB a K step for 1.5 M multiply-adds where wgmma_moe's
block and tail take 88 KB for 3 M across two tiles, and no tile runs half-empty.

Operands in expert order, as wgmma_moe (launch.gather_rows copies the token rows first). Gluon
has no CPU interpreter: benchmarks/kernels/wgmma_probe.py checks these kernels on the GPU
against fp32 (variants "tall*"), tests/test_wgmma_moe.py compiles them for sm_90 on the CPU.
NOTES.md v44 has the measurements.
"""

from __future__ import annotations

import torch
import triton

from . import wgmma_moe
from .wgmma_moe import HAVE_GLUON

SLAB = 64  # token rows a warpgroup's MMA takes (wgmma's M)
SLABS = 4  # slabs a block: blocks of up to 256 rows
W_ROWS = 128  # weight rows a tile (gate/up: 64 gate over 64 up)

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from .wgmma_moe import (_barriers, _block, _claim, _next_tile, _publish, _silu, _store,
                            _tma_load)

    _SLABS = gl.constexpr(SLABS)

    @gluon.jit
    def _producer(p, GATE_UP: gl.constexpr, DYNAMIC: gl.constexpr):
        """One warp: each tile's copies into the ring, the block's slabs of token rows (its
        padded rows only: a stage's expected bytes are picked by the block's slab count) and the
        tile's weight rows; each next tile claimed while this one's copies fill the ring (NOTES.md
        v36)."""
        (a_desc, b_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr,
         weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_tiles_n, group, k_dim,
         n_pairs, b_rows, up_offset, tile_ids, tile_full, tile_empty, tile_counter_ptr) = p
        STAGES: gl.constexpr = b_bufs.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        ROWS: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        A_BYTES: gl.constexpr = a_desc.block_type.nbytes
        B_BYTES: gl.constexpr = b_bufs.shape[1] * BLOCK_K * 2
        n_tiles = gl.load(n_blocks_ptr) * n_tiles_n
        CLAIM_STEP = gl.minimum(STAGES - 1, (k_dim + BLOCK_K - 1) // BLOCK_K - 1)
        step = 0
        i = 0
        tile = _claim(tile_counter_ptr, i, DYNAMIC)
        if DYNAMIC:
            _publish(tile_ids, tile_full, tile_empty, i, tile)
        while tile < n_tiles:
            block, tile_n, row, n_rows = _block(tile, n_blocks_ptr, n_tiles_n, group, block_start_ptr)
            slabs = (n_rows + ROWS - 1) // ROWS
            w_row = gl.load(block_expert_ptr + block) * b_rows + tile_n * BLOCK_N
            next_tile = tile
            for k in range(0, k_dim, BLOCK_K):
                stage = step % STAGES
                mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
                bar = ready.index(stage)
                # (an expect's bytes are a constant: one expect for each slab count, one taken)
                for n in gl.static_range(1, _SLABS + 1):
                    mbarrier.expect(bar, B_BYTES + n * A_BYTES, pred=slabs == n)
                for s in gl.static_range(_SLABS):
                    if s < slabs:
                        _tma_load(a_desc, [row + s * ROWS, k], bar, a_bufs.index(stage * _SLABS + s))
                if GATE_UP:  # gate rows over up rows, one [2 * BLOCK_N, BLOCK_K] stage buffer
                    b = b_bufs.index(stage)
                    _tma_load(b_desc, [w_row, k], bar, b.slice(0, BLOCK_N))
                    _tma_load(b_desc, [w_row + up_offset, k], bar, b.slice(BLOCK_N, BLOCK_N))
                else:
                    _tma_load(b_desc, [w_row, k], bar, b_bufs.index(stage))
                if k == CLAIM_STEP * BLOCK_K:
                    next_tile = _claim(tile_counter_ptr, i + 1, DYNAMIC)
                    if DYNAMIC:
                        _publish(tile_ids, tile_full, tile_empty, i + 1, next_tile)
                step += 1
            i += 1
            tile = next_tile

    @gluon.jit
    def _consumer(p, GATE_UP: gl.constexpr, HALF: gl.constexpr, DYNAMIC: gl.constexpr):
        """One warpgroup: slabs HALF and HALF + 2 of every block, those it has (each consumer frees
        each stage once, with or without MMAs: a stage's barrier counts two arrivals)."""
        (a_desc, b_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr,
         weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_tiles_n, group, k_dim,
         n_pairs, b_rows, up_offset, tile_ids, tile_full, tile_empty, tile_counter_ptr) = p
        ROWS: gl.constexpr = a_desc.block_type.shape[0]
        n_tiles = gl.load(n_blocks_ptr) * n_tiles_n
        step = 0
        i = 0
        tile = _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC)
        while tile < n_tiles:
            block, tile_n, start, n_rows = _block(tile, n_blocks_ptr, n_tiles_n, group, block_start_ptr)
            slabs = (n_rows + ROWS - 1) // ROWS
            # (Triton 3.6 miscompiles an `if` over a static choice of kernel: a branch for each)
            if slabs > HALF + 2:
                step = _tile_mma(a_bufs, b_bufs, out_desc, out_bufs, ready, empty, sorted_ptr,
                                 weights_ptr, k_dim, n_pairs, step, start, tile_n, GATE_UP, HALF,
                                 True)
            elif slabs > HALF:
                step = _tile_mma(a_bufs, b_bufs, out_desc, out_bufs, ready, empty, sorted_ptr,
                                 weights_ptr, k_dim, n_pairs, step, start, tile_n, GATE_UP, HALF,
                                 False)
            else:  # no slab of this warpgroup's: free each stage once it is full
                step = _pass_tile(a_bufs, ready, empty, k_dim, step)
            i += 1
            tile = _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC)
        tma.store_wait(0)

    @gluon.jit
    def _pass_tile(a_bufs, ready, empty, k_dim, step):
        """A tile without this warpgroup's slabs: wait for each stage (the producer fills a stage
        only once both warpgroups freed its last use: running ahead would free a later one) and
        free it. Returns the step count."""
        STAGES: gl.constexpr = ready.shape[0]
        BLOCK_K: gl.constexpr = a_bufs.shape[2]
        for k in range(0, k_dim, BLOCK_K):
            stage = step % STAGES
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            mbarrier.arrive(empty.index(stage))
            step += 1
        return step

    @gluon.jit
    def _tile_mma(a_bufs, b_bufs, out_desc, out_bufs, ready, empty, sorted_ptr, weights_ptr,
                  k_dim, n_pairs, step, start, tile_n, GATE_UP: gl.constexpr, HALF: gl.constexpr,
                  TWO: gl.constexpr):
        """One warpgroup's slabs of a tile: slab HALF (rows start + 64 HALF..), and with TWO slab
        HALF + 2 too, against the stage's 128 weight rows; one MMA a slab a K step, then each
        slab's epilogue through shared memory and a TMA store. Returns the step count."""
        STAGES: gl.constexpr = b_bufs.shape[0]
        ROWS: gl.constexpr = a_bufs.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.shape[2]
        WIDTH: gl.constexpr = b_bufs.shape[1]
        BLOCK_N: gl.constexpr = WIDTH // 2 if GATE_UP else WIDTH  # output columns
        col = tile_n * BLOCK_N
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, WIDTH, 16])
        acc = gl.zeros([ROWS, WIDTH], gl.float32, layout)
        acc2 = gl.zeros([ROWS, WIDTH], gl.float32, layout)
        row = start + HALF * ROWS
        row2 = row + 2 * ROWS
        if not GATE_UP:  # the rows' routing weights, read while the MMAs run (NOTES.md v35)
            rows = row + gl.arange(0, ROWS, gl.SliceLayout(1, layout))
            pair = gl.load(sorted_ptr + rows)  # padding rows hold n_pairs
            weight = gl.load(weights_ptr + pair, mask=pair < n_pairs, other=0.0).to(gl.float32)
            if TWO:
                pair2 = gl.load(sorted_ptr + rows + 2 * ROWS)
                weight2 = gl.load(weights_ptr + pair2, mask=pair2 < n_pairs, other=0.0).to(gl.float32)
        first = step
        for k in range(0, k_dim, BLOCK_K):
            stage = step % STAGES
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            b = b_bufs.index(stage).permute((1, 0))
            acc = warpgroup_mma(a_bufs.index(stage * _SLABS + HALF), b, acc, is_async=True)
            if TWO:
                acc2 = warpgroup_mma(a_bufs.index(stage * _SLABS + HALF + 2), b, acc2, is_async=True)
                # this step's MMAs may run on; the step before's are done with its stage
                acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
            else:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=step > first)
            step += 1
        if TWO:
            acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES))

        if GATE_UP:  # h in expert order: h[row] = silu(gate) * up; a buffer for each slab
            gate, up = acc.reshape([ROWS, 2, BLOCK_N]).permute(0, 2, 1).split()
            _store(out_desc, out_bufs.index(HALF), _silu(gate) * up, row, col)
            if TWO:
                gate, up = acc2.reshape([ROWS, 2, BLOCK_N]).permute(0, 2, 1).split()
                _store(out_desc, out_bufs.index(HALF + 2), _silu(gate) * up, row2, col)
        else:  # y in expert order: routing weight * (h @ w2^T); both slabs through one buffer
            _store(out_desc, out_bufs.index(HALF), acc * weight[:, None], row, col)
            if TWO:
                _store(out_desc, out_bufs.index(HALF), acc2 * weight2[:, None], row2, col)
        return step

    @gluon.jit
    def grouped_gemm_kernel(a_desc, b_desc, out_desc, sorted_ptr, weights_ptr, block_expert_ptr,
                            block_start_ptr, n_blocks_ptr, n_tiles_n, group, k_dim, n_pairs, b_rows,
                            up_offset, tile_counter_ptr, GATE_UP: gl.constexpr,
                            STAGES: gl.constexpr, DYNAMIC: gl.constexpr):
        """GATE_UP: out = h [max_padded, F] (expert order) = silu(A @ w1^T) * (A @ w3^T), A the
        token rows in expert order (a_desc: boxes of one 64-row slab), b_desc over w_gate_up
        [E * 2F, H] in boxes of BLOCK_N gate (or up) rows (up rows at +up_offset). Otherwise: out
        = y [max_padded, H] = routing weight * (h @ w2^T), b_desc over w_down [E * H, F] in boxes
        of 128 rows. out_desc: boxes of one slab's outputs. Blocks of up to 256 rows (align,
        block_m 256, pad_m 64). Tiles as wgmma_moe's (DYNAMIC: claimed from tile_counter_ptr, one
        int32 zero at launch)."""
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        WIDTH: gl.constexpr = 2 * BLOCK_N if GATE_UP else BLOCK_N
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * _SLABS] + a_desc.block_type.shape,
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, WIDTH, BLOCK_K], b_desc.layout)
        # gate/up: a buffer for each slab ([64, 64] each); down: one a warpgroup ([64, 128])
        out_bufs = gl.allocate_shared_memory(out_desc.dtype, [_SLABS if GATE_UP else 2]
                                             + out_desc.block_type.shape, out_desc.layout)
        ready, empty, tile_ids, tile_full, tile_empty = _barriers(STAGES, 1)
        p = (a_desc, b_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, empty, sorted_ptr,
             weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_tiles_n, group, k_dim,
             n_pairs, b_rows, up_offset, tile_ids, tile_full, tile_empty, tile_counter_ptr)
        gl.warp_specialize([(_consumer, (p, GATE_UP, 0, DYNAMIC)),
                            (_consumer, (p, GATE_UP, 1, DYNAMIC)),
                            (_producer, (p, GATE_UP, DYNAMIC))],
                           [4, 1], [232, 24])


def check_config(config: dict, x: torch.Tensor) -> None:
    """A tall config's constraints, as errors naming the field."""
    if config["block_m"] != SLAB * SLABS:
        raise ValueError(f"config field 'block_m' must be {SLAB * SLABS} with 'tall' (blocks of up to "
                         f"four 64-row slabs), got {config['block_m']}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the 'wgmma' path takes bf16 or fp16 x, got {x.dtype}")
    for gemm, block_n in (("gate_up", W_ROWS // 2), ("down", W_ROWS)):
        tile = config[gemm]
        if tile["block_n"] != block_n:
            raise ValueError(f"config field '{gemm}.block_n' must be {block_n} with 'tall' "
                             f"({W_ROWS} weight rows a tile), got {tile['block_n']}")
        if tile["block_k"] != 64:
            raise ValueError(f"config field '{gemm}.block_k' must be 64 with 'tall', got {tile['block_k']}")
        if tile.get("gather"):
            raise ValueError(f"config field '{gemm}.gather': 'tall' tiles read rows gathered by "
                             f"their own launch")


def _launch(a, w2d, out, weights, routing, tile: dict, b_rows: int, up_offset: int,
            gate_up: bool) -> None:
    """One grouped GEMM on tall tiles: a [max_padded, K] and out [max_padded, N] in expert order
    (align with block_m 256, pad_m 64), w2d the weights [E * b_rows, K], `weights` the routing
    weights [T*k] (the down GEMM's; None for gate/up); one program per SM."""
    block_n, block_k = tile["block_n"], tile["block_k"]
    n_tiles_n = triton.cdiv(out.shape[1], block_n)
    programs = min(torch.cuda.get_device_properties(a.device).multi_processor_count,
                   routing.max_blocks * n_tiles_n)
    grouped_gemm_kernel[(programs,)](
        wgmma_moe._descriptor(a, [SLAB, block_k]), wgmma_moe._descriptor(w2d, [block_n, block_k]),
        wgmma_moe._descriptor(out, [SLAB, block_n]), routing.sorted_pair_ids,
        routing.sorted_pair_ids if weights is None else weights,  # gate/up never reads it
        routing.block_expert, routing.block_start, routing.n_blocks, n_tiles_n,
        tile.get("group_m", 8), a.shape[1], routing.n_pairs, b_rows, up_offset,
        torch.zeros(1, dtype=torch.int32, device=a.device),  # the tile counter (a memset)
        GATE_UP=gate_up, STAGES=tile["num_stages"], DYNAMIC=tile.get("dynamic", True),
        num_warps=4, maxnreg=wgmma_moe.MAX_REGISTERS)


def launch_gate_up(a, w_gate_up, routing, config: dict) -> torch.Tensor:
    """h [max_padded, F] in expert order = silu(rows @ w1^T) * (rows @ w3^T) per sorted row, a the
    token rows in expert order (launch.gather_rows)."""
    n_experts, two_f, hidden = w_gate_up.shape
    h = torch.empty(routing.sorted_pair_ids.numel(), two_f // 2, dtype=a.dtype, device=a.device)
    _launch(a, w_gate_up.view(n_experts * two_f, hidden), h, None, routing, config["gate_up"],
            two_f, two_f // 2, gate_up=True)
    return h


def launch_down(h, w_down, weights, routing, config: dict) -> torch.Tensor:
    """y [max_padded, H] in expert order = the routing weight of each sorted row's pair *
    (h @ w2^T); `combine_sum(y, k, slots=routing.pair_slot)` sums it."""
    n_experts, hidden, ffn = w_down.shape
    y = torch.empty(h.shape[0], hidden, dtype=h.dtype, device=h.device)
    _launch(h, w_down.view(n_experts * hidden, ffn), y, weights, routing, config["down"], hidden,
            0, gate_up=False)
    return y
