"""The engine's own Triton kernels, each beside the torch function it must equal.

A decode step of a Mixtral-size model reads about 84 MB of attention weights per layer (20 us at
the H200's copy rate) but, written with stock torch ops, launches some twenty kernels per layer
whose gaps and ramps cost far more than the reads. These kernels fuse what sits between the
matrix products:

* ``add_rmsnorm``: the residual add and the RMSNorm after it, one pass (was: add, pow, mean,
  rsqrt, mul, cast, mul).
* ``linear``: the projections of decode-sized batches (fused QKV, output, lm_head), each program
  streaming a few weight rows; cuBLAS for larger batches.
* ``rope_cache_write``: rotary embedding of q and k from the fused QKV projection's output and
  the write of k and v into the static KV cache at each token's (slot, position).
  ``qkv_rope_cache_write`` does both in the skinny projection's epilogue for decode-sized batches
  (one launch instead of two per layer; each program's columns are pairs (i, i + D/2) of a head).
* ``decode_attention``: grouped-query attention of one new token per sequence over its cached
  keys, all query heads of a KV group in one program (the group's K/V tiles are read once), the
  context split over programs and merged by log-sum-exp (flash-decoding, Dao et al. 2023).
* ``router_topk``: the router's logits, softmax, top-k and renormalisation in one launch, writing
  the ids and gate weights the MoE kernels read; ``add_rmsnorm_router`` fuses it into the norm
  before the MoE for decode-sized batches (one launch instead of two per layer).

Every kernel launches with programmatic dependent launch on Hopper (``moegps.kernels.pdl``): it is
scheduled while the kernel before it drains, and waits for it before its first load.

Every ``*_torch`` function is the plain-torch definition (the CPU path and the tests' reference).
``use_triton(t)`` decides per tensor: a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from moegps.kernels.pdl import launch_flags, wait_for_predecessor


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# ---- residual add + RMSNorm ----------------------------------------------------------------------

@triton.jit
def _add_rmsnorm_kernel(resid_ptr, delta_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr,
                        BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(resid_ptr + row * H + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        # the sum is rounded to the stream's dtype before the norm, as an unfused model does
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(resid_ptr.dtype.element_ty)
        tl.store(resid_ptr + row * H + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty)  # cast before the weight, as transformers' Mixtral
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * H + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm_torch(resid: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``resid [T, H] += delta`` (in place, when given), returns ``rmsnorm(resid) * weight [T, H]``."""
    if delta is not None:
        resid.add_(delta)
    x = resid.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(resid.dtype)
    result = weight * normed
    if out is not None:
        out.copy_(result)
        return out
    return result


def add_rmsnorm(resid: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`add_rmsnorm_torch`: one launch, one program per row. ``resid`` contiguous [T, H]."""
    if not use_triton(resid):
        return add_rmsnorm_torch(resid, delta, weight, eps, out)
    T, H = resid.shape
    out = torch.empty_like(resid) if out is None else out
    if T:
        block = triton.next_power_of_2(H)
        _add_rmsnorm_kernel[(T,)](resid, delta if delta is not None else resid, weight, out, H, eps,
                                  HAS_DELTA=delta is not None, BLOCK_H=block,
                                  num_warps=max(1, min(16, block // 512)), **launch_flags(resid))
    return out


# ---- skinny linear: the decode projections -----------------------------------------------------------

# Up to this many rows (tokens), the projections run as `_skinny_linear_kernel`. Against cuBLAS on an H200,
# share of the weights' read floor at batch 1 (benchmarks/engine/linear_probe.py; h200-2026-12-04 calls 3
# and 7): Mixtral's output projection 73% against 65%, QKV 82% against 81%, lm_head 98% against 101%;
# DeepSeek-V2-Lite's lm_head 106% against 98%. In the engine's step: 1.6-1.8% faster at batch 1.
SKINNY_MAX_ROWS = 16
# Launch settings: the best geometric mean over Mixtral's three projections at batch 1 and 8 of the 36
# that benchmarks/engine/linear_probe.py --sweep times (H200, benchmarks/engine/h200-2026-12-04/call2).
# Tiles of 16 rows for DeepSeek-V2-Lite's 2048-row output projection (128 programs instead of 64) were no
# faster, in the probe (6.05 against 6.02 us, 47% of the floor: latency, not programs) or the step (0.5%,
# one H100, benchmarks/engine/h100-2026-12-05-z).
LINEAR_DEFAULTS = dict(block_n=32, block_k=128, num_warps=4, num_stages=6)


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, out_ptr, T, N, K, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False):
    """Program j: out[:, j*BLOCK_N : (j+1)*BLOCK_N] of out [T, N] = x [T, K] @ w [N, K]^T, T <= BLOCK_T, K a
    multiple of BLOCK_K. Each program streams its BLOCK_N weight rows once; small tiles make enough
    programs (N / BLOCK_N) to keep every SM's loads in flight, which is all a batch-1 product needs."""
    wait_for_predecessor(PDL)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_t[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=t_mask[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee" if IEEE else None)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(out_ptr + offs_t[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


def linear(x: torch.Tensor, w: torch.Tensor, **settings) -> torch.Tensor:
    """``x [T, K] @ w [N, K]^T -> [T, N]``: for up to SKINNY_MAX_ROWS contiguous rows on the GPU (or under
    the interpreter) one `_skinny_linear_kernel` launch, otherwise torch's matmul (cuBLAS). ``settings``
    override LINEAR_DEFAULTS (block_n, block_k, num_warps, num_stages)."""
    cfg = dict(LINEAR_DEFAULTS, **settings)
    T, K = x.shape
    if not (use_triton(x) and 0 < T <= SKINNY_MAX_ROWS and K % cfg["block_k"] == 0 and x.is_contiguous()
            and w.is_contiguous()):
        return x @ w.T
    N = w.shape[0]
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(N, cfg["block_n"]),)](
        x, w, out, T, N, K, BLOCK_T=16, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **launch_flags(x))
    return out


# ---- rotary embedding + KV-cache write -------------------------------------------------------------

def rope_tables(max_positions: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` each ``[max_positions, head_dim / 2]`` float32: angle p * theta^(-2i/D)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


@triton.jit
def _rope_cache_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
                       N_HEADS, N_KV, stride_cb, stride_ch, stride_cs, HALF: tl.constexpr, HEADS: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Program (token, j): heads j*HEADS .. j*HEADS+HEADS-1 of the token, counting the query heads
    first and then the key heads (whose values are copied beside them). A block of heads per
    program: one head per program made a 2048-token prompt launch 80k programs of 256 bytes each.
    A token of slot -1 (a packed prefill's padding) writes no K/V."""
    wait_for_predecessor(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    D = 2 * HALF
    width = (N_HEADS + 2 * N_KV) * D
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * HALF + d)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + d)[None, :]
    is_q = head < N_HEADS
    is_k = (head >= N_HEADS) & (head < N_HEADS + N_KV)
    live = (is_q | is_k)[:, None]
    src = qkv_ptr + token * width + head[:, None] * D + d[None, :]
    x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=live, other=0.0).to(tl.float32)
    # rotate_half convention (transformers' Llama/Mixtral): [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    dst = q_ptr + token * N_HEADS * D + head[:, None] * D + d[None, :]
    tl.store(dst, r1.to(q_ptr.dtype.element_ty), mask=is_q[:, None])
    tl.store(dst + HALF, r2.to(q_ptr.dtype.element_ty), mask=is_q[:, None])
    kv = tl.where(is_k, head - N_HEADS, 0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    is_k = is_k & (head * 0 + slot >= 0)  # broadcast first: a scalar's & left a mask of a dtype stores refuse
    at = slot * stride_cb + kv[:, None] * stride_ch + pos * stride_cs + d[None, :]
    tl.store(k_cache_ptr + at, r1.to(k_cache_ptr.dtype.element_ty), mask=is_k[:, None])
    tl.store(k_cache_ptr + at + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=is_k[:, None])
    vsrc = qkv_ptr + token * width + (N_HEADS + N_KV + kv[:, None]) * D + d[None, :]
    tl.store(v_cache_ptr + at, tl.load(vsrc, mask=is_k[:, None], other=0.0), mask=is_k[:, None])
    tl.store(v_cache_ptr + at + HALF, tl.load(vsrc + HALF, mask=is_k[:, None], other=0.0), mask=is_k[:, None])


def rope_cache_write_torch(qkv, k_cache, v_cache, positions, slots, cos, sin, n_heads: int, n_kv: int):
    """Rotate q and k of ``qkv [T, (n_heads + 2 n_kv) D]`` by each token's position and write k, v to the
    caches ``[slots, n_kv, max_len, D]`` at ``(slots[t], :, positions[t])``, but for tokens of slot -1 (a
    packed prefill's padding). Returns q ``[T, n_heads, D]``."""
    T = qkv.shape[0]
    D = qkv.shape[1] // (n_heads + 2 * n_kv)
    q, k, v = qkv.view(T, n_heads + 2 * n_kv, D).split([n_heads, n_kv, n_kv], dim=1)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    keep = slots >= 0
    k_cache[slots[keep], :, positions[keep]] = rotate(k)[keep].to(k_cache.dtype)
    v_cache[slots[keep], :, positions[keep]] = v[keep].to(v_cache.dtype)
    return rotate(q)


def rope_cache_write(qkv, k_cache, v_cache, positions, slots, cos, sin, n_heads: int, n_kv: int,
                     q_out: torch.Tensor | None = None):
    """Fused :func:`rope_cache_write_torch`: one launch, grid (tokens, blocks of 8 heads)."""
    if not use_triton(qkv):
        return rope_cache_write_torch(qkv, k_cache, v_cache, positions, slots, cos, sin, n_heads, n_kv)
    T = qkv.shape[0]
    D = qkv.shape[1] // (n_heads + 2 * n_kv)
    q = torch.empty(T, n_heads, D, dtype=qkv.dtype, device=qkv.device) if q_out is None else q_out
    if T:
        heads = 8
        _rope_cache_kernel[(T, triton.cdiv(n_heads + n_kv, heads))](
            qkv, q, k_cache, v_cache, positions, slots, cos, sin, n_heads, n_kv,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HALF=D // 2, HEADS=heads, num_warps=2,
            **launch_flags(qkv))
    return q


# ---- the decode QKV projection with the rotary embedding and the cache write in its epilogue -------------

# Up to this many rows, qkv_rope_cache_write is one launch (_qkv_rope_cache_kernel, tiles of 16 or 32 rows); beyond,
# or at 0 (the bench's "QKV and rotary as two launches" variant), the projection (skinny, or cuBLAS past
# SKINNY_MAX_ROWS) then rope_cache_write.
FUSED_QKV_ROPE_MAX_ROWS = 32
# Launch settings: ``pairs``, the output columns a program computes in each half of a head, pairs (i, i + D/2).
# The best geometric mean over Mixtral's and DeepSeek-V2-Lite's QKV at 1, 8 and 16 rows of the 24 settings that
# benchmarks/engine/qkv_rope_probe.py --sweep times (one H100, benchmarks/engine/h100-2026-12-06-aj): 0.84 of
# pairs=16, block_k=128, num_stages=6 (the skinny kernel's tiles), 0.85-0.88 of the two launches' time.
QKV_ROPE_DEFAULTS = dict(pairs=32, block_k=256, num_warps=4, num_stages=3)


@triton.jit
def _qkv_rope_cache_kernel(x_ptr, w_ptr, q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
                           T, K, N_HEADS, N_KV, stride_cb, stride_ch, stride_cs, HALF: tl.constexpr,
                           PAIRS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                           PDL: tl.constexpr = False):
    """Program j: columns d0 .. d0 + PAIRS - 1 and their partners d0 + HALF .. of head j // (HALF / PAIRS)
    (query heads, then key heads, then value heads) of ``x [T, K] @ w [(N_HEADS + 2 N_KV) 2 HALF, K]^T``; the
    pairs are turned by each token's position (query and key heads) and stored to q or the caches, as
    ``_rope_cache_kernel`` does with the projection's output. The pairs make rotation a program's own business:
    a tile of consecutive columns would hold one half of each pair."""
    wait_for_predecessor(PDL)
    parts = HALF // PAIRS
    head = tl.program_id(0) // parts
    d = (tl.program_id(0) % parts) * PAIRS + tl.arange(0, PAIRS)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    # each token's position, slot and angles before the K loop, so their loads overlap the weights'
    pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64)
    cos = tl.load(cos_ptr + pos[:, None] * HALF + d[None, :], mask=t_mask[:, None], other=0.0)
    sin = tl.load(sin_ptr + pos[:, None] * HALF + d[None, :], mask=t_mask[:, None], other=0.0)
    rows = (head * 2 * HALF + d).to(tl.int64)
    x_ptrs = x_ptr + offs_t[:, None] * K + offs_k[None, :]
    w1_ptrs = w_ptr + rows[:, None] * K + offs_k[None, :]
    w2_ptrs = w1_ptrs + HALF * K
    acc1 = tl.zeros([BLOCK_T, PAIRS], tl.float32)
    acc2 = tl.zeros([BLOCK_T, PAIRS], tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=t_mask[:, None], other=0.0)
        acc1 = tl.dot(a, tl.trans(tl.load(w1_ptrs)), acc1, input_precision="ieee" if IEEE else None)
        acc2 = tl.dot(a, tl.trans(tl.load(w2_ptrs)), acc2, input_precision="ieee" if IEEE else None)
        x_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K
        w2_ptrs += BLOCK_K
    # rounded to the activations' dtype first, as the two-launch path's projection output is
    x1 = acc1.to(q_ptr.dtype.element_ty).to(tl.float32)
    x2 = acc2.to(q_ptr.dtype.element_ty).to(tl.float32)
    if head < N_HEADS + N_KV:  # rotate_half convention, as _rope_cache_kernel
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
    else:  # values are stored as the projection gives them
        r1 = x1
        r2 = x2
    if head < N_HEADS:
        dst = q_ptr + offs_t[:, None] * (N_HEADS * 2 * HALF) + head * 2 * HALF + d[None, :]
        tl.store(dst, r1.to(q_ptr.dtype.element_ty), mask=t_mask[:, None])
        tl.store(dst + HALF, r2.to(q_ptr.dtype.element_ty), mask=t_mask[:, None])
    else:
        live = (t_mask & (slot >= 0))[:, None]  # a packed prefill's padding (slot -1) writes nothing
        at = slot[:, None] * stride_cb + pos[:, None] * stride_cs + d[None, :]
        if head < N_HEADS + N_KV:
            at += (head - N_HEADS) * stride_ch
            tl.store(k_cache_ptr + at, r1.to(k_cache_ptr.dtype.element_ty), mask=live)
            tl.store(k_cache_ptr + at + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=live)
        else:
            at += (head - N_HEADS - N_KV) * stride_ch
            tl.store(v_cache_ptr + at, r1.to(v_cache_ptr.dtype.element_ty), mask=live)
            tl.store(v_cache_ptr + at + HALF, r2.to(v_cache_ptr.dtype.element_ty), mask=live)


def qkv_rope_cache_write(x, wqkv, k_cache, v_cache, positions, slots, cos, sin, n_heads: int, n_kv: int,
                         **settings):
    """``rope_cache_write(linear(x, wqkv), ...)``: the fused QKV projection of ``x [T, H]`` by ``wqkv [(n_heads +
    2 n_kv) D, H]``, q and k rotated by ``positions [T]``, k and v written to the caches at ``slots [T]`` (none for
    slot -1); returns q ``[T, n_heads, D]``. Up to FUSED_QKV_ROPE_MAX_ROWS rows on the GPU (or the interpreter)
    one launch: the rotary kernel's launch and its latency chain (the positions, then the angles, then the
    projection's output) leave the decode step, and q/k/v do not make a round trip through memory. ``settings``
    override QKV_ROPE_DEFAULTS."""
    cfg = dict(QKV_ROPE_DEFAULTS, **settings)
    T, H = x.shape
    D = wqkv.shape[0] // (n_heads + 2 * n_kv)
    half = D // 2
    if not (use_triton(x) and 0 < T <= FUSED_QKV_ROPE_MAX_ROWS and half % cfg["pairs"] == 0
            and H % cfg["block_k"] == 0 and x.is_contiguous() and wqkv.is_contiguous() and k_cache.stride(3) == 1
            and v_cache.stride() == k_cache.stride()):
        return rope_cache_write(linear(x, wqkv), k_cache, v_cache, positions, slots, cos, sin, n_heads, n_kv)
    q = torch.empty(T, n_heads, D, dtype=x.dtype, device=x.device)
    _qkv_rope_cache_kernel[((n_heads + 2 * n_kv) * (half // cfg["pairs"]),)](
        x, wqkv, q, k_cache, v_cache, positions, slots, cos, sin, T, H, n_heads, n_kv, k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), HALF=half, PAIRS=cfg["pairs"], BLOCK_T=16 if T <= 16 else 32,
        BLOCK_K=cfg["block_k"], IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch_flags(x))
    return q


# ---- decode attention (one query token per sequence, GQA, split context) ----------------------------

@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr, scale,
                             N_HEADS, N_KV, MAX_SPLITS, stride_cb, stride_ch, stride_cs,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                             SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
                             PDL: tl.constexpr = False):
    """One program: the GROUP query heads of KV head ``kv`` of sequence ``b`` over keys
    [split * SPLIT, (split + 1) * SPLIT). With several splits each writes its partial output and
    log-sum-exp, and the last to finish (a ticket per (b, kv), reset for the next call) merges them:
    one launch where a separate merge kernel would cost another launch's latency (the "last block
    reduces" pattern of the CUDA samples' threadFenceReduction and of serial split-K GEMMs)."""
    wait_for_predecessor(PDL)
    b = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    start = split * SPLIT
    if start < length:
        end = tl.minimum(start + SPLIT, length)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        head = kv * GROUP + g
        q = tl.load(q_ptr + (b * N_HEADS + head)[:, None] * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(q_ptr.dtype.element_ty)  # exp2 domain
        base = b * stride_cb + kv * stride_ch
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            offs = base + n.to(tl.int64)[:, None] * stride_cs + d[None, :]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))  # [GROUP_PAD, BLOCK_N], already scaled by log2(e) / sqrt(D)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        rows = b * N_HEADS + head
        real = g < GROUP
        if SINGLE:
            tl.store(o_ptr + rows[:, None] * D + d[None, :], (acc / l_sum[:, None]).to(o_ptr.dtype.element_ty),
                     mask=real[:, None])
        else:
            at = rows * MAX_SPLITS + split
            tl.store(part_o_ptr + at[:, None] * D + d[None, :], acc / l_sum[:, None], mask=real[:, None])
            tl.store(part_lse_ptr + at, m + tl.math.log2(l_sum), mask=real)
            tl.debug_barrier()  # every thread's partials are written before the ticket releases them
            ticket = tl.atomic_add(count_ptr + b * N_KV + kv, 1)  # acq_rel, GPU scope
            n_used = tl.cdiv(length, SPLIT)
            if ticket == n_used - 1:
                tl.store(count_ptr + b * N_KV + kv, 0)
                m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
                l_sum = tl.zeros([GROUP_PAD], tl.float32)
                acc = tl.zeros([GROUP_PAD, D], tl.float32)
                for i in range(0, n_used):  # online log-sum-exp over the splits' partials, read from L2
                    at = rows * MAX_SPLITS + i
                    lse = tl.load(part_lse_ptr + at, mask=real, other=0.0, cache_modifier=".cg")
                    part = tl.load(part_o_ptr + at[:, None] * D + d[None, :], mask=real[:, None], other=0.0,
                                   cache_modifier=".cg")
                    m_new = tl.maximum(m, lse)
                    alpha = tl.math.exp2(m - m_new)
                    w = tl.math.exp2(lse - m_new)
                    l_sum = l_sum * alpha + w
                    acc = acc * alpha[:, None] + part * w[:, None]
                    m = m_new
                tl.store(o_ptr + rows[:, None] * D + d[None, :], (acc / l_sum[:, None]).to(o_ptr.dtype.element_ty),
                         mask=real[:, None])
    elif split == 0:  # an empty row attends to nothing: zeros, as decode_attention_torch defines it
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        rows = b * N_HEADS + kv * GROUP + g
        tl.store(o_ptr + rows[:, None] * D + d[None, :], tl.zeros([GROUP_PAD, D], o_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None])


_TICKETS: dict = {}  # (kernel, device) -> int32 tickets of a "last program finishes" launch, zero between calls


def _tickets(n: int, device, kernel: str = "attention") -> torch.Tensor:
    """At least ``n`` zeroed int32 tickets of ``kernel``'s on ``device``, kept across calls (every call leaves
    them at zero, so a CUDA graph can bake their address). Calls on one stream only: two launches of the
    kernel running concurrently on two streams would share them."""
    have = _TICKETS.get((kernel, device))
    if have is None or have.numel() < n:
        _TICKETS[kernel, device] = have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


def decode_attention_torch(q, k_cache, v_cache, lengths, scale: float | None = None):
    """``q [B, n_heads, D]`` attends to the first ``lengths[b]`` positions of its cache row
    ``k_cache[b], v_cache[b]`` (each ``[n_kv, max_len, D]``); returns ``[B, n_heads, D]``. Rows with
    length 0 return zeros."""
    B, n_heads, D = q.shape
    n_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k = k_cache[:B].float().repeat_interleave(n_heads // n_kv, dim=1)  # [B, H, S, D]
    v = v_cache[:B].float().repeat_interleave(n_heads // n_kv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    mask = torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhs,bhsd->bhd", probs, v).to(q.dtype)


# Launch settings of decode_attention; the engine benchmark's attention part sweeps them (docs/engine.md).
ATTENTION_DEFAULTS = dict(block_n=32, num_warps=4, num_stages=3, target_programs=264, min_split=256)


def attention_splits(batch: int, n_kv: int, max_len: int, block_n: int = 32, target_programs: int = 264,
                     min_split: int = 256) -> int:
    """Keys per split program: enough splits that (batch x KV heads x splits) reaches about
    ``target_programs`` (264 = 2 per SM of an H100/H200), none shorter than ``min_split`` keys (a short
    context is one split: no merge)."""
    splits = max(1, min(math.ceil(target_programs / (batch * n_kv)), math.ceil(max_len / min_split)))
    return triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n


def decode_attention(q, k_cache, v_cache, lengths, scale: float | None = None, split: int | None = None,
                     out: torch.Tensor | None = None, **settings):
    """Fused :func:`decode_attention_torch`. ``split`` keys per program (default by
    :func:`attention_splits`); one launch either way (with several splits the last one merges).
    ``settings`` override ATTENTION_DEFAULTS (block_n, num_warps, num_stages, target_programs, min_split)."""
    if not use_triton(q):
        return decode_attention_torch(q, k_cache, v_cache, lengths, scale)
    cfg = dict(ATTENTION_DEFAULTS, **settings)
    B, n_heads, D = q.shape
    n_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    scale = D ** -0.5 if scale is None else scale
    split = split or attention_splits(B, n_kv, max_len, cfg["block_n"], cfg["target_programs"], cfg["min_split"])
    n_splits = triton.cdiv(max_len, split)
    out = torch.empty_like(q) if out is None else out
    single = n_splits == 1
    if single:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty(B * n_heads * n_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B * n_heads * n_splits, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(B, n_kv, n_splits)](
        q, k_cache, v_cache, lengths, out, part_o, part_lse, _tickets(B * n_kv, q.device), scale, n_heads, n_kv,
        n_splits, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, SPLIT=split, BLOCK_N=cfg["block_n"], SINGLE=single,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_flags(q))
    return out


# ---- router: logits, softmax, top-k ------------------------------------------------------------------

@triton.jit
def _store_shared(ids_ptr, gates_ptr, row_start, E, mask, TOP_K: tl.constexpr, SHARED: tl.constexpr):
    """Columns TOP_K .. TOP_K+SHARED-1 of the rows starting at ``row_start`` (a scalar or a vector):
    experts E, E+1, ... with gate 1, a shared expert held among the experts (add_rmsnorm_router)."""
    for j in tl.static_range(SHARED):
        at = row_start + TOP_K + j
        tl.store(ids_ptr + at, (at * 0 + E + j).to(ids_ptr.dtype.element_ty), mask=mask)
        tl.store(gates_ptr + at, (at * 0 + 1).to(gates_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _router_kernel(x_ptr, w_ptr, ids_ptr, weights_ptr, T, H, E, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                   RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                   SHARED: tl.constexpr = 0, PDL: tl.constexpr = False):
    wait_for_predecessor(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_PAD)
    logits = tl.zeros([BLOCK_T, E_PAD], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t.to(tl.int64)[:, None] * H + k[None, :], mask=(t < T)[:, None] & (k < H)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + e[:, None] * H + k[None, :], mask=(e < E)[:, None] & (k < H)[None, :], other=0.0)
        logits += tl.dot(x, tl.trans(w))
    logits = tl.where((e < E)[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    j_col = tl.arange(0, K_PAD)
    top_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    top_i = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):  # k rounds of arg-max, the lowest id winning ties (as torch.topk)
        best = tl.max(probs, axis=1)
        chosen = tl.min(tl.where(probs == best[:, None], e[None, :], E_PAD), axis=1)
        top_w = tl.where(j_col[None, :] == j, best[:, None], top_w)
        top_i = tl.where(j_col[None, :] == j, chosen[:, None], top_i)
        probs = tl.where(e[None, :] == chosen[:, None], -1.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    row_start = t.to(tl.int64) * (TOP_K + SHARED)  # SHARED more columns: see add_rmsnorm_router
    out = row_start[:, None] + j_col[None, :]
    mask = (t < T)[:, None] & (j_col < TOP_K)[None, :]
    tl.store(ids_ptr + out, top_i.to(ids_ptr.dtype.element_ty), mask=mask)
    tl.store(weights_ptr + out, top_w.to(weights_ptr.dtype.element_ty), mask=mask)
    _store_shared(ids_ptr, weights_ptr, row_start, E, t < T, TOP_K, SHARED)


def router_topk_torch(x, w_router, top_k: int, renormalize: bool):
    """``x [T, H]``, ``w_router [E, H]`` -> ``(ids [T, k] int32, weights [T, k] in x's dtype)``: softmax of
    the logits in float32, the top-k, renormalised to sum 1 when ``renormalize`` (Mixtral)."""
    probs = (x.float() @ w_router.float().T).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids.to(torch.int32), weights.to(x.dtype)


def _with_shared(ids, gates, n_experts: int, shared: int):
    """``ids``, ``gates [T, k]`` with ``shared`` more columns: experts E, E+1, ... with gate 1 (torch path)."""
    if not shared:
        return ids, gates
    T = ids.shape[0]
    extra = torch.arange(n_experts, n_experts + shared, dtype=ids.dtype, device=ids.device).expand(T, -1)
    return torch.cat([ids, extra], 1), torch.cat([gates, gates.new_ones(T, shared)], 1)


def router_topk(x, w_router, top_k: int, renormalize: bool, shared: int = 0):
    """Fused :func:`router_topk_torch`: one launch over blocks of 16 tokens (logits accumulated in float32).
    ``shared``: that many more columns, experts E, E+1, ... with gate 1 (see add_rmsnorm_router)."""
    E = w_router.shape[0]
    if not use_triton(x):
        return _with_shared(*router_topk_torch(x, w_router, top_k, renormalize), E, shared)
    T, H = x.shape
    ids = torch.empty(T, top_k + shared, dtype=torch.int32, device=x.device)
    weights = torch.empty(T, top_k + shared, dtype=x.dtype, device=x.device)
    if T:
        block_t = 16
        _router_kernel[(triton.cdiv(T, block_t),)](
            x, w_router, ids, weights, T, H, E, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize, BLOCK_T=block_t, E_PAD=max(16, triton.next_power_of_2(E)),
            BLOCK_K=min(128, max(16, triton.next_power_of_2(H))), SHARED=shared, num_warps=4,
            **launch_flags(x))
    return ids, weights


# ---- residual add + RMSNorm + router, one launch (decode) ----------------------------------------------

@triton.jit
def _topk_store(logits, row, ids_ptr, gates_ptr, E, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                RENORMALIZE: tl.constexpr, E_PAD: tl.constexpr, SHARED: tl.constexpr):
    """Softmax of one token's ``logits [E_PAD]`` (-inf past E), its top-k (the lowest id winning ties, as
    torch.topk), renormalised when asked, stored as row ``row`` of ids and gates with SHARED more columns."""
    e_all = tl.arange(0, E_PAD)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    j_col = tl.arange(0, K_PAD)
    top_w = tl.zeros([K_PAD], tl.float32)
    top_i = tl.zeros([K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=0)
        chosen = tl.min(tl.where(probs == best, e_all, E_PAD), axis=0)
        top_w = tl.where(j_col == j, best, top_w)
        top_i = tl.where(j_col == j, chosen, top_i)
        probs = tl.where(e_all == chosen, -1.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)
    # SHARED more columns after the top-k: experts E, E+1, ... with gate 1 (see add_rmsnorm_router)
    row_start = row * (TOP_K + SHARED)
    tl.store(ids_ptr + row_start + j_col, top_i.to(ids_ptr.dtype.element_ty), mask=j_col < TOP_K)
    tl.store(gates_ptr + row_start + j_col, top_w.to(gates_ptr.dtype.element_ty), mask=j_col < TOP_K)
    _store_shared(ids_ptr, gates_ptr, row_start, E, row_start >= 0, TOP_K, SHARED)  # one row: all true


@triton.jit
def _add_rmsnorm_router_kernel(resid_ptr, delta_ptr, w_ptr, out_ptr, wr_ptr, ids_ptr, gates_ptr, logits_ptr,
                               count_ptr, H, E, eps, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                               RENORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr, E_PAD: tl.constexpr,
                               E_CHUNK: tl.constexpr, E_SPLIT: tl.constexpr, SHARED: tl.constexpr = 0,
                               PDL: tl.constexpr = False):
    """Program (token ``row``, ``split``): the residual add and norm of the token (every split computes
    them: 2 x H elements from L2), then the router logits of experts [split * E_SPLIT, (split + 1) *
    E_SPLIT). With one split the program goes on to the softmax and top-k; with several, each writes its
    logits and the last to take the token's ticket (reset for the next call) reads them all back, stores
    the residual and the normed row (after every split has read the old residual) and picks the top-k."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    ONE: tl.constexpr = E_SPLIT >= E_PAD
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    e_first = split * E_SPLIT
    # the router's weights depend on no earlier kernel: the first chunk's load is issued before the
    # wait and the norm, and each later chunk's before the chunk before it is used
    e = e_first + tl.arange(0, E_CHUNK)
    wr = tl.load(wr_ptr + e[:, None] * H + cols[None, :], mask=(e < E)[:, None] & mask[None, :], other=0.0)
    wait_for_predecessor(PDL)
    x = (tl.load(resid_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
         + tl.load(delta_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32))
    x = x.to(resid_ptr.dtype.element_ty)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty)
    y = (normed * tl.load(w_ptr + cols, mask=mask, other=0.0)).to(out_ptr.dtype.element_ty)
    if ONE:
        tl.store(resid_ptr + row * H + cols, x, mask=mask)
        tl.store(out_ptr + row * H + cols, y, mask=mask)
    yf = y.to(tl.float32)  # the router reads the rounded output, as an unfused model's router does
    e_all = tl.arange(0, E_PAD)
    logits = tl.full([E_PAD], float("-inf"), tl.float32)
    for c0 in range(0, E_SPLIT, E_CHUNK):
        e = e_first + c0 + tl.arange(0, E_CHUNK)
        e_next = e + E_CHUNK
        wr_next = tl.load(wr_ptr + e_next[:, None] * H + cols[None, :],
                          mask=((e_next < E) & (c0 + E_CHUNK < E_SPLIT))[:, None] & mask[None, :], other=0.0)
        part = tl.sum(wr.to(tl.float32) * yf[None, :], axis=1)  # [E_CHUNK]
        if ONE:
            placed = tl.sum(tl.where(e_all[:, None] == e[None, :], part[None, :], 0.0), axis=1)  # [E_PAD]
            logits = tl.where((e_all >= c0) & (e_all < c0 + E_CHUNK) & (e_all < E), placed, logits)  # split 0
        else:
            tl.store(logits_ptr + row * E_PAD + e, part, mask=e < E)
        wr = wr_next
    if ONE:
        _topk_store(logits, row, ids_ptr, gates_ptr, E, TOP_K, K_PAD, RENORMALIZE, E_PAD, SHARED)
    else:
        tl.debug_barrier()  # every thread's logits are written (and the residual read) before the ticket
        ticket = tl.atomic_add(count_ptr + row, 1)  # acq_rel, GPU scope
        if ticket == tl.num_programs(1) - 1:
            tl.store(count_ptr + row, 0)
            tl.store(resid_ptr + row * H + cols, x, mask=mask)
            tl.store(out_ptr + row * H + cols, y, mask=mask)
            logits = tl.load(logits_ptr + row * E_PAD + e_all, mask=e_all < E, other=float("-inf"),
                             cache_modifier=".cg")
            _topk_store(logits, row, ids_ptr, gates_ptr, E, TOP_K, K_PAD, RENORMALIZE, E_PAD, SHARED)


# The fused launch splits a token's router over programs of ROUTER_EXPERTS_PER_PROGRAM experts (the last of
# a token's programs picks its top-k) and runs for up to FUSED_ROUTER_MAX_PROGRAMS programs; beyond, the
# tiled router (one weight read per 16 tokens) after add_rmsnorm. One NVIDIA H100, graph-replayed
# (benchmarks/engine/router_probe.py, benchmarks/engine/h100-2026-12-05-z): Mixtral's 8 x 4096 router in one
# program a token 3.6-4.2 us at 1-128 tokens against 11.0-11.7 us for the two launches (splitting it gains
# nothing); DeepSeek-V2-Lite's 64 x 2048 in one program 10.7-11.1 us against 10.2-10.3, in programs of 8
# experts 5.1 / 5.3 / 6.2 us at 1 / 8 / 32 tokens, 11.1 at 128 (1024 programs; two launches 10.3). In the
# 64-expert model's decode step: 2.630 ms at batch 1 against 2.841 for the two launches, 7.04 / 11.49 ms at
# batch 8 / 32 against 7.25 / 11.64 (programs of 4: the same; of 16: 2.670 ms; of 32: 2.698).
ROUTER_EXPERTS_PER_PROGRAM = 8
FUSED_ROUTER_MAX_PROGRAMS = 256


def add_rmsnorm_router(resid, delta, weight, eps: float, w_router, top_k: int, renormalize: bool,
                       shared: int = 0):
    """``add_rmsnorm`` then ``router_topk`` on its output: returns ``(normed [T, H], ids [T, k + shared]
    int32, gates [T, k + shared])``, where the last ``shared`` columns name experts E, E+1, ... with
    gate 1 (a shared expert held as extra experts, see ``model.Layer.n_shared``). One launch of up to
    FUSED_ROUTER_MAX_PROGRAMS programs; otherwise ``add_rmsnorm`` and ``router_topk``."""
    T = resid.shape[0]
    if not use_triton(resid) or T * router_splits(w_router.shape[0]) > FUSED_ROUTER_MAX_PROGRAMS:
        x = add_rmsnorm(resid, delta, weight, eps)
        return (x, *router_topk(x, w_router, top_k, renormalize, shared=shared))
    return _add_rmsnorm_router_fused(resid, delta, weight, eps, w_router, top_k, renormalize, shared)


def router_splits(n_experts: int, experts_per_program: int | None = None) -> int:
    """Programs a token of the fused norm + router: ``n_experts`` in programs of ``experts_per_program``
    (default ROUTER_EXPERTS_PER_PROGRAM; a power of two)."""
    return triton.cdiv(n_experts, experts_per_program or ROUTER_EXPERTS_PER_PROGRAM)


def _add_rmsnorm_router_fused(resid, delta, weight, eps, w_router, top_k, renormalize, shared=0,
                              experts_per_program: int | None = None):
    """The one-launch form of add_rmsnorm_router, whatever the sizes (the GPU's): grid (tokens, splits
    of ``experts_per_program`` experts, default ROUTER_EXPERTS_PER_PROGRAM, a power of two)."""
    T, H = resid.shape
    E = w_router.shape[0]
    out = torch.empty_like(resid)
    ids = torch.empty(T, top_k + shared, dtype=torch.int32, device=resid.device)
    gates = torch.empty(T, top_k + shared, dtype=resid.dtype, device=resid.device)
    if T:
        block = triton.next_power_of_2(H)
        e_pad = triton.next_power_of_2(E)
        e_split = min(e_pad, experts_per_program or ROUTER_EXPERTS_PER_PROGRAM)
        splits = router_splits(E, e_split)
        logits = torch.empty(T if splits > 1 else 1, e_pad, dtype=torch.float32, device=resid.device)
        _add_rmsnorm_router_kernel[(T, splits)](
            resid, delta, weight, out, w_router, ids, gates, logits, _tickets(T, resid.device, "router"), H, E, eps,
            TOP_K=top_k,
            K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize, BLOCK_H=block, E_PAD=e_pad,
            E_CHUNK=min(e_split, max(1, 16384 // block)), E_SPLIT=e_split, SHARED=shared,
            num_warps=max(1, min(16, block // 256)), **launch_flags(resid))
    return out, ids, gates
