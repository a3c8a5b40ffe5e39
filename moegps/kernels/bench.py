"""Benchmark (and tuner) of the fused MoE kernels on a GPU.

    python -m moegps.kernels.bench [--quick] [--tune] [--out DIR] [--tokens 1 32 ...]
                                   [--fused] [--skip loop default]

For each shape (Mixtral-8x7B experts: E=8, H=4096, F=14336, top-2; fine-grained: E=64, H=2048,
F=1408, top-6) and token count, with bf16 inputs and random top-k routing, it times (median of
device events after warm-up, `triton.testing.do_bench`'s loop; L2 flushed before each run, by
do_bench's zero-fill or, with `--flush clean`, by a read that leaves no dirty lines: see FLUSH):
  ours      fused_moe with the tuned config, replayed from a CUDA graph (routing metadata,
            both GEMMs and the k-way combine all inside), and the same launched eagerly
  default   fused_moe with the default config for unseen shapes (graph)
  gmm       torch._grouped_mm pipeline: sort by expert, gather, grouped GEMM, SiLU*up, grouped
            GEMM, gate weights, un-permute and ours' k-way combine kernel (graph)
  loop      the torch per-expert loop (reference.py, bf16; eager: it syncs per expert)
two references that are not MoE pipelines, for what the hardware gives at this size:
  bmm       cuBLAS's batched GEMM of the two projections alone over the active experts with
            equal rows each (balanced routing; no gather, SiLU, gate weights or combine; graph)
  read      a plain read (torch sum) of as many bytes as the active experts' weights
and, for the scan and sorted paths, `gemms`: ours without the routing metadata and the combine
(its two GEMM launches on routing computed once; graph). And the floor: max(active-expert
weight bytes / measured copy rate, FLOPs / measured 8192^3 bf16 matmul rate), both measured in
the row, in the same rounds as its methods (time_interleaved: each round runs every method once,
so a drift of the GPU's clocks reaches all alike). Percent of floor = floor / time.
`--fused` adds the one-launch decode path (`fused`, NOTES.md v4): each of its tiles
(FUSED_TILES) is timed whole (graph) and checked, and the row reports the best as `fused_us`
beside `ours_us` (whatever path the tuned or shipped config takes).
Every output is checked against an fp32 reference (relative error). `--tune` first searches a
small config space per (shape, token count), compiling candidates in parallel processes, and
writes configs/<device>.json (also to --out). Results: a printed table, CSV, JSON and a plot (plot.py) in --out.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"mixtral": (8, 4096, 14336, 2), "fine64": (64, 2048, 1408, 6)}  # E, H, F, k
TOKENS = [1, 8, 32, 128, 512, 2048, 8192, 16384]
QUICK_TOKENS = [1, 32, 512, 16384]
# (block_n, block_k, num_warps, num_stages) candidates per path; each GEMM picks its own
# Elements after the fourth name variants (in VARIANTS order): "paired" (gate/up only: one dot
# of twice the width, PAIRED), "tma" (sorted path: weights through tensor descriptors); both: the
# gate and up tiles in one stacked copy.
SCAN_TILES = [(32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 2), (128, 128, 8, 3),
              (64, 128, 4, 4, "paired"), (32, 256, 4, 3, "paired")]
SORTED_TILES = [(64, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                (128, 64, 8, 5), (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4),
                (64, 64, 8, 4), (64, 128, 4, 4, "paired"), (128, 64, 8, 3, "paired"),
                (128, 64, 8, 4, "paired"), (64, 64, 8, 4, "paired"), (64, 128, 8, 3, "paired"),
                (64, 128, 4, 4, "tma"), (128, 64, 8, 3, "tma"), (128, 64, 8, 4, "tma"),
                (128, 128, 8, 3, "tma"), (256, 64, 8, 3, "tma"), (256, 64, 8, 4, "tma"),
                (128, 64, 4, 2, "tma"), (128, 64, 4, 3, "tma"), (256, 64, 4, 2, "tma"),
                (64, 64, 8, 3, "tma"), (64, 128, 8, 3, "tma"),
                # gate/up only: the gate and up tiles in one stacked copy, one dot of 2 x block_n
                (128, 64, 8, 4, "paired", "tma"), (128, 64, 8, 3, "paired", "tma"),
                (64, 64, 8, 4, "paired", "tma"), (64, 128, 8, 3, "paired", "tma"),
                (64, 128, 4, 4, "paired", "tma")]
# fused path: (block_f, block_k, block_n, num_warps, num_stages[, variant]); 64 experts at T=1
# with block_f 64 is 6 slots x 22 F tiles = 132 programs, one per H100 SM
FUSED_TILES = [(64, 128, 128, 4, 3), (64, 128, 64, 4, 4), (64, 256, 128, 8, 2),
               (32, 256, 128, 4, 3), (32, 128, 256, 4, 3), (128, 64, 64, 4, 3),
               (128, 64, 128, 8, 3), (16, 256, 256, 4, 3), (64, 128, 128, 4, 3, "paired"),
               (32, 256, 128, 4, 3, "paired"), (64, 64, 128, 4, 4, "tma"),
               (64, 64, 128, 4, 6, "tma"), (64, 128, 128, 4, 3, "tma"), (32, 64, 128, 4, 6, "tma"),
               (32, 128, 64, 4, 4, "tma"), (64, 64, 64, 4, 6, "tma"), (128, 64, 64, 4, 4, "tma"),
               (64, 64, 128, 8, 5, "tma"), (64, 128, 128, 4, 3, "paired", "tma"),
               (64, 64, 128, 4, 4, "paired", "tma")]
# GROUP_M the tuner tries for the sorted path's best tiles: how many row blocks walk the N tiles
# together. When one group takes every block, an expert's blocks never straddle two groups, whose
# sweeps would each read its weights from DRAM: Mixtral at 512 tokens (~12 blocks), gate/up 8%
# and down 4.5% faster with 16 than with 8 (NOTES.md, session 6 probe).
GROUP_MS = (8, 16, 32)
# the tuner tries the fused path up to this many (token, slot) pairs (64 experts T=8: 48)
FUSED_MAX_PAIRS = 64
VARIANTS = ("paired", "tma")  # tile flags, in the order candidate tuples name them


def variants(d: dict) -> tuple:
    """The variant names a tile dict sets, in candidate-tuple order."""
    return tuple(v for v in VARIANTS if d.get(v))


def fused_config(t) -> dict:
    return {"path": "fused", "block_m": 16,
            "fused": {"block_f": t[0], "block_k": t[1], "block_n": t[2], "num_warps": t[3],
                      "num_stages": t[4], **dict.fromkeys(t[5:], True)}}


def paired(t) -> bool:
    return "paired" in t[4:]


def tile(t, group_m=8):
    """A GEMM's tile dict from a candidate tuple (block_n, block_k, warps, stages[, variant])."""
    d = {"block_n": t[0], "block_k": t[1], "group_m": group_m, "num_warps": t[2],
         "num_stages": t[3]}
    return dict(d, **dict.fromkeys(t[4:], True))


def tile_tuple(g: dict) -> tuple:
    """The candidate tuple of a GEMM's tile dict (inverse of `tile`)."""
    return (g["block_n"], g["block_k"], g["num_warps"], g["num_stages"]) + variants(g)


def config_tasks(name: str, shape: tuple, config: dict) -> set:
    """The precompile tasks (name, shape, path, block, tile) of one config: its fused tile (the
    inverse of `fused_config`), or its two GEMM tiles."""
    if config["path"] == "fused":
        f = config["fused"]
        t = tuple(f[k] for k in ("block_f", "block_k", "block_n", "num_warps", "num_stages"))
        return {(name, shape, "fused", config_block(config), t + variants(f))}
    return {(name, shape, config["path"], config_block(config), tile_tuple(config[gemm]))
            for gemm in ("gate_up", "down")}


def describe_tile(t: dict | tuple) -> str:
    """'128x64x8x8x4 paired tma': a tile's sizes, then its flags (a dict or a candidate tuple)."""
    values = t.values() if isinstance(t, dict) else t
    flags = [k for k, v in t.items() if v is True] if isinstance(t, dict) else []
    return " ".join(["x".join(str(v) for v in values if isinstance(v, int) and not isinstance(v, bool))]
                    + flags + [v for v in values if isinstance(v, str)])


def describe(config: dict) -> str:
    """One line naming a config's path, block and tiles (the tuner's log)."""
    if config["path"] == "fused":
        return "fused " + describe_tile(config["fused"])
    gemms = " / ".join(describe_tile(config[g]) for g in ("gate_up", "down"))
    return (f"{config['path']} block_m {config['block_m']}"
            f"{' half' if config.get('half_tail') else ''} {gemms}"
            f" combine {config.get('combine', 'sum')}")


def blocks(path: str, rows: float) -> list[tuple[int, bool]]:
    """(BLOCK_M, half_tail) candidates for a path given the mean rows per expert (empty: path
    not tried). Half tails from 64-row blocks up: their half blocks still fill a warp group's
    64-row MMA on Hopper (NOTES.md v10)."""
    if path == "scan":
        return [(16, False)] if rows <= 12 else [(32, False)] if rows <= 24 else []
    if rows < 2:
        return []
    if rows > 512:  # 64 (two CTAs per SM) and 256 never won (NOTES.md v8, v9; 256 at 8192-16384
        bms = [128]     # tokens 3-25% slower in call 25)
    else:
        bms = [16, 32] if rows <= 24 else [32, 64] if rows <= 96 else [64, 128]
    return [(bm, half) for bm in bms for half in ((False, True) if bm >= 64 else (False,))]


def base_config(path: str, block: tuple[int, bool]) -> dict:
    """The routing part of a config: path, block_m and (when set) half_tail."""
    bm, half = block
    return {"path": path, "block_m": bm, **({"half_tail": True} if half else {})}


def config_block(config: dict) -> tuple[int, bool]:
    """(BLOCK_M, half_tail) of a config (inverse of `base_config`'s block)."""
    return config["block_m"], bool(config.get("half_tail", False))


def candidates(n_tokens, n_experts, top_k) -> list[tuple[str, tuple[int, bool], list]]:
    """(path, (BLOCK_M, half_tail), tiles) groups the tuner tries for one (shape, token count)."""
    rows = n_tokens * top_k / n_experts
    fused = [("fused", (16, False), FUSED_TILES)] if n_tokens * top_k <= FUSED_MAX_PAIRS else []
    return fused + [(path, block, tiles)
                    for path, tiles in (("scan", SCAN_TILES), ("sorted", SORTED_TILES))
                    for block in blocks(path, rows)]


# ---------------------------------------------------------------------------------------------
# inputs, baselines, timing


def make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16
    x = torch.randn(n_tokens, hidden, generator=gen, device=device, dtype=bf16)
    w13 = torch.randn(n_experts, 2 * ffn, hidden, generator=gen, device=device, dtype=bf16)
    w13 /= math.sqrt(hidden)
    w2 = torch.randn(n_experts, hidden, ffn, generator=gen, device=device, dtype=bf16)
    w2 /= math.sqrt(ffn)
    return x, w13, w2


def make_routing(n_tokens, n_experts, top_k, seed=0, device="cuda"):
    """Random top-k routing: k distinct uniformly random experts, softmax gate weights (fp32)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    logits = torch.randn(n_tokens, n_experts, generator=gen, device=device)
    vals, ids = logits.topk(top_k, dim=1)
    return ids, torch.softmax(vals, dim=1)


def grouped_mm_moe(x, w13, w2, topk_ids, topk_weights):
    """The torch._grouped_mm pipeline, with the same routing, permutation and combine around it.

    torch._grouped_mm(A [M, K], B [E, K, N], offs=int32 cumulative row ends [E]) -> [M, N]
    (Hopper, bf16, 16-byte aligned strides); B is passed as a transposed view of the weights.
    """
    from moegps.kernels.launch import combine_sum

    n_experts, top_k, ffn = w13.shape[0], topk_ids.shape[1], w2.shape[2]
    flat = topk_ids.reshape(-1)
    sorted_e, order = torch.sort(flat, stable=True)
    offs = torch.searchsorted(sorted_e, torch.arange(n_experts, device=x.device),
                              right=True).to(torch.int32)
    token = order // top_k
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)  # [N, 2F]
    act = F.silu(h[:, :ffn]) * h[:, ffn:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)  # [N, H]
    y = y * topk_weights.reshape(-1)[order, None].to(y.dtype)
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return combine_sum(unsorted, top_k)  # ours' combine, so that the ratio compares the GEMMs


def balanced_bmm(w13, w2, n_active: int, rows: int):
    """The two expert GEMMs as cuBLAS batched GEMMs over `n_active` experts of `rows` rows
    each: [n, rows, H] @ w13[:n]^T -> [n, rows, 2F], then [n, rows, F] @ w2[:n]^T -> [n, rows, H]
    (the weights as transposed views, as grouped_mm_moe passes them). What a dense GEMM library
    reaches on the same per-expert shapes when routing is perfectly balanced and free; the
    down GEMM's input is drawn, not computed, so nothing between the GEMMs is timed."""
    n, hidden, ffn = n_active, w2.shape[1], w2.shape[2]
    a = torch.randn(n, rows, hidden, dtype=w13.dtype, device=w13.device)
    h = torch.randn(n, rows, ffn, dtype=w13.dtype, device=w13.device)
    return lambda: (torch.bmm(a, w13[:n].transpose(1, 2)), torch.bmm(h, w2[:n].transpose(1, 2)))


def gemm_launches(x, w13, w2, ids, weights, config: dict):
    """Ours without the routing metadata and the k-way combine: the two GEMM launches of a scan
    or sorted config on routing computed once, into preallocated buffers."""
    from moegps.kernels.launch import combine_atomic, launch_down, launch_gate_up, route

    n_tokens, top_k = ids.shape
    flat_ids, gates = ids.reshape(-1), weights.reshape(-1)
    routing = route(flat_ids, w13.shape[0], config)
    h = torch.empty(flat_ids.numel(), w2.shape[2], dtype=x.dtype, device=x.device)
    y = (torch.zeros(n_tokens, x.shape[1], dtype=torch.float32, device=x.device)
         if combine_atomic(config, top_k) else
         torch.empty(flat_ids.numel(), x.shape[1], dtype=x.dtype, device=x.device))
    return lambda: (launch_gate_up(x, w13, h, flat_ids, routing, config, top_k),
                    launch_down(h, w2, y, gates, flat_ids, routing, config, top_k))


def capture(fn):
    """A CUDA graph of fn (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# How the L2 is emptied before each timed run. "zero" is triton.testing.do_bench's way (and
# the issue's baselines'): zero-fill a 256 MB buffer, which leaves the 50 MB L2 full of *dirty*
# lines, so the timed call also pays for writing some of them back to DRAM as its own reads
# evict them (measured on an H100 by --flush-control: ~9.5 us on a 104-704 MB read, a quarter of
# a 35 us decode call's floor). "clean" reads the buffer instead
# (a sum): the L2 is as cold, but clean, and the call pays only for its own bytes. The
# benchmark's `--flush` picks one for every timing of a run, the floor's rates included.
FLUSH = "zero"
_FLUSH_BUFFER: list = []


def _flush_l2() -> None:
    if not _FLUSH_BUFFER:
        _FLUSH_BUFFER.append(torch.ones(256 * 2**20 // 4, dtype=torch.int32, device="cuda"))
    buf = _FLUSH_BUFFER[0]
    if FLUSH == "zero":
        buf.zero_()
    elif FLUSH == "clean":
        buf.sum()
    elif FLUSH != "none":
        raise ValueError(f"flush must be 'zero', 'clean' or 'none', got {FLUSH!r}")


MIN_RUNS = 20  # timed runs at least, also for calls longer than rep_ms / MIN_RUNS


def time_interleaved(fns: dict, warmup_ms=25, rep_ms=100) -> dict:
    """{name: median device time in us} of several callables timed in rounds, each round
    running every one once (L2 flushed before each, FLUSH), so that a drift of the GPU's clock
    within the row reaches all of them alike. One after the other, two identical 17 ms
    configs read 15% apart on an H100 (power and heat; NOTES.md session 6). Per callable,
    do_bench's loop (estimate, warm up, then flush + events around each run; median) with at
    least 3 warm-up and MIN_RUNS timed runs: do_bench's time budget alone leaves a 19 ms call
    (Mixtral, 16384 tokens) 1 warm-up and 5 samples, whose median moved 3-5% between runs
    (NOTES.md v11)."""
    estimate_ms = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            _flush_l2()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms[name] = max(start.elapsed_time(end) / 5, 1e-3)
    for name, fn in fns.items():
        for _ in range(max(3, int(warmup_ms / estimate_ms[name]))):
            fn()
    runs = {name: max(MIN_RUNS, int(rep_ms / est)) for name, est in estimate_ms.items()}
    events = {name: [] for name in fns}
    for i in range(max(runs.values())):
        for name, fn in fns.items():
            if i < runs[name]:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                _flush_l2()
                s.record()
                fn()
                e.record()
                events[name].append((s, e))
    torch.cuda.synchronize()
    medians = {}
    for name, pairs in events.items():
        times = sorted(s.elapsed_time(e) for s, e in pairs)
        medians[name] = times[len(times) // 2] * 1e3
    return medians


def time_us(fn, graph=False, warmup=25, rep=100) -> float:
    """Median device time of fn in microseconds (events; L2 flushed before each run, FLUSH)."""
    return time_many({"fn": fn}, graph={"fn"} if graph else (), warmup=warmup, rep=rep)["fn"]


def time_many(fns: dict, graph=(), warmup=25, rep=100) -> dict:
    """`time_interleaved` of fns, those named in `graph` replayed from a CUDA graph each (timed
    eagerly where capture fails)."""
    timed = dict(fns)
    graphs = []
    for name in graph:
        try:
            graphs.append(capture(fns[name]))
            timed[name] = graphs[-1].replay
        except Exception as exc:  # not capturable here: time it eagerly instead
            print(f"  (graph capture of {name} failed, timing eagerly: "
                  f"{type(exc).__name__}: {exc})")
    return time_interleaved(timed, warmup, rep)  # the graphs live until it returns


def flush_control(sizes_mb=(32, 104, 704)) -> list[dict]:
    """The cost of the flush itself: a plain read of N MB (torch sum, fp32 accumulation) after
    each way of flushing. The difference between "zero" and "clean" is the write-back of the
    zero-fill's dirty lines, paid by whatever runs first after it."""
    global FLUSH
    saved, rows = FLUSH, []
    for mb in sizes_mb:
        w = torch.randn(mb * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
        row = {"read_MB": mb}
        for mode in ("zero", "clean", "none"):
            FLUSH = mode
            row[f"{mode}_us"] = time_us(lambda: w.sum(dtype=torch.float32))
        row["zero_minus_clean_us"] = row["zero_us"] - row["clean_us"]
        rows.append(row)
        del w
    FLUSH = saved
    return rows


def ceiling_runs() -> dict:
    """The runs that measure the floor's rates: a 1 GiB bf16 copy and an 8192^3 bf16 matmul
    (timed beside the row's methods by `time_many`, see `rates`)."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    n = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return {"copy": lambda: b.copy_(a), "matmul": lambda: m @ n}


def rates(times_us: dict) -> dict:
    """Copy rate (bytes read + written per s) and matmul rate (FLOP/s) from ceiling_runs' times."""
    return {"copy_Bps": 2 * 2**29 * 2 / (times_us["copy"] * 1e-6),
            "matmul_flops": 2 * 8192**3 / (times_us["matmul"] * 1e-6)}


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def align_times(shapes, tokens, seed=0) -> list[dict]:
    """Routing metadata alone (CUDA graph), by method: the one-launch walk and the chunked
    launches, at BLOCK_M 128 with half tails (the large-batch config); the auto choice is the
    faster below and above routing.ONE_LAUNCH_CHUNKS scan chunks."""
    from moegps.kernels.routing import SCAN, align

    rows = []
    for name, (n_experts, _, _, top_k) in shapes.items():
        for n_tokens in tokens:
            ids, _ = make_routing(n_tokens, n_experts, top_k, seed)
            row = {"shape": name, "tokens": n_tokens,
                   "chunks": -(-n_tokens * top_k // SCAN)}
            for method in ("one", "chunked"):
                def run(ids=ids, n_experts=n_experts, method=method):
                    align(ids, n_experts, 128, half_tail=True, method=method)

                row[f"{method}_us"] = time_us(run, graph=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# tuning


def _compile_task(task):
    """Pool worker: compile one (path, (BLOCK_M, half_tail), tile) for each GEMM by running it on
    small inputs. Returns the task and, per GEMM, None or the error (a tile that does not fit is
    skipped)."""
    name, (n_experts, hidden, ffn, top_k), path, block, t = task
    import torch as th

    from moegps.kernels.launch import fused_moe, launch_down, launch_gate_up, route

    w13 = th.empty(n_experts, 2 * ffn, hidden, dtype=th.bfloat16, device="cuda").normal_()
    w2 = th.empty(n_experts, hidden, ffn, dtype=th.bfloat16, device="cuda").normal_()
    x = th.randn(16, hidden, dtype=th.bfloat16, device="cuda")
    if path == "fused":  # one kernel
        ids = th.randint(0, n_experts, (16, top_k), device="cuda")
        try:
            fused_moe(x, w13, w2, ids, th.rand(16, top_k, device="cuda"), config=fused_config(t))
            th.cuda.synchronize()
            return task, [None]
        except Exception as exc:
            return task, [f"{type(exc).__name__}: {str(exc)[:120]}"]
    config = dict(base_config(path, block), gate_up=tile(t), down=tile(t))
    ids = th.randint(0, n_experts, (16 * top_k,), device="cuda")
    h = th.randn(16 * top_k, ffn, dtype=th.bfloat16, device="cuda")
    y = th.empty(16 * top_k, hidden, dtype=th.bfloat16, device="cuda")
    routing = route(ids, n_experts, config)
    gates = th.rand(16 * top_k, device="cuda")
    acc = th.zeros(16, hidden, device="cuda")
    errors = []
    for run in (lambda: launch_gate_up(x, w13, h, ids, routing, config, top_k),
                lambda: launch_down(h, w2, y, gates, ids, routing, config, top_k),
                # the atomic-combine variant of TMA down tiles (the large-batch winners; others
                # compile when the tuner first times them)
                lambda: "tma" in t and launch_down(h, w2, acc, gates, ids, routing,
                                                   dict(config, combine="atomic"), top_k)):
        try:
            run()
            th.cuda.synchronize()
            errors.append(None)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
    return task, errors


def precompile(tasks, workers):
    """Compile in parallel processes (Triton's disk cache then serves the main process), with the
    GPU edge-case checks running beside them. Returns {(name, path, block, tile, gemm): error}."""
    import multiprocessing as mp

    failed = {}
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        check = pool.apply_async(check_edge_cases)
        for (name, _, path, block, t), errors in pool.imap_unordered(_compile_task, tasks):
            gemms = ("fused",) if path == "fused" else ("gate_up", "down", "down_atomic")
            for gemm, err in zip(gemms, errors):
                if err:
                    failed[(name, path, block, t, gemm)] = err
        failures = check.get()
    print(f"precompiled {len(tasks)} (path, block, tile) tasks in {time.time() - t0:.0f} s;"
          f" {len(failed)} kernels do not fit (skipped)", flush=True)
    print("edge cases:", "all ok" if not failures else f"FAILED {failures}", flush=True)
    return failed


def tune_one(name, shape, n_tokens, failed, seed=0) -> dict:
    """Best config for one (shape, tokens): each GEMM's tile timed alone per (path, block), then
    the best pair timed whole (routing + both GEMMs + combine, CUDA graph) with each combine
    (the k-way combine kernel, atomics in the down GEMM); each fused tile (decode) timed whole."""
    from moegps.kernels.launch import fused_moe, launch_down, launch_gate_up, route

    n_experts, hidden, ffn, top_k = shape
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    ids, weights = make_routing(n_tokens, n_experts, top_k, seed)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    n_pairs = n_tokens * top_k
    h = torch.empty(n_pairs, ffn, dtype=x.dtype, device="cuda")
    y = torch.empty(n_pairs, hidden, dtype=x.dtype, device="cuda")
    whole = []  # the whole-call candidates, timed together at the end

    for path, block, tiles in candidates(n_tokens, n_experts, top_k):
        if path == "fused":
            whole += [fused_config(t) for t in tiles
                      if (name, path, block, t, "fused") not in failed]
            continue
        gu_tiles = [t for t in tiles if (name, path, block, t, "gate_up") not in failed]
        dn_tiles = [t for t in tiles
                    if not paired(t) and (name, path, block, t, "down") not in failed]
        if not gu_tiles or not dn_tiles:
            continue
        base = base_config(path, block)
        routing = route(flat_ids, n_experts, base)

        def gate_up_run(d, base=base, routing=routing):
            cfg = dict(base, gate_up=d)
            return lambda: launch_gate_up(x, w13, h, flat_ids, routing, cfg, top_k)

        def down_run(d, base=base, routing=routing):
            cfg = dict(base, down=d)
            return lambda: launch_down(h, w2, y, flat_w, flat_ids, routing, cfg, top_k)

        def best_tile(tiles, run, gemm):
            """The fastest tile (a dict), then for the sorted path its best GROUP_M."""
            us = time_many({t: run(tile(t)) for t in tiles}, warmup=5, rep=25)
            best3 = sorted(us, key=us.get)[:3]  # the log: the three fastest
            print(f"    {path} {block} {gemm}: "
                  + ", ".join(f"{describe_tile(t)} {us[t]:.1f}" for t in best3), flush=True)
            if path != "sorted":  # the scan path's grid has no row-block order
                return tile(best3[0])
            us = time_many({g: run(tile(best3[0], group_m=g)) for g in GROUP_MS},
                           warmup=5, rep=25)
            print(f"    {path} {block} {gemm} group_m: "
                  + ", ".join(f"{g} {us[g]:.1f}" for g in GROUP_MS), flush=True)
            return tile(best3[0], group_m=min(us, key=us.get))

        gu = best_tile(gu_tiles, gate_up_run, "gate_up")
        # also leaves real values in h for the down GEMM
        launch_gate_up(x, w13, h, flat_ids, routing, dict(base, gate_up=gu), top_k)
        dn = best_tile(dn_tiles, down_run, "down")
        for combine in ("sum", "atomic") if top_k > 1 else ("sum",):
            whole.append(dict(base, gate_up=gu, down=dn,
                              **({"combine": "atomic"} if combine == "atomic" else {})))
    runs = {}
    for i, config in enumerate(whole):
        run = functools.partial(fused_moe, x, w13, w2, ids, weights, config=config)
        try:
            run()
            torch.cuda.synchronize()
            runs[i] = run
        except Exception as exc:  # a variant that does not compile here is skipped
            print(f"  skipped {config}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    us = time_many(runs, graph=set(runs), warmup=5, rep=40)
    for i in runs:
        print(f"    whole call {us[i]:9.1f} us: {describe(whole[i])}", flush=True)
    best = min(us, key=us.get)
    config = dict(whole[best], us=round(us[best], 2))
    print(f"  tuned {name} T={n_tokens}: {config}", flush=True)
    return config


def tune(shapes, tokens, out_dir: Path, workers: int, command: str, seed: int = 0) -> Path:
    from moegps.kernels import launch

    tasks = set()
    for name, shape in shapes.items():
        for n_tokens in tokens:
            for path, block, tiles in candidates(n_tokens, shape[0], shape[3]):
                tasks.update((name, shape, path, block, t) for t in tiles)
            tasks |= config_tasks(name, shape, launch.default_config(n_tokens, *shape))
    failed = precompile(sorted(tasks, key=str), workers)
    # Merged into the device's file: token counts not tuned now keep their entries.
    path = launch.CONFIG_DIR / f"{launch.device_name()}.json"
    table = json.loads(path.read_text()) if path.exists() else {"shapes": {}}
    table.update({"device": launch.device_name(), "torch": torch.__version__,
                  "triton": __import__("triton").__version__,
                  "command": command})
    for name, shape in shapes.items():
        by_tokens = table["shapes"].setdefault(launch.shape_key(*shape), {})
        # each entry names the command that tuned it (the file merges several runs)
        by_tokens.update({str(t): dict(tune_one(name, shape, t, failed, seed), tuned_by=command)
                          for t in tokens})
        table["shapes"][launch.shape_key(*shape)] = dict(sorted(by_tokens.items(),
                                                                key=lambda kv: int(kv[0])))
    text = json.dumps(table, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    (out_dir / path.name).write_text(text)
    path.write_text(text)
    launch._tuned_table.cache_clear()
    print(f"wrote {path} and {out_dir / path.name}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# GPU correctness on edge cases (bf16), mirroring the interpreter tests


def check_edge_cases() -> list[str]:
    from moegps.kernels import fused_moe, moe_reference

    tiles = {"gate_up": tile((64, 64, 4, 3)), "down": tile((64, 64, 4, 3))}
    failures = []
    cases = {  # name: (T, E, H, F, k, ids or None)
        "random": (37, 6, 256, 192, 2, None),
        "empty_experts": (21, 7, 256, 192, 2, "empty"),
        "one_expert_all_top1": (45, 5, 256, 192, 1, "all"),
        "top4": (19, 8, 256, 192, 4, None),
        "one_token_top4": (1, 8, 256, 192, 4, None),
        "odd_hidden": (33, 4, 200, 100, 2, None),
        # more pairs than align's one-launch method takes: the chunked launches
        "chunked_align": (2100, 6, 256, 192, 2, None),
        "chunked_align_e64": (800, 64, 256, 192, 6, None),
        # decode sizes of the fused path at the 64-expert shape's ratios (H, F not multiples of 128)
        **{f"decode_T{T}_top6": (T, 64, 320, 176, 6, None) for T in (1, 2, 3, 5, 8)},
        "decode_hot_expert": (8, 16, 320, 176, 4, "hot"),
    }
    configs = {"scan": dict(tiles, path="scan", block_m=16),
               "sorted": dict(tiles, path="sorted", block_m=16),
               "fused": fused_config((64, 64, 64, 4, 3)),
               "fused_tma": fused_config((64, 64, 64, 4, 3, "tma")),
               "scan_atomic": dict(tiles, path="scan", block_m=16, combine="atomic"),
               "sorted_paired": {"path": "sorted", "block_m": 16, "down": tiles["down"],
                                 "gate_up": tile((64, 64, 4, 3, "paired"))},
               "sorted_tma": {"path": "sorted", "block_m": 16, "gate_up": tile((64, 64, 4, 3, "tma")),
                              "down": tile((64, 64, 4, 3, "tma"))},
               # half tails: 16-row (mma.sync) and 64-row (wgmma) half blocks
               "sorted_half": dict(tiles, path="sorted", block_m=32, half_tail=True),
               "sorted_tma_half": {"path": "sorted", "block_m": 128, "half_tail": True,
                                   "gate_up": tile((64, 64, 8, 3, "tma")),
                                   "down": tile((64, 64, 8, 3, "tma"))},
               "sorted_tma_paired": {"path": "sorted", "block_m": 128, "half_tail": True,
                                     "gate_up": tile((64, 64, 8, 3, "paired", "tma")),
                                     "down": tile((64, 64, 8, 3, "tma"))},
               "fused_tma_paired": fused_config((64, 64, 64, 4, 3, "paired", "tma")),
               "sorted_tma_atomic": {"path": "sorted", "block_m": 128, "half_tail": True,
                                     "combine": "atomic", "gate_up": tile((64, 64, 8, 3, "tma")),
                                     "down": tile((64, 64, 8, 3, "tma"))}}
    for (case, (T, E, H, Fd, k, kind)), path in itertools.product(cases.items(), configs):
        if path.startswith("sorted") and case.startswith("decode"):
            continue
        x, w13, w2 = make_inputs(E, H, Fd, k, T, seed=7)
        ids, weights = make_routing(T, E, k, seed=7)
        if kind == "empty":
            ids = torch.tensor([0, 1, 4, 6], device="cuda")[make_routing(T, 4, k, seed=3)[0]]
        if kind == "all":
            ids = torch.full((T, 1), 3, device="cuda")
        if kind == "hot":  # expert 5 in every token's top-k
            ids[:, 0] = torch.where((ids == 5).any(dim=1), ids[:, 0], 5)
        ref = moe_reference(x.double(), w13.double(), w2.double(), ids, weights.double())
        ws = {"h": torch.full((T * k, Fd), float("nan"), dtype=x.dtype, device="cuda"),
              "y": torch.full((T * k, H), float("nan"), dtype=x.dtype, device="cuda"),
              "scratch": torch.full((E * T * k,), -7, dtype=torch.int32, device="cuda")}
        errs, finite = [], True
        try:
            # atomics: a race shows as a spread
            for _ in range(3 if path.startswith("fused") or "atomic" in path else 1):
                out = fused_moe(x, w13, w2, ids, weights, workspace=ws, config=configs[path])
                errs.append(rel_err(out, ref.float()))
                finite = finite and bool(torch.isfinite(out).all())
        except Exception as exc:  # a variant that does not compile here is a failure, not a crash
            print(f"  check {case} {path}: {type(exc).__name__}: {str(exc)[:200]}")
            errs, finite = [float("inf")], False
        err = max(errs)
        ok = finite and err < 1e-2
        print(f"  check {case:22s} {path:13s} rel_err {err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{case}/{path}")
    return failures


# ---------------------------------------------------------------------------------------------
# the benchmark


def bench_fused(row, x, w13, w2, ids, weights, ref, failed, name) -> None:
    """Time every fused tile whole (graph, checked against ref), keep the best in the row."""
    from moegps.kernels import fused_moe

    times = {}
    for t in FUSED_TILES:
        if (name, "fused", (16, False), t, "fused") in failed:
            continue
        cfg = fused_config(t)
        fn = lambda: fused_moe(x, w13, w2, ids, weights, config=cfg)  # noqa: E731
        err = rel_err(fn(), ref)
        times[t] = time_us(fn, graph=True, warmup=10, rep=50)
        print(f"    fused {t}: {times[t]:.1f} us, rel err {err:.1e}", flush=True)
    if not times:
        return
    best = min(times, key=times.get)
    cfg = fused_config(best)
    fn = lambda: fused_moe(x, w13, w2, ids, weights, config=cfg)  # noqa: E731
    row["err_fused"] = max(rel_err(fn(), ref) for _ in range(3))
    row["fused_us"] = time_us(fn, graph=True)  # re-timed at full repetitions
    row["fused_eager_us"] = time_us(fn)
    row["fused_tile"] = "x".join(map(str, best))
    row["pct_floor_fused"] = 100 * row["floor_us"] / row["fused_us"]
    row["fused_vs_ours"] = row["ours_us"] / row["fused_us"]
    row["fused_vs_gmm"] = row["gmm_us"] / row["fused_us"]


def bench_one(name, shape, n_tokens, seed=0, fused=False, skip=(), failed=None) -> dict:
    """One (shape, tokens) row. Its methods, references and the floor's copy and matmul runs are
    timed together in rounds (`time_many`): the 8192^3 matmul rate of one H100 moved between
    702 and 793 TFLOP/s from run to run (its clocks under the power limit; NOTES.md v11), and
    two identical configs timed one after the other read up to 15% apart (session 6), so
    every time and rate in a row is taken under the same clocks."""
    from moegps.kernels import default_config, fused_moe, get_config, moe_reference
    from moegps.kernels.routing import align

    n_experts, hidden, ffn, top_k = shape
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    ids, weights = make_routing(n_tokens, n_experts, top_k, seed)
    config = get_config(n_tokens, n_experts, hidden, ffn, top_k)
    dflt = default_config(n_tokens, n_experts, hidden, ffn, top_k)
    active = int(torch.unique(ids).numel())
    weight_bytes = active * 3 * hidden * ffn * 2
    io_bytes = 2 * n_tokens * hidden * 2
    flops = 2 * n_tokens * top_k * 3 * hidden * ffn
    ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float()).float()
    row = {"shape": name, "E": n_experts, "H": hidden, "F": ffn, "k": top_k, "tokens": n_tokens,
           "active_experts": active, "path": config["path"], "block_m": config["block_m"],
           "half_tail": bool(config.get("half_tail", False))}
    checked = {
        "ours": lambda: fused_moe(x, w13, w2, ids, weights, config=config),
        "default": lambda: fused_moe(x, w13, w2, ids, weights, config=dflt),
        "gmm": lambda: grouped_mm_moe(x, w13, w2, ids, weights),
    }
    timed = {}  # the row's runs timed together, in rounds (time_interleaved)
    for method, fn in checked.items():
        if method in skip:
            continue
        try:
            row[f"err_{method}"] = rel_err(fn(), ref)
            timed[method] = fn
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            print(f"  {method} failed at {name} T={n_tokens}: {type(exc).__name__}: {exc}")
    # parts and references: timed, not checked
    if config["path"] != "fused":
        timed["gemms"] = gemm_launches(x, w13, w2, ids, weights, config)
    if "bmm" not in skip:
        timed["bmm"] = balanced_bmm(w13, w2, active, math.ceil(n_tokens * top_k / active))
    if "read" not in skip:
        weights_copy = torch.empty(weight_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
        timed["read"] = lambda: weights_copy.sum(dtype=torch.float32)
    ceiling = ceiling_runs()
    times = time_many({**ceiling, **timed}, graph=set(timed))
    del ceiling
    for method in ("ours", "default", "gmm", "gemms", "bmm", "read"):
        row[f"{method}_us"] = times.get(method, math.nan)
    rate = rates(times)
    floor_mem = (weight_bytes + io_bytes) / rate["copy_Bps"] * 1e6
    floor_flop = flops / rate["matmul_flops"] * 1e6
    row.update(copy_TBps=rate["copy_Bps"] / 1e12, matmul_TFLOPs=rate["matmul_flops"] / 1e12,
               floor_us=max(floor_mem, floor_flop),
               bound="memory" if floor_mem >= floor_flop else "compute")
    row["loop_us"] = math.nan
    if "loop" not in skip:  # eager (it syncs per expert), alone
        row["err_loop"] = rel_err(moe_reference(x, w13, w2, ids, weights), ref)
        row["loop_us"] = time_us(lambda: moe_reference(x, w13, w2, ids, weights))
    row["ours_eager_us"] = time_us(checked["ours"])
    row["align16_us"] = time_us(lambda: align(ids, n_experts, 16), graph=True)
    row["pct_floor"] = 100 * row["floor_us"] / row["ours_us"]
    row["pct_floor_default"] = 100 * row["floor_us"] / row["default_us"]
    row["pct_floor_gmm"] = 100 * row["floor_us"] / row["gmm_us"]
    row["pct_floor_bmm"] = 100 * row["floor_us"] / row["bmm_us"]
    row["pct_floor_gemms"] = 100 * row["floor_us"] / row["gemms_us"]
    # the read only bounds memory-bound rows (compute-bound ones read far less than they take)
    row["pct_floor_read"] = (100 * row["floor_us"] / row["read_us"]
                             if row["bound"] == "memory" else math.nan)
    row["tflops"] = flops / row["ours_us"] * 1e-6
    row["weight_GBps"] = weight_bytes / row["ours_us"] * 1e-3
    row["vs_loop"] = row["loop_us"] / row["ours_us"]
    row["vs_gmm"] = row["gmm_us"] / row["ours_us"]
    if fused and n_tokens * top_k <= FUSED_MAX_PAIRS:
        bench_fused(row, x, w13, w2, ids, weights, ref, failed or {}, name)
    return row


COLUMNS = [("shape", "{}"), ("tokens", "{}"), ("path", "{}"), ("ours_us", "{:.1f}"),
           ("ours_eager_us", "{:.1f}"), ("floor_us", "{:.1f}"), ("bound", "{}"),
           ("copy_TBps", "{:.2f}"), ("matmul_TFLOPs", "{:.0f}"),
           ("pct_floor", "{:.0f}%"), ("gemms_us", "{:.1f}"), ("pct_floor_gemms", "{:.0f}%"),
           ("default_us", "{:.1f}"), ("pct_floor_default", "{:.0f}%"),
           ("gmm_us", "{:.1f}"), ("pct_floor_gmm", "{:.0f}%"), ("bmm_us", "{:.1f}"),
           ("pct_floor_bmm", "{:.0f}%"), ("read_us", "{:.1f}"), ("pct_floor_read", "{:.0f}%"),
           ("loop_us", "{:.1f}"),
           ("vs_gmm", "{:.2f}x"), ("vs_loop", "{:.2f}x"), ("tflops", "{:.0f}"),
           ("weight_GBps", "{:.0f}"), ("align16_us", "{:.1f}"), ("err_ours", "{:.1e}")]
FUSED_COLUMNS = [("shape", "{}"), ("tokens", "{}"), ("path", "{}"), ("ours_us", "{:.1f}"),
                 ("fused_us", "{:.1f}"), ("fused_eager_us", "{:.1f}"),
                 ("fused_tile", "{}"), ("floor_us", "{:.1f}"), ("pct_floor", "{:.0f}%"),
                 ("pct_floor_fused", "{:.0f}%"), ("gmm_us", "{:.1f}"), ("fused_vs_ours", "{:.2f}x"),
                 ("fused_vs_gmm", "{:.2f}x"), ("err_fused", "{:.1e}")]


def print_table(rows, columns=COLUMNS):
    header = [c for c, _ in columns]
    cells = [[fmt.format(r.get(c, float("nan"))) for c, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS} only")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (overrides --quick)")
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tune", action="store_true", help="tune configs first, write JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and routing")
    parser.add_argument("--fused", action="store_true",
                        help="also time the one-launch fused decode path's tiles (FUSED_TILES) "
                        f"where T*k <= {FUSED_MAX_PAIRS}")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["default", "loop", "gmm", "bmm", "read"],
                        help="baselines and references not to time")
    parser.add_argument("--flush", choices=["zero", "clean"], default="zero",
                        help="L2 flush before each timed run: zero-fill (do_bench's, leaves dirty "
                        "lines) or a read (clean); see FLUSH")
    parser.add_argument("--align", action="store_true",
                        help="first time the routing metadata alone, by method")
    parser.add_argument("--flush-control", action="store_true",
                        help="first time a plain read after each kind of flush")
    # each compile worker holds one shape's weights on the GPU (Mixtral: ~3-9 GB): 16 ran out of memory
    parser.add_argument("--workers", type=int, default=min(6, os.cpu_count() or 1))
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moegps.kernels.bench needs a CUDA GPU (timings come from device events)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    shapes = {s: SHAPES[s] for s in args.shapes}
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}", flush=True)
    global FLUSH
    FLUSH = args.flush
    failed = {}
    if args.tune:
        command = "python -m moegps.kernels.bench " + " ".join(
            sys.argv[1:] if argv is None else argv)
        tune(shapes, tokens, out_dir, args.workers, command, args.seed)  # edge-case checks beside compiles
    else:  # compile the configs the benchmark uses in parallel, checks beside them
        from moegps.kernels import default_config, get_config

        tasks = set()
        for name, shape in shapes.items():
            for n_tokens in tokens:
                for cfg in (get_config(n_tokens, *shape), default_config(n_tokens, *shape)):
                    tasks |= config_tasks(name, shape, cfg)
                if args.fused:
                    tasks.update((name, shape, "fused", (16, False), t) for t in FUSED_TILES)
        failed = precompile(sorted(tasks, key=str), args.workers)
    if args.flush_control:
        control = flush_control()
        print("flush control: a plain read after each kind of L2 flush (us)")
        print_table(control, [("read_MB", "{}"), ("zero_us", "{:.1f}"), ("clean_us", "{:.1f}"),
                              ("none_us", "{:.1f}"), ("zero_minus_clean_us", "{:.1f}")])
        (out_dir / "flush_control.json").write_text(json.dumps(control, indent=1))
    if args.align:
        align_rows = align_times(shapes, tokens, args.seed)
        print("routing metadata (align) alone, CUDA graph, us")
        print_table(align_rows, [("shape", "{}"), ("tokens", "{}"), ("chunks", "{}"),
                                 ("one_us", "{:.1f}"), ("chunked_us", "{:.1f}")])
        (out_dir / "align.json").write_text(json.dumps(align_rows, indent=1))
    print(f"L2 flush before each timed run: {FLUSH}", flush=True)
    rows = []
    for name, shape in shapes.items():
        for n_tokens in tokens:
            rows.append(bench_one(name, shape, n_tokens, seed=args.seed, fused=args.fused,
                                  skip=args.skip, failed=failed))
            r = rows[-1]
            fused = (f"; fused {r['fused_us']:.1f} us ({r['pct_floor_fused']:.0f}%)"
                     if "fused_us" in r else "")
            print(f"  {name} T={n_tokens}: ours {r['ours_us']:.1f} us, {r['pct_floor']:.0f}% of "
                  f"floor (floor {r['floor_us']:.1f}, grouped_mm {r['gmm_us']:.1f}){fused}",
                  flush=True)
            torch.cuda.empty_cache()
    meta = {"device": device, "flush": FLUSH, "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "ceilings": "copy_TBps, matmul_TFLOPs: measured per row, in the rounds of its methods"}
    import pandas as pd

    pd.DataFrame(rows).to_csv(out_dir / "bench.csv", index=False)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{device}; times in us (median, device events); copy (read+written) and bf16 "
          "8192^3 matmul rates measured in each row's rounds")
    print_table(rows)
    if args.fused:
        print("\nfused decode path (best of FUSED_TILES; ours = the tuned/shipped config)")
        print_table(rows, FUSED_COLUMNS)
    try:
        from moegps.kernels.plot import plot_bench

        print("plot:", plot_bench(out_dir / "bench.csv", None, out_dir / "kernels.png", device,
                                  first_flush=FLUSH))
    except ImportError as exc:  # a GPU box without matplotlib: the CSV is written regardless
        print(f"plot skipped ({exc}); python -m moegps.kernels.plot draws it from bench.csv")


if __name__ == "__main__":
    main()
