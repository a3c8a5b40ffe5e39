"""Triton kernels of the fused MoE expert FFN (SwiGLU experts, Mixtral layout).

Two GEMMs per (token, slot) pair p = t * k + j routed to expert e:
    gate_up:  h[p]   = silu(x[t] @ w1[e]^T) * (x[t] @ w3[e]^T)     w_gate_up[e] = [w1; w3], [2F, H]
    down:     y[p]   = topk_weights[p] * (h[p] @ w2[e]^T)          w_down[e] = w2, [H, F]
and out[t] = sum_j y[t * k + j] (a k-way sum done by the launcher; for k = 1 y is out).

Every kernel reads x and h rows through a pair index (no gather copy), keeps fp32 accumulators,
fuses SiLU(gate) * up into the gate/up GEMM (two accumulators, one pass over x), and applies the
gate weight in the down GEMM's epilogue. Two ways of finding an expert's rows:

* `scan` kernels (small batches): grid (min(E, T*k) expert slots, N tile). Each program reads
  topk_ids itself: a histogram names the slot-th expert that has tokens, then a scan writes that
  expert's pair list to a scratch row. There is no routing launch, no padding, and no program
  for an expert without tokens (64 experts at 1 token top-6: 6 slots, not 64). Weights are read
  once when an expert's rows fit one BLOCK_M block (decode), the memory-bound regime of this path.
* `sorted` kernels (large batches): grid over (BLOCK_M block, N tile) of the expert-sorted, padded
  order from `routing.align`, with grouped tile ordering (group_m blocks share a weight tile in
  L2), as in vLLM's fused_moe and the Triton matmul tutorial this layout comes from.

* `swap` kernels (swap_moe.py; large experts at 64-128 rows each): the sorted grid and routing with
  both GEMMs transposed, an expert's rows as the MMA's columns, so that one program takes them all.

* `fused` kernel (decode, T*k small): the `scan` kernels' expert slots, split over F instead of
  the output columns; each program computes its F tile of h and immediately multiplies it into
  w2's matching columns, adding into an fp32 output with atomics: one launch for both GEMMs and
  the combine, no h in memory (NOTES.md, v4).

* `combine` kernel: the k-way sum of the down GEMM's y [T*k, H] rows into out [T, H] (when the
  down GEMM does not combine with atomics itself).
* `gather` kernel: its mirror for the wgmma path, whose TMA copies need the token rows in expert
  order in memory: each sorted row's token row of x, padding rows skipped.

Two variants a config can switch on (constexpr flags): PAIRED, one interleaved gate/up dot of
twice the width instead of two (NOTES.md v5), and TMA on the sorted kernels, the weight tiles
through tensor descriptors while the gathered token rows stay on pointer loads (v6: it made the
compute-bound GEMMs tensor-bound instead of bound by the per-thread copies).

The launcher (launch.py) picks the path and the block shapes from the tuned configs.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .pdl import wait_for_predecessor
from .routing import expert_counts, expert_pairs_in_order

# tanh.approx.f32 is PTX, which Triton's CPU interpreter cannot run: where TRITON_INTERPRET=1 as
# these kernels are decorated (the interpreter is chosen then too), silu_mul takes the sigmoid
_TANH_SILU = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up, fp32. On the GPU silu(x) = x/2 (1 + tanh(x/2)) by tanh.approx.f32: one
    MUFU op an element where x * sigmoid(x) takes two and a division's range check (NOTES.md v27;
    error at most |x| 2^-12 absolute, as wgmma_moe._silu)."""
    if _TANH_SILU:
        half = 0.5 * gate
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [half], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return (half + half * t) * up
    else:
        return gate * tl.sigmoid(gate) * up


@triton.jit
def _load_rows(ptrs, valid_m, offs_k, k_left, EVEN_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of gathered activation rows; invalid rows and K past k_left read 0."""
    mask = valid_m[:, None]
    if not EVEN_K:
        mask = mask & (offs_k < k_left)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_weights(ptrs, col_mask, offs_k, k_left, EVEN_K: tl.constexpr):
    """A [BLOCK_K, N] weight tile (K-major rows); columns off col_mask and K past k_left read 0."""
    mask = col_mask[None, :]
    if not EVEN_K:
        mask = mask & (offs_k < k_left)[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _gate_up_act(
    x_ptr, w_ptr, tok, valid_m, expert, pid_n, H, F, stride_xt, stride_we, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PAIRED: tl.constexpr = False, TMA: tl.constexpr = False,
):
    """silu(x[tok] @ w1[e, n tile]^T) * (x[tok] @ w3[e, n tile]^T): [BLOCK_M, BLOCK_N] fp32,
    zero in the columns past F (TMA: columns past F hold whatever the next weight rows give;
    the caller masks them).

    PAIRED: one [BLOCK_K, 2*BLOCK_N] weight tile per step whose columns alternate w1 row f, w3 row
    f, and one dot into a [BLOCK_M, 2*BLOCK_N] accumulator, split into gate and up at the end (in
    the MMA layout each thread holds adjacent column pairs, so the split stays in registers);
    with TMA the two halves are stacked instead of interleaved (one [2, BLOCK_N, BLOCK_K] box).
    Otherwise two [BLOCK_K, BLOCK_N] tiles and two dots. One dot twice as wide halves the
    shared-memory reads per FLOP on Hopper's wgmma (the two-dot form measured shared-pipe bound
    at 2048 tokens, NOTES.md call 8). The interleaved layout is that of OpenAI's triton_kernels
    SwiGLU matmul; here it is formed by the pointers, the weights stay [w1; w3].
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    if TMA and PAIRED:
        # w_ptr is a tensor descriptor over [w1; w3] viewed [E * 2, F, H] with [2, BLOCK_N,
        # BLOCK_K] boxes: one copy brings the gate and the up rows of these F columns, stacked
        # (F past its end reads 0), for one dot of twice the width; gate and up are then the
        # accumulator's two column halves (held by the same threads in the MMA layout).
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a = _load_rows(a_ptrs, valid_m, offs_k, H - k0, EVEN_K)
            w = w_ptr.load([2 * expert, pid_n * BLOCK_N, k0]).reshape([2 * BLOCK_N, BLOCK_K])
            acc = tl.dot(a, w.T, acc)
            a_ptrs += BLOCK_K
        acc_gate, acc_up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
    elif TMA:
        # w_ptr is a tensor descriptor over [w1; w3] viewed [E * 2F, H] with [BLOCK_N, BLOCK_K]
        # boxes: the copy engine fetches the weight tiles (no per-thread address math or
        # cp.async issue for them; K past H comes back as zeros).
        row_gate = expert * (2 * F) + pid_n * BLOCK_N
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a = _load_rows(a_ptrs, valid_m, offs_k, H - k0, EVEN_K)
            acc_gate = tl.dot(a, w_ptr.load([row_gate, k0]).T, acc_gate)
            acc_up = tl.dot(a, w_ptr.load([row_gate + F, k0]).T, acc_up)
            a_ptrs += BLOCK_K
    elif PAIRED:
        offs_c = tl.arange(0, 2 * BLOCK_N)
        offs_f = pid_n * BLOCK_N + offs_c // 2
        rows = offs_f + (offs_c % 2) * F  # w1 row f, then w3 row f (row F + f of [w1; w3])
        c_mask = offs_f < F
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                  + rows.to(tl.int64)[None, :] * stride_wn + offs_k[:, None])
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a = _load_rows(a_ptrs, valid_m, offs_k, H - k0, EVEN_K)
            acc = tl.dot(a, _load_weights(w_ptrs, c_mask, offs_k, H - k0, EVEN_K), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc_gate, acc_up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < F
        wg_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                   + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None])
        wu_ptrs = wg_ptrs + F * stride_wn
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a = _load_rows(a_ptrs, valid_m, offs_k, H - k0, EVEN_K)
            acc_gate = tl.dot(a, _load_weights(wg_ptrs, n_mask, offs_k, H - k0, EVEN_K), acc_gate)
            acc_up = tl.dot(a, _load_weights(wu_ptrs, n_mask, offs_k, H - k0, EVEN_K), acc_up)
            a_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
    return silu_mul(acc_gate, acc_up)


@triton.jit
def _gate_up_tile(
    x_ptr, w_ptr, h_ptr, tok, pair, valid_m, expert, pid_n, H, F,
    stride_xt, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PAIRED: tl.constexpr, TMA: tl.constexpr = False,
):
    """h[pair, n tile] = silu(x[tok] @ w1[e, n tile]^T) * (x[tok] @ w3[e, n tile]^T)."""
    act = _gate_up_act(x_ptr, w_ptr, tok, valid_m, expert, pid_n, H, F, stride_xt, stride_we,
                       stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PAIRED, TMA)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + pair.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, act.to(h_ptr.dtype.element_ty), mask=valid_m[:, None] & (offs_n < F)[None, :])


@triton.jit
def _down_tile(
    h_ptr, w_ptr, out_ptr, weights_ptr, pair, valid_m, expert, pid_n, H, F,
    stride_hm, stride_we, stride_wn, stride_om, top_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    TMA: tl.constexpr = False, COMBINE: tl.constexpr = False,
):
    """out[pair, n tile] = topk_weights[pair] * (h[pair] @ w2[e, n tile]^T).

    TMA: w_ptr is a tensor descriptor over w2 viewed [E * H, F] with [BLOCK_N, BLOCK_K] boxes.
    COMBINE: out is an fp32 [T, H] accumulator (zeroed) and the tile is added into its token rows
    pair // top_k with atomics: the k-way combine in the epilogue, no [T*k, H] y round trip
    through memory (the order of the adds, so the last bits, vary from run to run).
    """
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < H
    pair64 = pair.to(tl.int64)
    a_ptrs = h_ptr + pair64[:, None] * stride_hm + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:
        row = expert * H + pid_n * BLOCK_N
        for k0 in range(0, F, BLOCK_K):
            a = _load_rows(a_ptrs, valid_m, offs_k, F - k0, EVEN_K)
            acc = tl.dot(a, w_ptr.load([row, k0]).T, acc)
            a_ptrs += BLOCK_K
    else:
        b_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                  + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None])
        for k0 in range(0, F, BLOCK_K):
            a = _load_rows(a_ptrs, valid_m, offs_k, F - k0, EVEN_K)
            acc = tl.dot(a, _load_weights(b_ptrs, n_mask, offs_k, F - k0, EVEN_K), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    gate = tl.load(weights_ptr + pair, mask=valid_m, other=0.0).to(tl.float32)
    acc = acc * gate[:, None]
    out_mask = valid_m[:, None] & n_mask[None, :]
    if COMBINE:
        out_ptrs = out_ptr + (pair64 // top_k)[:, None] * stride_om + offs_n[None, :]
        # relaxed: only the sum matters, and the launch boundary orders it for readers
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        out_ptrs = out_ptr + pair64[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _slot_expert(ids_ptr, n_pairs, slot, E_POW2: tl.constexpr, SCAN: tl.constexpr):
    """The slot-th smallest expert id present in ids, or -1 when fewer experts are present."""
    counts = expert_counts(ids_ptr, n_pairs, E_POW2, SCAN)
    bins = tl.arange(0, E_POW2)
    present = counts > 0
    rank = tl.cumsum(present.to(tl.int32), 0) - 1
    found = present & (rank == slot)
    return tl.sum(tl.where(found, bins, 0), 0) - (tl.sum(found.to(tl.int32), 0) == 0).to(tl.int32)


@triton.jit
def _expert_pairs(ids_ptr, scratch_ptr, expert, n_pairs, SCAN: tl.constexpr):
    """Write expert's pair indices, in order, to scratch[expert, 0:count]; return count.

    Every program of the expert writes the same values (a benign race between programs); the
    barrier makes this program's own writes visible to all its threads before they are read.
    """
    row = scratch_ptr + expert.to(tl.int64) * n_pairs
    # first = expert * 0: an int32 tensor from the start (a loop-carried value)
    count = expert_pairs_in_order(ids_ptr, row, row, expert, expert * 0, n_pairs, SCAN, False)
    tl.debug_barrier()
    return count


@triton.jit(do_not_specialize=["n_pairs", "top_k"])
def gate_up_scan_kernel(
    x_ptr, w_ptr, h_ptr, ids_ptr, scratch_ptr, n_pairs, top_k, H, F,
    stride_xt, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SCAN: tl.constexpr, E_POW2: tl.constexpr,
    PAIRED: tl.constexpr = False, PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    expert = _slot_expert(ids_ptr, n_pairs, tl.program_id(0), E_POW2, SCAN)
    if expert < 0:
        return
    pid_n = tl.program_id(1)
    count = _expert_pairs(ids_ptr, scratch_ptr, expert, n_pairs, SCAN)
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid_m = offs_m < count
        pair = tl.load(scratch_ptr + expert.to(tl.int64) * n_pairs + offs_m, mask=valid_m, other=0)
        _gate_up_tile(x_ptr, w_ptr, h_ptr, pair // top_k, pair, valid_m, expert, pid_n, H, F,
                      stride_xt, stride_we, stride_wn, stride_hm,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PAIRED)


@triton.jit(do_not_specialize=["n_pairs", "top_k"])
def down_scan_kernel(
    h_ptr, w_ptr, out_ptr, weights_ptr, ids_ptr, scratch_ptr, n_pairs, top_k, H, F,
    stride_hm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SCAN: tl.constexpr, E_POW2: tl.constexpr,
    COMBINE: tl.constexpr = False, PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    expert = _slot_expert(ids_ptr, n_pairs, tl.program_id(0), E_POW2, SCAN)
    if expert < 0:
        return
    pid_n = tl.program_id(1)
    count = _expert_pairs(ids_ptr, scratch_ptr, expert, n_pairs, SCAN)
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid_m = offs_m < count
        pair = tl.load(scratch_ptr + expert.to(tl.int64) * n_pairs + offs_m, mask=valid_m, other=0)
        _down_tile(h_ptr, w_ptr, out_ptr, weights_ptr, pair, valid_m, expert, pid_n, H, F,
                   stride_hm, stride_we, stride_wn, stride_om, top_k,
                   BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, COMBINE)


@triton.jit
def _fused_expert_tile(
    x_ptr, w13_ptr, w2_ptr, acc_ptr, weights_ptr, ids_ptr, scratch_ptr, expert, pid_f,
    n_pairs, top_k, H, F, stride_xt, stride_w13e, stride_w13n, stride_w2e, stride_w2n,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr, SCAN: tl.constexpr, PAIRED: tl.constexpr, TMA: tl.constexpr,
):
    """acc[t, :] += topk_weights[p] * h[p, f tile] @ w2[e, :, f tile]^T for expert e's pairs p.

    TMA: w13_ptr and w2_ptr are tensor descriptors over [w1; w3] viewed [E * 2F, H] in
    [BLOCK_F, BLOCK_K] boxes (with PAIRED: viewed [E * 2, F, H] in stacked [2, BLOCK_F, BLOCK_K]
    boxes, see _gate_up_act) and over w2 viewed [E * H, F] in [BLOCK_N, BLOCK_F] boxes.
    """
    count = _expert_pairs(ids_ptr, scratch_ptr, expert, n_pairs, SCAN)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < F
    offs_n = tl.arange(0, BLOCK_N)
    if not TMA:
        w2_tile = (w2_ptr + expert.to(tl.int64) * stride_w2e + offs_n.to(tl.int64)[None, :]
                   * stride_w2n + offs_f[:, None])  # [BLOCK_F, BLOCK_N]
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid_m = offs_m < count
        pair = tl.load(scratch_ptr + expert.to(tl.int64) * n_pairs + offs_m, mask=valid_m, other=0)
        tok = pair // top_k
        act = _gate_up_act(x_ptr, w13_ptr, tok, valid_m, expert, pid_f, H, F, stride_xt,
                           stride_w13e, stride_w13n, BLOCK_M, BLOCK_F, BLOCK_K, EVEN_K, PAIRED,
                           TMA)
        if TMA:  # columns past F may hold the next weight rows' products: zero them
            act = tl.where(f_mask[None, :], act, 0.0)
        act = act.to(x_ptr.dtype.element_ty)  # h rounded as the two-kernel paths store it
        gate = tl.load(weights_ptr + pair, mask=valid_m, other=0.0).to(tl.float32)
        o_ptrs = acc_ptr + tok.to(tl.int64)[:, None] * H + offs_n[None, :]
        for n0 in range(0, H, BLOCK_N):
            n_mask = offs_n < H - n0
            if TMA:  # rows past H are the next expert's (masked below); F past its end reads 0
                b = w2_ptr.load([expert * H + n0, pid_f * BLOCK_F]).T
            else:
                b = tl.load(w2_tile + n0 * stride_w2n, mask=f_mask[:, None] & n_mask[None, :],
                            other=0.0)
            y = tl.dot(act, b) * gate[:, None]
            # relaxed: only the sum matters, and the launch boundary orders it for readers
            tl.atomic_add(o_ptrs, y, mask=valid_m[:, None] & n_mask[None, :], sem="relaxed")
            o_ptrs += BLOCK_N


@triton.jit(do_not_specialize=["n_pairs", "top_k"])
def fused_scan_kernel(
    x_ptr, w13_ptr, w2_ptr, acc_ptr, weights_ptr, ids_ptr, scratch_ptr, n_pairs, top_k, H, F,
    stride_xt, stride_w13e, stride_w13n, stride_w2e, stride_w2n,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr, SCAN: tl.constexpr, E_POW2: tl.constexpr,
    PAIRED: tl.constexpr = False, TMA: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Both GEMMs and the k-way combine in one launch, split-K over the FFN dimension F.

    Program (slot, f tile): for the slot-th present expert e and its pairs p (token t),
        acc[t, :] += topk_weights[p] * h[p, f tile] @ w2[e, :, f tile]^T,
        h[p, f tile] = silu(x[t] @ w1[e, f tile]^T) * (x[t] @ w3[e, f tile]^T),
    h never leaves registers, and the sums over F tiles and over a token's k experts are fp32
    atomics into acc [T, H] (contiguous fp32 zeros). Each program reads its f tile of w1, w3
    (2 * BLOCK_F * H) and w2 (H * BLOCK_F) once per BLOCK_M rows of the expert: for decode one
    heavy launch instead of gate/up, down and combine back to back (NOTES.md, v4). The order of
    the atomics varies from run to run: the last bits of the result are not deterministic.
    (A variant whose last program casts and re-zeros acc itself, behind a ticket counter, is
    correct once its zero stores wait at a barrier for every thread's loads, and no faster
    than the launcher's zero + cast: NOTES.md v4, v16; its code is commit ad73810.)
    """
    wait_for_predecessor(PDL)
    expert = _slot_expert(ids_ptr, n_pairs, tl.program_id(0), E_POW2, SCAN)
    if expert >= 0:
        _fused_expert_tile(x_ptr, w13_ptr, w2_ptr, acc_ptr, weights_ptr, ids_ptr, scratch_ptr,
                           expert, tl.program_id(1), n_pairs, top_k, H, F, stride_xt,
                           stride_w13e, stride_w13n, stride_w2e, stride_w2n,
                           BLOCK_M, BLOCK_F, BLOCK_K, BLOCK_N, EVEN_K, SCAN, PAIRED, TMA)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, group_m):
    """Grouped ordering: group_m row blocks walk the N tiles together, sharing weight tiles in L2.
    A runtime value (one compiled kernel for every group size the tuner tries)."""
    in_group = group_m * num_pid_n
    group = pid // in_group
    first_m = group * group_m
    group_size = tl.minimum(num_pid_m - first_m, group_m)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _gate_up_block(x_ptr, w_ptr, h_ptr, sorted_ptr, start, n_pairs, top_k, expert, pid_n, H, F,
                   stride_xt, stride_we, stride_wn, stride_hm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, PAIRED: tl.constexpr, TMA: tl.constexpr):
    """The gate/up tile of the BLOCK_M sorted rows from `start` (padding rows hold n_pairs)."""
    pair = tl.load(sorted_ptr + start + tl.arange(0, BLOCK_M))
    _gate_up_tile(x_ptr, w_ptr, h_ptr, pair // top_k, pair, pair < n_pairs, expert, pid_n, H, F,
                  stride_xt, stride_we, stride_wn, stride_hm,
                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PAIRED, TMA)


@triton.jit
def _down_block(h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, start, n_pairs, expert, pid_n,
                H, F, stride_hm, stride_we, stride_wn, stride_om, top_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, TMA: tl.constexpr, COMBINE: tl.constexpr):
    """The down tile of the BLOCK_M sorted rows from `start` (padding rows hold n_pairs)."""
    pair = tl.load(sorted_ptr + start + tl.arange(0, BLOCK_M))
    _down_tile(h_ptr, w_ptr, out_ptr, weights_ptr, pair, pair < n_pairs, expert, pid_n, H, F,
               stride_hm, stride_we, stride_wn, stride_om, top_k,
               BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)


@triton.jit(do_not_specialize=["n_pairs", "top_k", "num_pid_m", "group_m"])
def gate_up_sorted_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ptr, block_expert_ptr, block_start_ptr, n_blocks_ptr, n_pairs,
    top_k, H, F, num_pid_m, group_m, stride_xt, stride_we, stride_wn, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PAIRED: tl.constexpr = False,
    TMA: tl.constexpr = False, HALF_TAIL: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """HALF_TAIL: a block of BLOCK_M / 2 rows (an expert's last, routing.align) runs at that
    height, a second compiled tile in the same kernel."""
    wait_for_predecessor(PDL)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(F, BLOCK_N), group_m)
    if pid_m >= tl.load(n_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    start = tl.load(block_start_ptr + pid_m)
    args = (x_ptr, w_ptr, h_ptr, sorted_ptr, start, n_pairs, top_k, expert, pid_n, H, F,
            stride_xt, stride_we, stride_wn, stride_hm)
    if HALF_TAIL and tl.load(block_start_ptr + pid_m + 1) - start <= BLOCK_M // 2:
        _gate_up_block(*args, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, PAIRED, TMA)
    else:
        _gate_up_block(*args, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PAIRED, TMA)


@triton.jit(do_not_specialize=["n_pairs", "top_k", "num_pid_m", "group_m"])
def down_sorted_kernel(
    h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, block_start_ptr,
    n_blocks_ptr, n_pairs, top_k, H, F, num_pid_m, group_m, stride_hm, stride_we, stride_wn,
    stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr = False,
    HALF_TAIL: tl.constexpr = False, COMBINE: tl.constexpr = False, PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(H, BLOCK_N), group_m)
    if pid_m >= tl.load(n_blocks_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m)
    start = tl.load(block_start_ptr + pid_m)
    args = (h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, start, n_pairs, expert, pid_n, H, F,
            stride_hm, stride_we, stride_wn, stride_om, top_k)
    if HALF_TAIL and tl.load(block_start_ptr + pid_m + 1) - start <= BLOCK_M // 2:
        _down_block(*args, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)
    else:
        _down_block(*args, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, COMBINE)


@triton.jit
def combine_kernel(y_ptr, slot_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                   GATHER: tl.constexpr = False, PDL: tl.constexpr = False):
    """out[t, h tile] = sum_j y[t * TOP_K + j, h tile], added in fp32 and rounded once: the k-way
    combine after the down GEMM of the scan and sorted paths. y [T*k, H] and out [T, H] are
    contiguous; grid (T, cdiv(H, BLOCK_H)). GATHER: y is in expert order (the wgmma path), pair
    p's row is y[slot[p]]. A plain streaming kernel: torch's sum over the k dim
    of y viewed [T, k, H] ran at 1.0-2.1 TB/s on an H100, this one at 2.7-3.05 (NOTES.md v17)."""
    wait_for_predecessor(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = t * TOP_K + j
        if GATHER:
            row = tl.load(slot_ptr + row).to(tl.int64)
        acc += tl.load(y_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gather_kernel(x_ptr, sorted_ptr, out_ptr, n_padded_ptr, n_pairs, H, TOP_K: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """out[r] = x[sorted[r] // TOP_K] for the BLOCK_R sorted rows from program_id(0) * BLOCK_R,
    in column tiles of BLOCK_H: the token rows in expert order (the wgmma path's operand). Rows
    past the used ones (n_padded_ptr[0]) and padding rows (sorted id n_pairs) are left unwritten:
    they only ever produce padding rows of h and y, which nothing reads. One launch in place of
    torch's index_select plus the clamp and division before it (NOTES.md v20)."""
    wait_for_predecessor(PDL)
    first = tl.program_id(0) * BLOCK_R
    n_used = tl.load(n_padded_ptr)
    if first < n_used:
        r = first + tl.arange(0, BLOCK_R)
        pair = tl.load(sorted_ptr + r, mask=r < n_used, other=-1)
        keep = (pair >= 0) & (pair < n_pairs)
        token = tl.where(keep, pair // TOP_K, 0).to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = keep[:, None] & (h < H)[None, :]
            row = tl.load(x_ptr + token[:, None] * H + h[None, :], mask=mask)
            tl.store(out_ptr + r.to(tl.int64)[:, None] * H + h[None, :], row, mask=mask)
