"""Hopper-only grouped expert GEMMs with the weights as the MMA's rows (the "wgmma" path's `swap`).

    gate_up:  h[rows, f tile]^T = silu(w1[e, f tile] @ x[rows]^T) * (w3[e, f tile] @ x[rows]^T)
    down:     y[rows, n tile]^T = routing weight * (w2[e, n tile] @ h[rows]^T)

Why: cuBLAS's batched GEMM, which the benchmark holds ours against, takes every expert shape of
the bench this way round (NOTES.md session 16, its kernels' names in a profile): 256 or 320 weight
rows against 96 or 128 token rows a CTA, in clusters of two that share one copy of the weights.
With the tokens on the MMA's N side a block can hold all of an expert's rows up to 192 (wgmma N =
128 + 64), so each weight tile is read once per expert where wgmma_moe.py and the sorted kernels
(tokens on M) run blocks of 64 or 128 rows that each read the whole weight tile. Measured (NOTES.md
v29): faster where an expert's 64-192 rows fit one block and the GEMMs are not yet compute-bound
(the 64 experts at 768-1536 tokens, 10-12%; Mixtral at 2048 tokens, 3%), slower elsewhere, where
cuBLAS's clusters of two (one copy of the weights for two CTAs) are what this kernel lacks.

The schedule is wgmma_moe's (its docstring): one program per SM, a producer warp issuing TMA
copies into a ring of stages, two consumer warpgroups, tiles claimed from a counter. A tile is
256 weight rows (gate/up: 128 gate and the matching 128 up rows; each warpgroup 64 of each, so
SiLU(gate) * up pairs registers of one thread) against one block of token rows (routing.align with
the config's pad_m, 64 or 32, and block_m, up to 192: each expert's rows padded and split evenly
over its blocks), taken as a part of up to 128 columns and one of up to 64 (a compiled variant per
pair of widths). A warpgroup holds 2 x 64 x 192 fp32 accumulators at most (192 registers a
thread). Its epilogue stores h or y transposed, in expert order, through shared memory and TMA.

Stages of 64 columns (128 bytes of each weight row a copy) stream the weights faster than stages
of 32: a copy-only probe of these tiles (benchmarks/kernels/stream_probe.py) reads Mixtral's gate/up
weights beside 128 token rows at 90% of the copy rate in [256, 32] boxes, 95% in [256, 64] (four
stages) and 98% in [256, 128]. Four stages of 64 fit in shared memory where blocks hold at most 160
rows padded to 32 (a tail buffer of 32 rows) and each consumer's epilogue buffer holds 64 rows,
through which a part of 128 is stored in two halves (shared_layout): the 64 experts at 768-1024
tokens 3.5-7% faster than six stages of 32 (NOTES.md v39). With one MMA (below) they are packed
(_packed), for blocks of up to 192 rows: weight slice 3 in the token buffer's rows past them, and
each warpgroup's epilogue through its own weight slices of the tile's last stage: Mixtral at 512
tokens 4.5% faster (v40).

With config "one" (ONE, Triton >= 3.9: HAVE_ONE), a block of 160 or 192 rows (parts 128 + 32 or
128 + 64) is one MMA of that width: wgmma takes any N in steps of 8, Gluon's tensors only powers of
two, so `_one_mma` issues `wgmma.mma_async.m64n160k16` / `m64n192k16` as inline PTX on the stage
buffers' addresses, over the registers of both parts' accumulators (the wider MMA's fragment is the
128-column one's followed by the narrower one's), and the token rows of a stage lie in one buffer of
256 rows. Each weight slice is then read from shared memory once a K step, not once per part:
Mixtral at 512 tokens 3.4% faster at equal blocks, and 1.9-3.8% faster than the entries it replaced
at 512 and 2048 tokens (NOTES.md v33).

GPU-only, like wgmma_moe; tests/test_wgmma_moe.py compiles it for sm_90 on the CPU.
"""

from __future__ import annotations

import torch
import triton

from . import wgmma_moe
from .wgmma_moe import HAVE_GLUON

BLOCK_MS = (128, 160, 192)  # the most token rows a block may take (config "block_m")
PADS = (64, 32)  # an expert's rows are padded to this (config "pad_m", align's pad_m; 64 by default)
W_ROWS = 256  # weight rows a tile: 4 slices of 64, two a consumer warpgroup

def pad_m(config: dict) -> int:
    """The rows a swap config pads each expert's run to (its "pad_m", else PADS[0])."""
    return config.get("pad_m", PADS[0])


def token_parts(n_rows: int, pad: int) -> tuple[int, int]:
    """(N0, N1): the MMA widths a block of n_rows token rows (a multiple of pad) runs as, one part
    of N0 columns and one of N1 (0: none). The producer's and the consumers' if-chains below are
    this rule; this copy is what the CPU tests check it with."""
    if n_rows > 160:
        return 128, 64
    if n_rows > 128:
        return (128, 32) if pad == 32 else (128, 64)
    if n_rows > 64:
        return (64, 32) if pad == 32 and n_rows <= 96 else (128, 0)
    return (64, 0) if n_rows > 32 or pad == 64 else (32, 0)


SHARED_BYTES = 227 * 1024  # the most shared memory a block may use on sm_90


def _packed(block_k, one):
    """Whether a one-MMA variant packs its stages (K steps of 64 columns): the 256-row token
    buffer's rows 192-255 (past a block's at most 192 rows) hold weight slice 3, the other slices
    lie in buffers of 128 and 64 rows, and each warpgroup's epilogue goes through its own weight
    slices of the tile's last stage (no buffers of its own), so that four stages fit."""
    return bool(one) and block_k == 64


def _token_rows(block_m, pad, one):
    """Token rows a stage holds: with `one`, a buffer of 256 (the tail's rows from row 128, so that
    one MMA reads both parts; Gluon's buffers are powers of two); else a part of up to 128 and a
    tail buffer of 64, or of 32 where blocks of at most 160 rows are padded to 32."""
    if one:
        return 256
    return 128 + (32 if pad == 32 and block_m <= 160 else 64)


def _out_rows(stages, block_k, token_rows):
    """Rows of each consumer's epilogue buffer (of 64 columns): 128, or 64 where the ring of
    stages leaves no room for two of 128 (then a part of 128 rows is stored in two halves)."""
    ring = stages * (W_ROWS + token_rows) * block_k * 2
    return 128 if ring + 2 * 128 * 64 * 2 <= SHARED_BYTES else 64


def shared_layout(stages: int, block_k: int, block_m: int, pad: int, one: bool) -> tuple[int, int, int]:
    """(token rows a stage, epilogue buffer rows, bytes of shared memory less the barriers) of a
    swap kernel's variant: what grouped_gemm_kernel allocates (packed: _packed's, no epilogue
    buffers, weight slice 3 inside the token buffer)."""
    token_rows = _token_rows(block_m, pad, one)
    if _packed(block_k, one):
        return token_rows, 0, stages * (W_ROWS - 64 + token_rows) * block_k * 2
    out_rows = _out_rows(stages, block_k, token_rows)
    return (token_rows, out_rows,
            stages * (W_ROWS + token_rows) * block_k * 2 + 2 * out_rows * 64 * 2)


HAVE_ONE = False  # whether this Triton builds the one-MMA blocks (config "one"; gl.inline_asm, 3.9)
if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                  tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from .wgmma_moe import (_barriers, _block, _claim, _next_tile, _publish, _silu, _tma_load,
                            _tma_store, _view_as)

    HAVE_ONE = hasattr(gl, "inline_asm")
    _token_rows_jit = gluon.constexpr_function(_token_rows)
    _packed_jit = gluon.constexpr_function(_packed)
    _out_rows_jit = gluon.constexpr_function(_out_rows)

    @gluon.jit
    def _box(descs, N: gl.constexpr):
        """Of descs, descriptors in boxes of 128, 64 and 32 rows, the one of N rows."""
        if N == 128:
            d = descs[0]
        elif N == 64:
            d = descs[1]
        else:
            d = descs[2]
        return d

    @gluon.constexpr_function
    def _tail_at(t_tail_bufs):
        """The row of a stage's tail buffer where a block's second part starts: 128 in the one
        token buffer of the one-MMA kernels (ONE), else 0 (a buffer of its own, 32 or 64 rows)."""
        return 128 if t_tail_bufs.shape[1] > 64 else 0

    @gluon.jit
    def _w_slice(w_bufs, stage, s: gl.constexpr):
        """Weight slice s (64 rows) of a stage: of w_bufs = (the [STAGES, 256, K] buffer,), or
        packed (_packed) = (slices 0-1 [STAGES, 128, K], slice 2 [STAGES, 64, K], the token buffer
        [STAGES, 256, K], whose rows 192-255 hold slice 3: a view starts at a multiple of its size)."""
        if len(w_bufs) == 1 or s < 2:
            view = w_bufs[0].index(stage).slice(s * 64, 64)
        elif s == 2:
            view = w_bufs[1].index(stage)
        else:
            view = w_bufs[2].index(stage).slice(192, 64)
        return view

    @gluon.jit
    def _load_stage(w_desc, t_descs, w_bufs, t_bufs, t_tail_bufs, bar, stage, row, k, expert_row,
                    tile_m, up_offset, GATE_UP: gl.constexpr, N0: gl.constexpr, N1: gl.constexpr):
        """A K step's copies into a stage: the block's token rows as a part of N0 rows (into the
        128-row buffer) and one of N1 (into the tail buffer; none where 0), then the four 64-row
        weight slices (slice s: warpgroup s // 2, its gate rows where s is even, else its up rows);
        the barrier expects their bytes."""
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        ELEM: gl.constexpr = w_desc.block_type.nbytes // (64 * BLOCK_K)
        mbarrier.expect(bar, (4 * 64 + N0 + N1) * BLOCK_K * ELEM)
        _tma_load(_box(t_descs, N0), [row, k], bar, t_bufs.index(stage).slice(0, N0))
        if N1 > 0:
            # (ONE: t_tail_bufs is the stage's one token buffer, the tail from row 128)
            TAIL_AT: gl.constexpr = _tail_at(t_tail_bufs)
            _tma_load(_box(t_descs, N1), [row + N0, k], bar, t_tail_bufs.index(stage).slice(TAIL_AT, N1))
        for s in gl.static_range(4):
            if GATE_UP:
                w_row = expert_row + tile_m * 128 + (s // 2) * 64 + (s % 2) * up_offset
            else:
                w_row = expert_row + tile_m * 256 + s * 64
            _tma_load(w_desc, [w_row, k], bar, _w_slice(w_bufs, stage, s))

    @gluon.jit
    def _producer(p, GATE_UP: gl.constexpr, DYNAMIC: gl.constexpr, PAD: gl.constexpr,
                  BLOCK_M: gl.constexpr):
        """One warp: per tile, per K step, a stage's copies (_load_stage), the token rows' parts by
        the block's rows (PAD: the rows are a multiple of 32 or of 64; token_parts' rule)."""
        (w_desc, t_descs, out_descs, w_bufs, t_bufs, t_tail_bufs, out_bufs, ready, empty,
         sorted_ptr, weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_tiles_m, group,
         k_dim, n_pairs, w_rows, up_offset, tile_ids, tile_full, tile_empty, tile_counter_ptr) = p
        STAGES: gl.constexpr = w_bufs[0].shape[0]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        TAIL_64: gl.constexpr = BLOCK_M > 160  # (blocks of 129-160 rows padded to 64 take 192)
        n_tiles = gl.load(n_blocks_ptr) * n_tiles_m
        step = 0
        i = 0
        tile = _claim(tile_counter_ptr, i, DYNAMIC)
        while tile < n_tiles:
            if DYNAMIC:
                _publish(tile_ids, tile_full, tile_empty, i, tile)
            block, tile_m, row, n_rows = _block(tile, n_blocks_ptr, n_tiles_m, group, block_start_ptr)
            expert_row = gl.load(block_expert_ptr + block) * w_rows
            for k in range(0, k_dim, BLOCK_K):
                stage = step % STAGES
                mbarrier.wait(empty.index(stage), ((step // STAGES) & 1) ^ 1)
                bar = ready.index(stage)
                a = (w_desc, t_descs, w_bufs, t_bufs, t_tail_bufs, bar, stage, row, k, expert_row,
                     tile_m, up_offset)
                if n_rows > 160:
                    if TAIL_64:
                        _load_stage(*a, GATE_UP, 128, 64)
                elif n_rows > 128:
                    if PAD == 32:
                        _load_stage(*a, GATE_UP, 128, 32)
                    elif TAIL_64:
                        _load_stage(*a, GATE_UP, 128, 64)
                elif n_rows > 64:
                    if PAD == 32 and n_rows <= 96:
                        _load_stage(*a, GATE_UP, 64, 32)
                    else:
                        _load_stage(*a, GATE_UP, 128, 0)
                elif n_rows > 32 or PAD == 64:
                    _load_stage(*a, GATE_UP, 64, 0)
                else:
                    _load_stage(*a, GATE_UP, 32, 0)
                step += 1
            i += 1
            tile = _claim(tile_counter_ptr, i, DYNAMIC)
        if DYNAMIC:  # past the last tile: the consumers stop
            _publish(tile_ids, tile_full, tile_empty, i, tile)

    @gluon.jit
    def _consumer(p, GATE_UP: gl.constexpr, HALF: gl.constexpr, DYNAMIC: gl.constexpr,
                  PAD: gl.constexpr, ONE: gl.constexpr, BLOCK_M: gl.constexpr):
        """One warpgroup: weight slices 2 * HALF and 2 * HALF + 1 of every tile, against all its
        token rows, in the producer's parts (token_parts' rule; a compiled variant each)."""
        (w_desc, t_descs, out_descs, w_bufs, t_bufs, t_tail_bufs, out_bufs, ready, empty,
         sorted_ptr, weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_tiles_m, group,
         k_dim, n_pairs, w_rows, up_offset, tile_ids, tile_full, tile_empty, tile_counter_ptr) = p
        n_tiles = gl.load(n_blocks_ptr) * n_tiles_m
        TAIL_64: gl.constexpr = BLOCK_M > 160  # (128, 64) parts: blocks of more than 160 rows
        step = 0
        i = 0
        tile = _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC)
        while tile < n_tiles:
            block, tile_m, start, n_rows = _block(tile, n_blocks_ptr, n_tiles_m, group, block_start_ptr)
            # output columns of this warpgroup's slices: gate/up 64 h columns, down 2 x 64 y columns
            col = tile_m * 128 + HALF * 64 if GATE_UP else tile_m * 256 + HALF * 128
            a = (w_bufs, t_bufs, t_tail_bufs, out_descs, out_bufs, ready, empty, sorted_ptr,
                 weights_ptr, k_dim, n_pairs, step, start, col)
            if n_rows > 160:
                if TAIL_64:
                    step = _tile_mma(*a, GATE_UP, HALF, 128, 64, ONE)
            elif n_rows > 128:
                if PAD == 32:
                    step = _tile_mma(*a, GATE_UP, HALF, 128, 32, ONE)
                elif TAIL_64:
                    step = _tile_mma(*a, GATE_UP, HALF, 128, 64, ONE)
            elif n_rows > 64:
                if PAD == 32 and n_rows <= 96:
                    step = _tile_mma(*a, GATE_UP, HALF, 64, 32, ONE)
                else:
                    step = _tile_mma(*a, GATE_UP, HALF, 128, 0, ONE)
            elif n_rows > 32 or PAD == 64:
                step = _tile_mma(*a, GATE_UP, HALF, 64, 0, ONE)
            else:
                step = _tile_mma(*a, GATE_UP, HALF, 32, 0, ONE)
            i += 1
            tile = _next_tile(tile_ids, tile_full, tile_empty, i, DYNAMIC)
        tma.store_wait(0)

    @gluon.constexpr_function
    def _wgmma_text(n_regs, width, block_k, swizzle):
        """PTX of one warpgroup MMA per 16 columns of K, [64 weight rows] x [width token rows],
        both operands K-major in shared memory with `swizzle`-byte rows (64 or 128): operands
        $0..$(n_regs - 1) the accumulators (tied to the next n_regs), then the weight slice's
        and the token rows' shared addresses. Descriptors: start address / 16, leading offset 1
        (unused by swizzled K-major operands), stride 8 rows of `swizzle` bytes, swizzle mode."""
        regs = ", ".join(f"${i}" for i in range(n_regs))
        high = (8 * swizzle // 16) | ((1 if swizzle == 128 else 2) << 30)
        text = ["{", ".reg .b32 wl, tl, hi, one;", ".reg .b64 wd, td;", ".reg .pred p;",
                "mov.b32 one, 1;", "setp.ne.b32 p, one, 0;", f"mov.b32 hi, {high};",
                f"shr.b32 wl, ${2 * n_regs}, 4;", "and.b32 wl, wl, 16383;", "or.b32 wl, wl, 65536;",
                f"shr.b32 tl, ${2 * n_regs + 1}, 4;", "and.b32 tl, tl, 16383;", "or.b32 tl, tl, 65536;",
                "wgmma.fence.sync.aligned;"]
        for k in range(block_k // 16):
            text += ["mov.b64 wd, {wl, hi};", "mov.b64 td, {tl, hi};",
                     f"wgmma.mma_async.sync.aligned.m64n{width}k16.f32.bf16.bf16 {{{regs}}}, wd, td, p, 1, 1, 0, 0;",
                     "add.s32 wl, wl, 2;", "add.s32 tl, tl, 2;"]
        return "\n".join(text + ["wgmma.commit_group.sync.aligned;", "}"])

    @gluon.constexpr_function
    def _tied(n_regs):
        """Constraints: n_regs fp32 outputs, the same registers in, two addresses."""
        return ",".join(["=f"] * n_regs + [str(i) for i in range(n_regs)] + ["r", "r"])

    @gluon.jit
    def _one_mma(w, tokens, acc0, acc1):
        """acc0 [64, N0] and acc1 [64, N1] += w [64, K] @ tokens[:N0 + N1]^T as one wgmma of
        N0 + N1 columns a K step of 16 (the tokens' rows contiguous in shared memory; the
        registers of acc0 then acc1 are the wider MMA's accumulator fragment), committed as one
        group. Where Gluon's shapes are powers of two, a block of 160 or 192 rows is otherwise two
        MMAs that each read the weight slice."""
        N: gl.constexpr = acc0.shape[1] + acc1.shape[1]
        REGS: gl.constexpr = N // 2
        SWIZZLE: gl.constexpr = w.type.layout.swizzle_byte_width
        return gl.inline_asm(_wgmma_text(REGS, N, w.shape[1], SWIZZLE), _tied(REGS),
                             [acc0, acc1, w, tokens], (acc0.type, acc1.type), is_pure=False)

    @gluon.jit
    def _tile_mma(w_bufs, t_bufs, t_tail_bufs, out_descs, out_bufs, ready, empty, sorted_ptr,
                  weights_ptr, k_dim, n_pairs, step, start, col, GATE_UP: gl.constexpr,
                  HALF: gl.constexpr, N0: gl.constexpr, N1: gl.constexpr, ONE: gl.constexpr):
        """A warpgroup's two weight slices (a, b) against the block's token rows in a part of N0
        (the 128-row buffer's first N0) and one of N1 (the tail buffer's first N1; none where 0):
        up to four accumulators, then the epilogue, through the warpgroup's buffer of out_bufs (or,
        packed, its weight slices of the last stage). Returns the step count."""
        STAGES: gl.constexpr = w_bufs[0].shape[0]
        BLOCK_K: gl.constexpr = w_bufs[0].shape[2]
        PACKED: gl.constexpr = len(w_bufs) > 1
        layout0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, N0, 16])
        acc_a0 = gl.zeros([64, N0], gl.float32, layout0)
        acc_b0 = gl.zeros([64, N0], gl.float32, layout0)
        if N1 > 0:
            layout1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                              instr_shape=[16, N1, 16])
            acc_a1 = gl.zeros([64, N1], gl.float32, layout1)
            acc_b1 = gl.zeros([64, N1], gl.float32, layout1)
        # ONE: a part of 128 and a second one as one MMA (_one_mma), the second's rows from row 128
        # of the stage's one token buffer (t_tail_bufs is t_bufs)
        WIDE: gl.constexpr = ONE and N1 > 0 and N0 == 128
        TAIL_AT: gl.constexpr = _tail_at(t_tail_bufs)
        first = step
        for k in range(0, k_dim, BLOCK_K):
            stage = step % STAGES
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            a = _w_slice(w_bufs, stage, 2 * HALF)
            b = _w_slice(w_bufs, stage, 2 * HALF + 1)
            if WIDE:  # the tail's rows follow the first part's in one buffer: one MMA of both
                acc_a0, acc_a1 = _one_mma(a, t_bufs.index(stage), acc_a0, acc_a1)
                acc_b0, acc_b1 = _one_mma(b, t_bufs.index(stage), acc_b0, acc_b1)
                acc_a0, acc_b0, acc_a1, acc_b1 = warpgroup_mma_wait(
                    num_outstanding=2, deps=(acc_a0, acc_b0, acc_a1, acc_b1))
            else:
                tokens0 = t_bufs.index(stage).slice(0, N0).permute((1, 0))
                acc_a0 = warpgroup_mma(a, tokens0, acc_a0, is_async=True)
                acc_b0 = warpgroup_mma(b, tokens0, acc_b0, is_async=True)
            if N1 > 0 and not WIDE:
                tokens1 = t_tail_bufs.index(stage).slice(TAIL_AT, N1).permute((1, 0))
                acc_a1 = warpgroup_mma(a, tokens1, acc_a1, is_async=True)
                acc_b1 = warpgroup_mma(b, tokens1, acc_b1, is_async=True)
                # this step's four MMAs may run on; the step before's are done with its stage
                acc_a0, acc_b0, acc_a1, acc_b1 = warpgroup_mma_wait(
                    num_outstanding=4, deps=(acc_a0, acc_b0, acc_a1, acc_b1))
            elif N1 == 0:
                acc_a0, acc_b0 = warpgroup_mma_wait(num_outstanding=2, deps=(acc_a0, acc_b0))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=step > first)
            step += 1
        if N1 > 0:
            acc_a0, acc_b0, acc_a1, acc_b1 = warpgroup_mma_wait(
                num_outstanding=0, deps=(acc_a0, acc_b0, acc_a1, acc_b1))
        else:
            acc_a0, acc_b0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a0, acc_b0))
        last = (step + STAGES - 1) % STAGES
        if PACKED:  # the epilogue through this warpgroup's own weight slices of the last stage,
            # which the producer refills only once the stores have read them
            if HALF == 0:  # slices 0-1: one buffer of 128 rows
                out_smem = (w_bufs[0].index(last),)
            else:  # slices 2 and 3: two of 64
                out_smem = (_w_slice(w_bufs, last, 2), _w_slice(w_bufs, last, 3))
        else:
            mbarrier.arrive(empty.index(last))
            out_smem = (out_bufs.index(HALF),)

        _epilogue(acc_a0, acc_b0, out_descs, out_smem, sorted_ptr, weights_ptr, n_pairs, start,
                  col, GATE_UP)
        if N1 > 0:
            _epilogue(acc_a1, acc_b1, out_descs, out_smem, sorted_ptr, weights_ptr, n_pairs,
                      start + N0, col, GATE_UP)
        if PACKED:
            tma.store_wait(0)
            mbarrier.arrive(empty.index(last))
        return step

    @gluon.jit
    def _epilogue(acc_a, acc_b, out_descs, out_smem, sorted_ptr, weights_ptr, n_pairs, row, col,
                  GATE_UP: gl.constexpr):
        """One part's accumulators [64 weight rows, N token rows] out: h[rows, col..+64] =
        silu(a) * b (a the gate slice, b the up slice), or y[rows, col..+128] = the rows' routing
        weights times (a over b), each stored transposed through the warpgroup's buffer."""
        N: gl.constexpr = acc_a.shape[1]
        if GATE_UP:
            _store_rows(out_descs, out_smem, _silu(acc_a) * acc_b, row, col)
        else:
            rows = row + gl.arange(0, N, gl.SliceLayout(0, acc_a.type.layout))
            pair = gl.load(sorted_ptr + rows)  # padding rows hold n_pairs
            weight = gl.load(weights_ptr + pair, mask=pair < n_pairs, other=0.0).to(gl.float32)
            _store_rows(out_descs, out_smem, acc_a * weight[None, :], row, col)
            _store_rows(out_descs, out_smem, acc_b * weight[None, :], row, col + 64)

    @gluon.jit
    def _store_rows(out_descs, out_smem, value, row, col):
        """value [64 columns, N rows] into out [row.., col..] through out_smem, a tuple of one or two
        buffers: at once where the first holds N rows, else in two halves of N / 2 (through the
        first and the last buffer: the same one twice where there is one)."""
        N: gl.constexpr = value.shape[1]
        if N > out_smem[0].shape[0]:
            first, second = value.reshape([64, 2, N // 2]).permute(0, 2, 1).split()
            desc = _box(out_descs, N // 2)
            _store_t(desc, _view_as(out_smem[0], desc), first, row, col)
            _store_t(desc, _view_as(out_smem[len(out_smem) - 1], desc), second, row + N // 2, col)
        else:
            desc = _box(out_descs, N)
            _store_t(desc, _view_as(out_smem[0], desc), value, row, col)

    @gluon.jit
    def _store_t(out_desc, out_smem, value, row, col):
        """value [64 columns, N rows] into out [row.., col..] (TMA) through out_smem [N, 64]."""
        tma.store_wait(0)  # the previous store has read the buffer
        out_smem.store(gl.permute(value, (1, 0)).to(out_desc.dtype))
        fence_async_shared()
        _tma_store(out_desc, [row, col], out_smem)

    @gluon.jit
    def grouped_gemm_kernel(w_desc, t_desc, t64_desc, t32_desc, out_desc, out64_desc, out32_desc,
                            sorted_ptr, weights_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr,
                            n_tiles_m, group, k_dim, n_pairs, w_rows, up_offset, tile_counter_ptr,
                            GATE_UP: gl.constexpr, STAGES: gl.constexpr, DYNAMIC: gl.constexpr,
                            PAD: gl.constexpr, ONE: gl.constexpr = False,
                            BLOCK_M: gl.constexpr = 192):
        """GATE_UP: out = h [max_padded, F] (expert order), w_desc over w_gate_up [E * 2F, H] in
        [64, BLOCK_K] boxes (up rows at +up_offset), t_desc / t64_desc / t32_desc over the token
        rows in expert order [max_padded, H] in boxes of 128 / 64 / 32 rows. Otherwise out = y
        [max_padded, H], w_desc over w_down [E * H, F], the token rows being h. w_rows: weight rows
        per expert (2F or H). out_desc / out64_desc / out32_desc: out in boxes of 128 / 64 / 32
        rows of 64 columns. PAD: the blocks' rows are multiples of it (32 or 64); BLOCK_M: the most
        rows a block has. Four warps (the default partition: slices 0-1 of each tile) and two
        workers: slices 2-3, and the producer. The buffers' sizes are shared_layout's."""
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        TOKEN_ROWS: gl.constexpr = _token_rows_jit(BLOCK_M, PAD, ONE)
        PACKED: gl.constexpr = _packed_jit(BLOCK_K, ONE)
        if not PACKED:  # (allocated first, as before packing: these variants' layout unchanged)
            w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 4 * 64, BLOCK_K], w_desc.layout)
        if ONE:  # the tail's rows right after the first part's, in one buffer a stage
            t_bufs = gl.allocate_shared_memory(t_desc.dtype, [STAGES, TOKEN_ROWS, BLOCK_K],
                                               t_desc.layout)
            t_tail_bufs = t_bufs
        else:
            t_bufs = gl.allocate_shared_memory(t_desc.dtype, [STAGES] + t_desc.block_type.shape,
                                               t_desc.layout)
            t_tail_bufs = gl.allocate_shared_memory(t64_desc.dtype, [STAGES, TOKEN_ROWS - 128, BLOCK_K],
                                                    t64_desc.layout)
        if PACKED:  # (shared_layout; the epilogues go through the weight slices, _tile_mma)
            w_low = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 2 * 64, BLOCK_K], w_desc.layout)
            w_two = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 64, BLOCK_K], w_desc.layout)
            w_bufs = (w_low, w_two, t_bufs)
            out_bufs = w_low
        else:
            w_bufs = (w_bufs,)
            if _out_rows_jit(STAGES, BLOCK_K, TOKEN_ROWS) == 128:
                out_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape,
                                                     out_desc.layout)
            else:  # the ring took the room of two 128-row buffers: each part stored in halves
                out_bufs = gl.allocate_shared_memory(out64_desc.dtype, [2] + out64_desc.block_type.shape,
                                                     out64_desc.layout)
        ready, empty, tile_ids, tile_full, tile_empty = _barriers(STAGES, 1)
        p = (w_desc, (t_desc, t64_desc, t32_desc), (out_desc, out64_desc, out32_desc), w_bufs,
             t_bufs, t_tail_bufs, out_bufs, ready, empty, sorted_ptr, weights_ptr, block_expert_ptr,
             block_start_ptr, n_blocks_ptr, n_tiles_m, group, k_dim, n_pairs, w_rows, up_offset,
             tile_ids, tile_full, tile_empty, tile_counter_ptr)
        gl.warp_specialize([(_consumer, (p, GATE_UP, 0, DYNAMIC, PAD, ONE, BLOCK_M)),
                            (_consumer, (p, GATE_UP, 1, DYNAMIC, PAD, ONE, BLOCK_M)),
                            (_producer, (p, GATE_UP, DYNAMIC, PAD, BLOCK_M))],
                           [4, 1], [232, 24])


def check_config(config: dict, x: torch.Tensor) -> None:
    """A swap config's constraints, as errors naming the field."""
    if config.get("one") and not HAVE_ONE:
        raise ValueError("config field 'one' (blocks of 160 or 192 rows as one MMA) needs Triton >= 3.9's "
                         "Gluon (inline PTX on shared buffers); get_config takes the entry's 'else' here")
    pad = pad_m(config)
    if pad not in PADS:
        raise ValueError(f"config field 'pad_m' must be 64 or 32 on the 'wgmma' path with 'swap', got {pad!r}")
    if config["block_m"] not in BLOCK_MS or config["block_m"] % pad or config.get("half_tail"):
        raise ValueError(f"config field 'block_m' must be 128, 160 or 192 and a multiple of pad_m={pad} on the "
                         f"'wgmma' path with 'swap' (no half_tail), got {config['block_m']}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the 'wgmma' path takes bf16 or fp16 x, got {x.dtype}")
    for gemm in ("gate_up", "down"):
        tile = config[gemm]
        if tile["block_k"] * x.element_size() not in (64, 128):
            raise ValueError(f"config field '{gemm}.block_k' must span 64 or 128 bytes, got {tile['block_k']}")
        shared = shared_layout(tile["num_stages"], tile["block_k"], config["block_m"], pad,
                               config.get("one", False))[2]
        if shared > SHARED_BYTES:
            raise ValueError(f"config field '{gemm}.num_stages' x block_k needs {shared // 1024} KB of shared "
                             f"memory, over the 227 KB a block may use")
        if "gather" in tile or "block_n" in tile:
            raise ValueError(f"config fields '{gemm}.gather' and '{gemm}.block_n' are not the swap "
                             f"kernels' (tiles are 256 weight rows; the rows are gathered by one launch)")


def compile_signature(block_k: int) -> dict:
    """grouped_gemm_kernel's signature for compiling it ahead of a launch (triton.compile of a
    GluonASTSource: the sm_90 compile tests, benchmarks/kernels/carried.py): its parameters in
    order, the descriptors as bf16 boxes of _launch's shapes."""
    def desc(rows: int, cols: int) -> str:
        layout = gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16)
        return f"tensordesc<bf16[{rows}, {cols}],{layout!r}>"

    return {"w_desc": desc(64, block_k),
            **{name: desc(rows, block_k) for name, rows in (("t_desc", 128), ("t64_desc", 64), ("t32_desc", 32))},
            **{name: desc(rows, 64) for name, rows in (("out_desc", 128), ("out64_desc", 64), ("out32_desc", 32))},
            "sorted_ptr": "*i32", "weights_ptr": "*fp32", "block_expert_ptr": "*i32", "block_start_ptr": "*i32",
            "n_blocks_ptr": "*i32",
            **{name: "i32" for name in ("n_tiles_m", "group", "k_dim", "n_pairs", "w_rows", "up_offset")},
            "tile_counter_ptr": "*i32",
            **{name: "constexpr" for name in ("GATE_UP", "STAGES", "DYNAMIC", "PAD", "ONE", "BLOCK_M")}}


def _launch(a, w2d, out, weights, routing, tile: dict, w_rows: int, up_offset: int,
            gate_up: bool, pad: int, one: bool) -> None:
    """One grouped GEMM: a [max_padded, K] (token rows, or h, in expert order), out [max_padded,
    N] in expert order, w2d the weights [E * w_rows, K], `weights` the routing weights [T*k] (the
    down GEMM's; None for gate/up); the routing's blocks multiples of `pad` rows; one program per SM."""
    desc = wgmma_moe._descriptor
    block_k = tile["block_k"]
    n_tiles_m = triton.cdiv(out.shape[1], 128 if gate_up else 256)
    programs = min(torch.cuda.get_device_properties(a.device).multi_processor_count,
                   routing.max_blocks * n_tiles_m)
    grouped_gemm_kernel[(programs,)](
        desc(w2d, [64, block_k]), *(desc(a, [rows, block_k]) for rows in (128, 64, 32)),
        *(desc(out, [rows, 64]) for rows in (128, 64, 32)), routing.sorted_pair_ids,
        routing.sorted_pair_ids if weights is None else weights,  # gate/up never reads it
        routing.block_expert, routing.block_start, routing.n_blocks, n_tiles_m,
        tile.get("group_m", 8), a.shape[1], routing.n_pairs, w_rows, up_offset,
        torch.zeros(1, dtype=torch.int32, device=a.device),  # the tile counter (a memset)
        GATE_UP=gate_up, STAGES=tile["num_stages"], DYNAMIC=True, PAD=pad, ONE=one,
        BLOCK_M=routing.block_m, num_warps=4, maxnreg=wgmma_moe.MAX_REGISTERS)


def launch_gate_up(a, w_gate_up, routing, config: dict) -> torch.Tensor:
    """h [max_padded, F] in expert order = silu(rows @ w1^T) * (rows @ w3^T) per sorted row, a the
    token rows in expert order (launch.gather_rows)."""
    n_experts, two_f, hidden = w_gate_up.shape
    h = torch.empty(routing.sorted_pair_ids.numel(), two_f // 2, dtype=a.dtype, device=a.device)
    _launch(a, w_gate_up.view(n_experts * two_f, hidden), h, None, routing, config["gate_up"],
            two_f, two_f // 2, gate_up=True, pad=pad_m(config), one=config.get("one", False))
    return h


def launch_down(h, w_down, weights, routing, config: dict) -> torch.Tensor:
    """y [max_padded, H] in expert order = the routing weight of each sorted row's pair *
    (h @ w2^T)."""
    n_experts, hidden, ffn = w_down.shape
    y = torch.empty(h.shape[0], hidden, dtype=h.dtype, device=h.device)
    _launch(h, w_down.view(n_experts * hidden, ffn), y, weights, routing, config["down"],
            hidden, 0, gate_up=False, pad=pad_m(config), one=config.get("one", False))
    return y
