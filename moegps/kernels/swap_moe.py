"""The `swap` path: the sorted GEMMs transposed, weights as the MMA's rows, tokens as its columns.

    gate_up:  h[p, f tile]^T = silu(w1[e, f tile] @ x[rows]^T) * (w3[e, f tile] @ x[rows]^T)
    down:     y[p, n tile]^T = topk_weights[p] * (w2[e, n tile] @ h[rows]^T)

Why: on Hopper a warpgroup's MMA is 64 rows tall and 8 to 256 columns wide. The sorted path puts
tokens on the rows, so an expert's rows are padded to 64 (half tails) or 128, and an expert of
128 + r rows runs a second block that reads the whole weight tile again for its r rows. With the
weights on the rows, a program takes all of an expert's rows (up to BLOCK_M) as the columns of
its MMAs, padded to 32 only: each weight tile is read once, by one program. This is the "swap AB"
that TensorRT-LLM's and vLLM's CUTLASS MoE GEMMs use for small batches; written here for Triton.
What it buys, as measured (NOTES.md v23): at Mixtral 512 tokens both GEMMs are bound by L2 (86-92%
of its throughput in Nsight Compute), not DRAM, and a program reads (weight rows + token rows) /
weight rows L2 bytes per weight byte; blocks of 160 rows against 256 weight rows make that about
1.56 instead of 2, and the call 77% -> 83-86% of the floor (256-384 tokens: 90-95%).

The rows of a block are a multiple of 32 (`routing.align` with pad_m 32) and are taken in up to
three column parts whose widths are powers of two (Triton's blocks are): 32, 64, 64 + 32, 128,
128 + 32, 128 + 64, 128 + 64 + 32, 256; each part is one more dot per K step against the same
weight tile, and each combination a compiled variant chosen per block at run time. BLOCK_M (the
most rows a block takes) is 128, 160, 192 or 256: 160 and 192 compile the variants up to 128 + 32
and 128 + 64 only, whose accumulators leave room for 128 gate and 128 up rows a program. An
expert of more than BLOCK_M rows takes several blocks, its rows split evenly over them (align),
each loading its weight tile (through L2 when they run together, as group_m orders them).

The grid, the routing metadata, the weight operands (TMA descriptors or pointers) and the k-way
combine are those of the sorted path (fused_moe.py, launch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_moe import _grouped_tile, _load_rows, silu_mul
from .pdl import wait_for_predecessor

PAD_M = 32  # an expert's rows are padded to this (align's pad_m for the swap path)
BLOCK_MS = (128, 160, 192, 256)  # the block heights _by_column_parts compiles variants for


@triton.jit
def _part_rows(base_ptr, sorted_ptr, row0, n_pairs, top_k, stride, T: tl.constexpr,
               BLOCK_K: tl.constexpr, BY_TOKEN: tl.constexpr):
    """Pairs of sorted rows row0 .. row0 + T, which are real (not padding), and pointers to their
    source rows' first BLOCK_K columns: x's token rows (BY_TOKEN) or h's pair rows."""
    pair = tl.load(sorted_ptr + row0 + tl.arange(0, T))
    valid = pair < n_pairs
    src = pair // top_k if BY_TOKEN else pair
    ptrs = base_ptr + src.to(tl.int64)[:, None] * stride + tl.arange(0, BLOCK_K)[None, :]
    return pair, valid, ptrs


@triton.jit
def _weight_tile(w_ptr, ptrs, row, k0, row_mask, offs_k, k_left, TMA: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] weight rows: from a tensor descriptor at (row, k0), else by pointers."""
    if TMA:
        w = w_ptr.load([row, k0])
    else:
        mask = row_mask[:, None]
        if not EVEN_K:
            mask = mask & (offs_k < k_left)[None, :]
        w = tl.load(ptrs, mask=mask, other=0.0)
    return w


@triton.jit
def _store_h(h_ptr, gate, up, pair, valid, offs_f, f_mask, stride_hm):
    act = silu_mul(gate, up)  # [BLOCK_N, T]: column j is pair j's h
    ptrs = h_ptr + pair.to(tl.int64)[None, :] * stride_hm + offs_f[:, None]
    tl.store(ptrs, act.to(h_ptr.dtype.element_ty), mask=f_mask[:, None] & valid[None, :])


@triton.jit
def _gate_up_swap_block(
    x_ptr, w_ptr, h_ptr, sorted_ptr, start, n_pairs, top_k, expert, pid_n, H, F,
    stride_xt, stride_we, stride_wn, stride_hm,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, COMBINE: tl.constexpr,
):
    """h of sorted rows start .. start + T0 + T1 + T2 (T1, T2 may be 0) at F columns pid_n.
    (COMBINE, the down block's flag, is unused: both blocks share _by_column_parts.)"""
    offs_k = tl.arange(0, BLOCK_K)
    offs_f = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_mask = offs_f < F
    # TMA: w_ptr is a descriptor over [w1; w3] viewed [E * 2F, H] in [BLOCK_N, BLOCK_K] boxes
    row = expert * (2 * F) + pid_n * BLOCK_N
    wg_ptrs = w_ptr
    wu_ptrs = w_ptr
    if not TMA:
        wg_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                   + offs_f.to(tl.int64)[:, None] * stride_wn + offs_k[None, :])
        wu_ptrs = wg_ptrs + F * stride_wn
    pair0, valid0, a0_ptrs = _part_rows(x_ptr, sorted_ptr, start, n_pairs, top_k, stride_xt, T0,
                                        BLOCK_K, True)
    gate0 = tl.zeros([BLOCK_N, T0], dtype=tl.float32)
    up0 = tl.zeros([BLOCK_N, T0], dtype=tl.float32)
    if T1 > 0:
        pair1, valid1, a1_ptrs = _part_rows(x_ptr, sorted_ptr, start + T0, n_pairs, top_k,
                                            stride_xt, T1, BLOCK_K, True)
        gate1 = tl.zeros([BLOCK_N, T1], dtype=tl.float32)
        up1 = tl.zeros([BLOCK_N, T1], dtype=tl.float32)
    if T2 > 0:
        pair2, valid2, a2_ptrs = _part_rows(x_ptr, sorted_ptr, start + T0 + T1, n_pairs, top_k,
                                            stride_xt, T2, BLOCK_K, True)
        gate2 = tl.zeros([BLOCK_N, T2], dtype=tl.float32)
        up2 = tl.zeros([BLOCK_N, T2], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        wg = _weight_tile(w_ptr, wg_ptrs, row, k0, f_mask, offs_k, H - k0, TMA, EVEN_K)
        wu = _weight_tile(w_ptr, wu_ptrs, row + F, k0, f_mask, offs_k, H - k0, TMA, EVEN_K)
        a0 = _load_rows(a0_ptrs, valid0, offs_k, H - k0, EVEN_K)
        gate0 = tl.dot(wg, a0.T, gate0)
        up0 = tl.dot(wu, a0.T, up0)
        a0_ptrs += BLOCK_K
        if T1 > 0:
            a1 = _load_rows(a1_ptrs, valid1, offs_k, H - k0, EVEN_K)
            gate1 = tl.dot(wg, a1.T, gate1)
            up1 = tl.dot(wu, a1.T, up1)
            a1_ptrs += BLOCK_K
        if T2 > 0:
            a2 = _load_rows(a2_ptrs, valid2, offs_k, H - k0, EVEN_K)
            gate2 = tl.dot(wg, a2.T, gate2)
            up2 = tl.dot(wu, a2.T, up2)
            a2_ptrs += BLOCK_K
        if not TMA:
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
    _store_h(h_ptr, gate0, up0, pair0, valid0, offs_f, f_mask, stride_hm)
    if T1 > 0:
        _store_h(h_ptr, gate1, up1, pair1, valid1, offs_f, f_mask, stride_hm)
    if T2 > 0:
        _store_h(h_ptr, gate2, up2, pair2, valid2, offs_f, f_mask, stride_hm)


@triton.jit
def _store_y(out_ptr, weights_ptr, acc, pair, valid, offs_n, n_mask, stride_om, top_k,
             COMBINE: tl.constexpr):
    """y[pair, n tile] = gate weight * acc^T, or with COMBINE added into out[token] (atomics)."""
    gate = tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    acc = acc * gate[None, :]
    mask = n_mask[:, None] & valid[None, :]
    dest = pair.to(tl.int64) // top_k if COMBINE else pair.to(tl.int64)
    ptrs = out_ptr + dest[None, :] * stride_om + offs_n[:, None]
    if COMBINE:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_swap_block(
    h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, start, n_pairs, top_k, expert, pid_n, H, F,
    stride_hm, stride_we, stride_wn, stride_om,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, COMBINE: tl.constexpr,
):
    """y of sorted rows start .. start + T0 + T1 + T2 at H columns pid_n."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    row = expert * H + pid_n * BLOCK_N  # TMA: a descriptor over w2 viewed [E * H, F]
    w_ptrs = w_ptr
    if not TMA:
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                  + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :])
    pair0, valid0, a0_ptrs = _part_rows(h_ptr, sorted_ptr, start, n_pairs, top_k, stride_hm, T0,
                                        BLOCK_K, False)
    acc0 = tl.zeros([BLOCK_N, T0], dtype=tl.float32)
    if T1 > 0:
        pair1, valid1, a1_ptrs = _part_rows(h_ptr, sorted_ptr, start + T0, n_pairs, top_k,
                                            stride_hm, T1, BLOCK_K, False)
        acc1 = tl.zeros([BLOCK_N, T1], dtype=tl.float32)
    if T2 > 0:
        pair2, valid2, a2_ptrs = _part_rows(h_ptr, sorted_ptr, start + T0 + T1, n_pairs, top_k,
                                            stride_hm, T2, BLOCK_K, False)
        acc2 = tl.zeros([BLOCK_N, T2], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        w = _weight_tile(w_ptr, w_ptrs, row, k0, n_mask, offs_k, F - k0, TMA, EVEN_K)
        acc0 = tl.dot(w, _load_rows(a0_ptrs, valid0, offs_k, F - k0, EVEN_K).T, acc0)
        a0_ptrs += BLOCK_K
        if T1 > 0:
            acc1 = tl.dot(w, _load_rows(a1_ptrs, valid1, offs_k, F - k0, EVEN_K).T, acc1)
            a1_ptrs += BLOCK_K
        if T2 > 0:
            acc2 = tl.dot(w, _load_rows(a2_ptrs, valid2, offs_k, F - k0, EVEN_K).T, acc2)
            a2_ptrs += BLOCK_K
        if not TMA:
            w_ptrs += BLOCK_K
    _store_y(out_ptr, weights_ptr, acc0, pair0, valid0, offs_n, n_mask, stride_om, top_k, COMBINE)
    if T1 > 0:
        _store_y(out_ptr, weights_ptr, acc1, pair1, valid1, offs_n, n_mask, stride_om, top_k,
                 COMBINE)
    if T2 > 0:
        _store_y(out_ptr, weights_ptr, acc2, pair2, valid2, offs_n, n_mask, stride_om, top_k,
                 COMBINE)


@triton.jit
def _by_column_parts(block: tl.constexpr, args, parts, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                     COMBINE: tl.constexpr):
    """`block` (either GEMM's block function) on a block of `parts` x 32 rows, cut into the column
    parts of the module docstring: one compiled variant per height up to BLOCK_M."""
    if BLOCK_M == 256:
        if parts == 8:
            block(*args, 256, 0, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
        elif parts == 7:
            block(*args, 128, 64, 32, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    if BLOCK_M >= 192:
        if parts == 6:
            block(*args, 128, 64, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    if BLOCK_M >= 160:
        if parts == 5:
            block(*args, 128, 32, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    if parts == 4:
        block(*args, 128, 0, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    elif parts == 3:
        block(*args, 64, 32, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    elif parts == 2:
        block(*args, 64, 0, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    elif parts == 1:
        block(*args, 32, 0, 0, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)


@triton.jit(do_not_specialize=["n_pairs", "top_k", "num_pid_m", "group_m"])
def gate_up_swap_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_pairs,
    top_k, H, F, num_pid_m, group_m, stride_xt, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Grid (max blocks x F tiles), grouped; each block's rows (a multiple of 32, <= BLOCK_M in
    BLOCK_MS) in the column parts named in the module docstring."""
    wait_for_predecessor(PDL)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(F, BLOCK_N), group_m)
    if pid_m >= tl.load(n_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    start = tl.load(block_start_ptr + pid_m)
    args = (x_ptr, w_ptr, h_ptr, sorted_ptr, start, n_pairs, top_k, expert, pid_n, H, F,
            stride_xt, stride_we, stride_wn, stride_hm)
    parts = (tl.load(block_start_ptr + pid_m + 1) - start) // 32
    _by_column_parts(_gate_up_swap_block, args, parts, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, False)


@triton.jit(do_not_specialize=["n_pairs", "top_k", "num_pid_m", "group_m"])
def down_swap_kernel(
    h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, block_start_ptr,
    n_blocks_ptr, n_pairs, top_k, H, F, num_pid_m, group_m, stride_hm, stride_we, stride_wn,
    stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr = False, COMBINE: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Grid (max blocks x H tiles), grouped; the block's rows as gate_up_swap_kernel's."""
    wait_for_predecessor(PDL)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(H, BLOCK_N), group_m)
    if pid_m >= tl.load(n_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    start = tl.load(block_start_ptr + pid_m)
    args = (h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, start, n_pairs, top_k, expert, pid_n,
            H, F, stride_hm, stride_we, stride_wn, stride_om)
    parts = (tl.load(block_start_ptr + pid_m + 1) - start) // 32
    _by_column_parts(_down_swap_block, args, parts, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
