"""Benchmark of the fused MoE kernels on a GPU (and the command line of their tuner, tune.py).

    python -m moegps.kernels.bench [--quick] [--tune] [--out DIR] [--tokens 1 32 ...]
                                   [--fused] [--skip loop default] [--shapes mixtral-8x7b ...]
                                   [--routing-trace T.parquet [--trace-layers 0 12 25]]

For each shape (`--shapes`, names of moegps.shapes; by default mixtral-8x7b: E=8, H=4096,
F=14336, top-2, and deepseek-v2-lite: E=64, H=2048, F=1408, top-6; deepseek-v2-lite+shared is the
engine's call for it, its shared expert held as 2 more experts every token picks: E=66, top-8) and
token count, with bf16 inputs and random top-k routing, it times (median of
device events after warm-up, `triton.testing.do_bench`'s loop; L2 flushed before each run, by
do_bench's zero-fill or, with `--flush clean`, by a read that leaves no dirty lines: see timing.FLUSH):
  ours      fused_moe with the tuned config, replayed from a CUDA graph (routing metadata,
            both GEMMs and the k-way combine all inside), and the same launched eagerly
  balanced  ours on balanced routing (the random routing's A active experts, n * k / A rows
            each, timing.make_routing): the work bmm below and the floor are given, so that
            ours against bmm compares the kernels, and ours against balanced says what the
            unevenness of random routing costs (padding, tails)
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
`--routing-trace T.parquet` also times ours on recorded routing (a `moegps.trace.RoutingTrace`, e.g.
the DeepSeek-V2-Lite prompts `python -m moegps.importers deepseek-csv` writes): for each shape with the
trace's experts and top-k, each token count and each `--trace-layers` layer, the routing its first
prefill tokens chose there (timing.trace_routing), beside the same picks spread evenly and bmm, into
trace.csv / trace.json with each expert's rows (`expert_rows`, which `python -m moegps.simulator.calibrate
--kernel-bench bench.csv trace.csv` costs expert by expert: the cost model against real skew).
Every output is checked against an fp32 reference (relative error). `--tune` first searches a
small config space per (shape, token count) (tune.py), compiling candidates in parallel processes,
and writes configs/<device>.json (also to --out). Timing: timing.py. Results: a printed table, CSV, JSON and a plot (plot.py) in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moegps.kernels import timing
from moegps.kernels.launch import (combine_atomic, combine_sum, default_config, fused_moe, get_config,
                                   launch_down, launch_gate_up, route, wgmma_down,
                                   wgmma_gate_up, wgmma_gemms)
from moegps.kernels.reference import moe_reference
from moegps.kernels.routing import SCAN, align
from moegps.kernels.timing import (flush_control, gpu_clocks, make_inputs, make_routing, recorded_prefill,
                                   rel_err, share_routing, spread_evenly, time_many, time_us, trace_routing)
from moegps.kernels.tune import (FUSED_MAX_PAIRS, FUSED_TILES, PATHS as TUNE_PATHS, config_tasks, expert_dims,
                                 fused_config, precompile, shape_arg, shape_names, shared_columns, tune)



# the shapes timed by default: Mixtral-8x7B's 8 wide experts, DeepSeek-V2-Lite's 64 narrow ones
DEFAULT_SHAPES = ("mixtral-8x7b", "deepseek-v2-lite")
TOKENS = [1, 8, 32, 128, 512, 2048, 8192, 16384]
QUICK_TOKENS = [1, 32, 512, 16384]


def grouped_mm_moe(x, w13, w2, topk_ids, topk_weights):
    """The torch._grouped_mm pipeline, with the same routing, permutation and combine around it.

    torch._grouped_mm(A [M, K], B [E, K, N], offs=int32 cumulative row ends [E]) -> [M, N]
    (Hopper, bf16, 16-byte aligned strides); B is passed as a transposed view of the weights.
    """
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


def balanced_bmm_parts(w13, w2, n_active: int, rows: int) -> dict:
    """{"gate_up": fn, "down": fn}: the two expert GEMMs as cuBLAS batched GEMMs over `n_active`
    experts of `rows` rows each: [n, rows, H] @ w13[:n]^T -> [n, rows, 2F], and [n, rows, F] @
    w2[:n]^T -> [n, rows, H] (the weights as transposed views, as grouped_mm_moe passes them). What
    a dense GEMM library reaches on the same per-expert shapes when routing is perfectly balanced
    and free; the down GEMM's input is drawn, not computed, so nothing between the GEMMs is timed."""
    n, hidden, ffn = n_active, w2.shape[1], w2.shape[2]
    a = torch.randn(n, rows, hidden, dtype=w13.dtype, device=w13.device)
    h = torch.randn(n, rows, ffn, dtype=w13.dtype, device=w13.device)
    return {"gate_up": lambda: torch.bmm(a, w13[:n].transpose(1, 2)),
            "down": lambda: torch.bmm(h, w2[:n].transpose(1, 2))}


def balanced_bmm(w13, w2, n_active: int, rows: int):
    """Both of `balanced_bmm_parts`' GEMMs in one call."""
    parts = balanced_bmm_parts(w13, w2, n_active, rows)
    return lambda: (parts["gate_up"](), parts["down"]())


def gemm_parts(x, w13, w2, ids, weights, config: dict) -> dict:
    """{"gate_up": fn, "down": fn}: ours' two GEMM launches each alone, on routing computed once,
    into preallocated buffers (a wgmma config's gate/up includes its gather of rows into expert
    order), or {"gate_up+down": fn} for a wgmma config whose GEMMs are one launch ("one_launch").
    No routing metadata, no k-way combine."""
    n_tokens, top_k = ids.shape
    flat_ids, gates = ids.reshape(-1), weights.reshape(-1)
    routing = route(flat_ids, w13.shape[0], config)
    if config["path"] == "wgmma" and config.get("one_launch"):  # both GEMMs are one launch
        return {"gate_up+down": lambda: wgmma_gemms(x, w13, w2, gates, routing, config, top_k)}
    if config["path"] == "wgmma":
        h = wgmma_gate_up(x, w13, routing, config, top_k)
        return {"gate_up": lambda: wgmma_gate_up(x, w13, routing, config, top_k),
                "down": lambda: wgmma_down(h, w2, gates, routing, config)}
    h = torch.empty(flat_ids.numel(), w2.shape[2], dtype=x.dtype, device=x.device)
    y = (torch.zeros(n_tokens, x.shape[1], dtype=torch.float32, device=x.device)
         if combine_atomic(config, top_k) else
         torch.empty(flat_ids.numel(), x.shape[1], dtype=x.dtype, device=x.device))
    return {"gate_up": lambda: launch_gate_up(x, w13, h, flat_ids, routing, config, top_k),
            "down": lambda: launch_down(h, w2, y, gates, flat_ids, routing, config, top_k)}


def gemm_launches(x, w13, w2, ids, weights, config: dict):
    """Ours without the routing metadata and the k-way combine: all of `gemm_parts`' launches."""
    parts = gemm_parts(x, w13, w2, ids, weights, config)
    return lambda: [run() for run in parts.values()]


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


def floors_us(n_active: int, hidden: int, ffn: int, n_tokens: int, top_k: int, rate: dict) -> dict:
    """{"gate_up", "down", "call"}: (memory floor, compute floor) in us of each expert GEMM and of
    the whole call, at the rates measured beside them (`rates`): the `n_active` experts' weight
    bytes (the call's plus x read and the output written) over the copy rate, and the FLOPs of the
    n_tokens * top_k pairs over the matmul rate. The floor is the larger of the two."""
    pairs = n_tokens * top_k
    out = {}
    for part, (n_rows, k_dim) in {"gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}.items():
        out[part] = (1e6 * n_active * n_rows * k_dim * 2 / rate["copy_Bps"],
                     1e6 * 2 * pairs * n_rows * k_dim / rate["matmul_flops"])
    out["call"] = (1e6 * (n_active * 3 * hidden * ffn * 2 + 2 * n_tokens * hidden * 2) / rate["copy_Bps"],
                   1e6 * 2 * pairs * 3 * hidden * ffn / rate["matmul_flops"])
    return out


def align_times(shapes, tokens, seed=0) -> list[dict]:
    """Routing metadata alone (CUDA graph), by method: the one-launch walk and the chunked
    launches, at BLOCK_M 128 with half tails (the large-batch config); the auto choice is the
    faster below and above routing.ONE_LAUNCH_CHUNKS scan chunks."""
    rows = []
    for name, (n_experts, _, _, top_k) in shapes.items():
        for n_tokens in tokens:
            ids, _ = make_routing(n_tokens, n_experts, top_k, seed, shared=shared_columns(name))
            row = {"shape": name, "tokens": n_tokens,
                   "chunks": -(-n_tokens * top_k // SCAN)}
            for method in ("one", "chunked"):
                def run(ids=ids, n_experts=n_experts, method=method):
                    align(ids, n_experts, 128, half_tail=True, method=method)

                row[f"{method}_us"] = time_us(run, graph=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the benchmark


def bench_fused(row, x, w13, w2, ids, weights, ref, failed, name) -> None:
    """Time every fused tile whole (graph, checked against ref), keep the best in the row."""
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


def bench_one(name, shape, n_tokens, seed=0, fused=False, skip=(), failed=None, routing=None) -> dict:
    """One (shape, tokens) row. Its methods, references and the floor's copy and matmul runs are
    timed together in rounds (`time_many`): the 8192^3 matmul rate of one H100 moved between
    702 and 793 TFLOP/s from run to run (its clocks under the power limit; NOTES.md v11), and
    two identical configs timed one after the other read up to 15% apart (session 6), so
    every time and rate in a row is taken under the same clocks. `routing`: (ids, weights) to
    run instead of the random routing (a recorded one, `timing.trace_routing`); its balanced
    counterpart spreads the picks evenly over the same active experts."""
    n_experts, hidden, ffn, top_k = shape
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    if routing is None:
        ids, weights = make_routing(n_tokens, n_experts, top_k, seed, shared=shared_columns(name))
        even_ids, even_weights = make_routing(n_tokens, n_experts, top_k, seed, shared=shared_columns(name),
                                              balanced=True)
    else:
        ids, weights = routing
        even_ids, even_weights = spread_evenly(ids), weights
    config = get_config(n_tokens, n_experts, hidden, ffn, top_k)
    dflt = default_config(n_tokens, n_experts, hidden, ffn, top_k)
    active = int(torch.unique(ids).numel())
    weight_bytes = active * 3 * hidden * ffn * 2
    flops = 2 * n_tokens * top_k * 3 * hidden * ffn
    ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float()).float()
    row = {"shape": name, "E": n_experts, "H": hidden, "F": ffn, "k": top_k, "tokens": n_tokens,
           "active_experts": active, "path": config["path"], "block_m": config["block_m"],
           "half_tail": bool(config.get("half_tail", False))}
    even_ref = moe_reference(x.float(), w13.float(), w2.float(), even_ids, even_weights.float()).float()
    checked = {  # method: (run, its fp32 reference)
        "ours": (lambda: fused_moe(x, w13, w2, ids, weights, config=config), ref),
        "balanced": (lambda: fused_moe(x, w13, w2, even_ids, even_weights, config=config), even_ref),
        "default": (lambda: fused_moe(x, w13, w2, ids, weights, config=dflt), ref),
        "gmm": (lambda: grouped_mm_moe(x, w13, w2, ids, weights), ref),
    }
    timed = {}  # the row's runs timed together, in rounds (time_interleaved)
    for method, (fn, method_ref) in checked.items():
        if method in skip:
            continue
        try:
            row[f"err_{method}"] = rel_err(fn(), method_ref)
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
    with gpu_clocks() as clocks:  # L2- and tensor-bound kernels run at the SM clock, copies not
        times = time_many({**ceiling, **timed}, graph=set(timed))
    row.update(clocks)
    del ceiling
    for method in ("ours", "balanced", "default", "gmm", "gemms", "bmm", "read"):
        row[f"{method}_us"] = times.get(method, math.nan)
    rate = rates(times)
    floor_mem, floor_flop = floors_us(active, hidden, ffn, n_tokens, top_k, rate)["call"]
    row.update(copy_TBps=rate["copy_Bps"] / 1e12, matmul_TFLOPs=rate["matmul_flops"] / 1e12,
               floor_us=max(floor_mem, floor_flop),
               bound="memory" if floor_mem >= floor_flop else "compute")
    row["loop_us"] = math.nan
    if "loop" not in skip:  # eager (it syncs per expert), alone
        row["err_loop"] = rel_err(moe_reference(x, w13, w2, ids, weights), ref)
        row["loop_us"] = time_us(lambda: moe_reference(x, w13, w2, ids, weights))
    row["ours_eager_us"] = time_us(checked["ours"][0])
    row["align16_us"] = time_us(lambda: align(ids, n_experts, 16), graph=True)
    row["pct_floor"] = 100 * row["floor_us"] / row["ours_us"]
    row["pct_floor_balanced"] = 100 * row["floor_us"] / row["balanced_us"]
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
           ("pct_floor", "{:.0f}%"), ("balanced_us", "{:.1f}"), ("pct_floor_balanced", "{:.0f}%"),
           ("gemms_us", "{:.1f}"), ("pct_floor_gemms", "{:.0f}%"),
           ("default_us", "{:.1f}"), ("pct_floor_default", "{:.0f}%"),
           ("gmm_us", "{:.1f}"), ("pct_floor_gmm", "{:.0f}%"), ("bmm_us", "{:.1f}"),
           ("pct_floor_bmm", "{:.0f}%"), ("read_us", "{:.1f}"), ("pct_floor_read", "{:.0f}%"),
           ("loop_us", "{:.1f}"),
           ("vs_gmm", "{:.2f}x"), ("vs_loop", "{:.2f}x"), ("tflops", "{:.0f}"),
           ("weight_GBps", "{:.0f}"), ("align16_us", "{:.1f}"), ("sm_MHz", "{:.0f}"),
           ("sm_MHz_min", "{:.0f}"), ("power_W", "{:.0f}"), ("err_ours", "{:.1e}")]
FUSED_COLUMNS = [("shape", "{}"), ("tokens", "{}"), ("path", "{}"), ("ours_us", "{:.1f}"),
                 ("fused_us", "{:.1f}"), ("fused_eager_us", "{:.1f}"),
                 ("fused_tile", "{}"), ("floor_us", "{:.1f}"), ("pct_floor", "{:.0f}%"),
                 ("pct_floor_fused", "{:.0f}%"), ("gmm_us", "{:.1f}"), ("fused_vs_ours", "{:.2f}x"),
                 ("fused_vs_gmm", "{:.2f}x"), ("err_fused", "{:.1e}")]


TRACE_COLUMNS = [("shape", "{}"), ("tokens", "{}"), ("routing", "{}"), ("rows_max_over_mean", "{:.2f}"),
                 ("path", "{}"), ("ours_us", "{:.1f}"), ("floor_us", "{:.1f}"), ("pct_floor", "{:.0f}%"),
                 ("balanced_us", "{:.1f}"), ("pct_floor_balanced", "{:.0f}%"), ("bmm_us", "{:.1f}"),
                 ("pct_floor_bmm", "{:.0f}%"), ("sm_MHz", "{:.0f}"), ("err_ours", "{:.1e}")]


def trace_plan(path: Path, layers, shapes: dict, tokens) -> list[tuple[str, int, int]]:
    """[(shape, tokens, layer)] of the recorded-routing rows: the shapes with the trace's expert
    count and top-k (a clear error if none has), the token counts it has prefill tokens for."""
    from moegps.trace import TraceError

    meta, prefill = recorded_prefill(path)
    available = len(prefill.experts)
    layers = layers if layers else sorted({0, meta.n_layers // 2, meta.n_layers - 1})
    if not all(0 <= layer < meta.n_layers for layer in layers):
        raise TraceError(f"{path}: --trace-layers {layers}; the trace has layers 0..{meta.n_layers - 1}")
    names = [name for name, (n_experts, _, _, top_k) in shapes.items()
             if (n_experts, top_k) == (meta.n_experts, meta.top_k) and not shared_columns(name)]
    if not names:
        raise TraceError(f"{path}: {meta.model}'s routing ({meta.n_experts} experts, top-{meta.top_k}) "
                         f"fits none of --shapes {list(shapes)}; name a shape of that many experts and top-k")
    too_many = [t for t in tokens if t > available]
    if too_many:
        print(f"recorded routing: {path} has {available} prefill tokens; not timed at {too_many}")
    return [(name, t, layer) for name in names for t in tokens if t <= available for layer in layers]


def bench_trace_row(path: Path, name: str, shape, n_tokens: int, layer: int, seed: int, skip) -> dict:
    """`bench_one` on the routing the trace recorded at `layer` for its first n_tokens prefill tokens,
    with the experts' row counts (`expert_rows`, a JSON list: what the simulator's per-expert
    roofline is given, `moegps.simulator.calibrate`) and the busiest expert's over the mean."""
    ids, weights = trace_routing(path, n_tokens, layer, seed)
    row = bench_one(name, shape, n_tokens, seed=seed, skip={*skip, "default", "gmm", "loop", "read"},
                    routing=(ids, weights))
    counts = torch.bincount(ids.reshape(-1), minlength=shape[0]).tolist()
    row.update(routing=f"{Path(path).stem} layer {layer}", trace_layer=layer,
               expert_rows=json.dumps(counts),
               rows_max_over_mean=max(counts) / (sum(counts) / sum(c > 0 for c in counts)))
    return row


def shares_routing(path: Path, shapes: dict, seed: int):
    """`tune`'s routing_for: one rank's calls (the NAME@N shapes, top-1) on a replay's shares, the
    other shapes on random routing; a clear error if no shape is a rank's call."""
    if not any(shape[3] == 1 for shape in shapes.values()):
        raise SystemExit(f"--tune-shares {path}: shares are one rank's calls; name such a shape (NAME@N) in --shapes")
    return lambda name, shape, n_tokens: (share_routing(path, n_tokens, shape[0], seed)
                                          if shape[3] == 1 else None)


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
    parser.add_argument("--shapes", nargs="*", type=shape_arg, default=list(DEFAULT_SHAPES),
                        help=f"model shapes {shape_names()} whose expert sizes are timed; NAME+shared: the "
                        "engine's call with NAME's shared expert held among the experts; NAME@N: one "
                        "expert-parallel rank's call, N of NAME's experts, top-1 (tuned: a table of its own)")
    parser.add_argument("--tune", action="store_true", help="tune configs first, write JSON")
    parser.add_argument("--tune-paths", nargs="*", choices=TUNE_PATHS, default=list(TUNE_PATHS),
                        help="with --tune, search these paths only (each token count's current "
                        "config competes, so a narrower search keeps it unless beaten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and routing")
    parser.add_argument("--fused", action="store_true",
                        help="also time the one-launch fused decode path's tiles (FUSED_TILES) "
                        f"where T*k <= {FUSED_MAX_PAIRS}")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["balanced", "default", "loop", "gmm", "bmm", "read"],
                        help="baselines and references not to time")
    parser.add_argument("--flush", choices=["zero", "clean"], default="zero",
                        help="L2 flush before each timed run: zero-fill (do_bench's, leaves dirty "
                        "lines) or a read (clean); see timing.FLUSH")
    parser.add_argument("--align", action="store_true",
                        help="first time the routing metadata alone, by method")
    parser.add_argument("--flush-control", action="store_true",
                        help="first time a plain read after each kind of flush")
    parser.add_argument("--routing-trace", type=Path,
                        help="a RoutingTrace (.parquet) whose recorded prefill routing is also timed, "
                        "for the shapes with its experts and top-k: rows of trace.csv beside bench.csv")
    parser.add_argument("--trace-layers", type=int, nargs="*",
                        help="the trace's layers to time (default: its first, middle and last)")
    parser.add_argument("--tune-shares", type=Path,
                        help="with --tune, one rank's calls (NAME@N) tuned on a measured replay's shares "
                        "(its expert_shares.csv: timing.share_routing) instead of random routing")
    # each compile worker holds one shape's weights on the GPU (Mixtral: ~3-9 GB): 16 ran out of memory
    parser.add_argument("--workers", type=int, default=min(6, os.cpu_count() or 1))
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moegps.kernels.bench needs a CUDA GPU (timings come from device events)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    shapes = {name: expert_dims(name) for name in args.shapes}
    # a bad trace or layer is named before anything compiles
    traced = trace_plan(args.routing_trace, args.trace_layers, shapes, tokens) if args.routing_trace else []
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}", flush=True)
    timing.FLUSH = args.flush
    failed = {}
    if args.tune:
        command = "python -m moegps.kernels.bench " + " ".join(
            sys.argv[1:] if argv is None else argv)
        # edge-case checks beside the compiles
        tune(shapes, tokens, out_dir, args.workers, command, args.seed, args.tune_paths,
             routing_for=shares_routing(args.tune_shares, shapes, args.seed) if args.tune_shares else None)
    else:  # compile the configs the benchmark uses in parallel, checks beside them
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
    print(f"L2 flush before each timed run: {timing.FLUSH}", flush=True)
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
    meta = {"device": device, "flush": timing.FLUSH, "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "ceilings": "copy_TBps, matmul_TFLOPs: measured per row, in the rounds of its methods"}
    pd.DataFrame(rows).to_csv(out_dir / "bench.csv", index=False)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{device}; times in us (median, device events); copy (read+written) and bf16 "
          "8192^3 matmul rates measured in each row's rounds")
    print_table(rows)
    if args.fused:
        print("\nfused decode path (best of FUSED_TILES; ours = the tuned/shipped config)")
        print_table(rows, FUSED_COLUMNS)
    trace_rows = []
    for name, n_tokens, layer in tqdm(traced, desc="recorded routing", unit="row"):
        trace_rows.append(bench_trace_row(args.routing_trace, name, shapes[name], n_tokens, layer,
                                          args.seed, args.skip))
        torch.cuda.empty_cache()
    if trace_rows:
        pd.DataFrame(trace_rows).to_csv(out_dir / "trace.csv", index=False)
        (out_dir / "trace.json").write_text(json.dumps({"meta": meta, "rows": trace_rows}, indent=1))
        print(f"\nrecorded routing ({args.routing_trace}); rows_max/mean: the busiest expert's rows "
              "over the mean; balanced: ours with the same picks spread evenly over the same experts")
        print_table(trace_rows, TRACE_COLUMNS)
    try:
        from moegps.kernels.plot import plot_bench

        print("plot:", plot_bench(out_dir / "bench.csv", None, out_dir / "kernels.png", device,
                                  first_flush=timing.FLUSH,
                                  trace=out_dir / "trace.csv" if trace_rows else None))
    except ImportError as exc:  # a GPU box without matplotlib: the CSV is written regardless
        print(f"plot skipped ({exc}); python -m moegps.kernels.plot draws it from bench.csv")


if __name__ == "__main__":
    main()
