"""Device timing of GPU callables for the kernels' benchmark and tuner: bf16 inputs and random
routing, CUDA graphs, an L2 flush before each timed run, and interleaved medians of device events.

    from moegps.kernels.timing import make_inputs, make_routing, time_many
    us = time_many({"a": fn_a, "b": fn_b}, graph={"a", "b"})   # {name: median us}
    with gpu_clocks() as clocks:                               # the SM clock while they ran
        us = time_many(...)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import torch


def make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16
    x = torch.randn(n_tokens, hidden, generator=gen, device=device, dtype=bf16)
    w13 = torch.randn(n_experts, 2 * ffn, hidden, generator=gen, device=device, dtype=bf16)
    w13 /= math.sqrt(hidden)
    w2 = torch.randn(n_experts, hidden, ffn, generator=gen, device=device, dtype=bf16)
    w2 /= math.sqrt(ffn)
    return x, w13, w2


def make_routing(n_tokens, n_experts, top_k, seed=0, device="cuda", shared=0, balanced=False):
    """Random top-k routing: k distinct uniformly random experts, softmax gate weights (fp32).
    ``shared`` > 0: the last ``shared`` of the k columns are the last ``shared`` experts with gate 1
    for every token (a shared expert held among the experts, engine.model.Layer.n_shared), the
    others drawn from the first n_experts - shared.
    ``balanced``: the same experts as the random routing of this seed touches (A of them, routed
    ones only), each given n_tokens * k / A rows, give or take one: the routed columns of token t are
    the (t * k + j) mod A-th of them, j < k, still k distinct experts a token. The work cuBLAS's
    batched GEMM and the floor are given (bench.balanced_bmm, bench.floors_us: the random routing's
    active experts, equal rows each), so that at a few tokens balanced routing does not read more
    experts' weights than the random routing it is compared with."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    logits = torch.randn(n_tokens, n_experts - shared, generator=gen, device=device)
    vals, ids = logits.topk(top_k - shared, dim=1)
    if balanced:
        ids = spread_evenly(ids)
    gates = torch.softmax(vals, dim=1)
    if shared:
        fixed = torch.arange(n_experts - shared, n_experts, device=device).expand(n_tokens, -1)
        ids = torch.cat([ids, fixed], 1)
        gates = torch.cat([gates, gates.new_ones(n_tokens, shared)], 1)
    return ids, gates


def spread_evenly(ids):
    """ids [T, k] -> [T, k]: the same active experts (A of them, ``torch.unique(ids)``), each given
    T * k / A of the picks, give or take one: token t's column j is the (t * k + j) mod A-th active
    expert, so a token's k experts stay distinct when A >= k."""
    n_tokens, k = ids.shape
    active = torch.unique(ids)
    pick = torch.arange(n_tokens, device=ids.device)[:, None] * k + torch.arange(k, device=ids.device)
    return active[pick % active.numel()]


def recorded_prefill(path):
    """(meta, prefill tokens) of a `moegps.trace.RoutingTrace`: its metadata and the token-major view of
    its prefill rows (`RoutingTrace.by_token`, request then position order). Read once per file version:
    the benchmark's plan and each of its recorded-routing rows ask for the same trace."""
    path = Path(path)
    return _recorded_prefill(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _recorded_prefill(path, mtime_ns):
    from moegps.trace import RoutingTrace

    trace = RoutingTrace.read(path)
    return trace.meta, trace.select(trace.phase_mask("prefill")).by_token()


def trace_routing(path, n_tokens, layer, seed=0, device="cuda"):
    """Recorded routing: the experts [n_tokens, k] (int64) that a `moegps.trace.RoutingTrace`'s first
    n_tokens prefill tokens chose at trace layer `layer` (tokens in request, then position order: a
    prefill batch of the trace's first prompts, the last one cut), and their gate weights [n_tokens, k]
    (fp32): the recorded ones where the trace has them, else a softmax of seeded normal draws (the
    DeepSeek-V2-Lite CSVs carry no weights; the kernels' time does not depend on their values)."""
    from moegps.trace import TraceError

    _, prefill = recorded_prefill(path)
    available, n_layers = prefill.experts.shape[:2]
    if not 0 <= layer < n_layers:
        raise TraceError(f"{path}: layer {layer} requested, the trace has layers 0..{n_layers - 1}")
    if n_tokens > available:
        raise TraceError(f"{path}: {n_tokens} prefill tokens requested, the trace has {available}")
    ids = torch.as_tensor(prefill.experts[:n_tokens, layer].astype("int64"), device=device)
    if prefill.weights is not None:
        gates = torch.as_tensor(prefill.weights[:n_tokens, layer], device=device)
    else:
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        gates = torch.softmax(torch.randn(ids.shape, generator=gen, device=device), dim=1)
    return ids, gates


def share_routing(path, n_tokens, n_experts, seed=0, device="cuda"):
    """One GPU's rows as a replay made them, for tuning one rank's call (``NAME@N``): from a measured
    replay's ``expert_shares.csv`` (``python -m moegps.simulator ... expert_time=kernels``), the share
    of at most ``n_experts`` experts whose rows in all are nearest ``n_tokens``, its experts' row counts
    (in expert order, then empty slots) scaled to ``n_tokens`` rows by largest remainders; returns ids
    [n_tokens, 1] (int64, slot numbers in a seeded random token order) and gate weights of 1 [n_tokens, 1]
    (fp32; a rank's top-1 rows, as ``executor.expert_timer`` runs them)."""
    import json

    import numpy as np
    import pandas as pd

    frame = pd.read_csv(path)
    if not {"tokens", "expert_rows"} <= set(frame):
        raise ValueError(f"{path}: not an expert_shares.csv (needs columns 'tokens' and 'expert_rows', "
                         f"the JSON list of a share's rows per expert); has {list(frame.columns)}")
    rows = [np.asarray(json.loads(r), dtype=np.int64) for r in frame["expert_rows"]]
    fits = [i for i, r in enumerate(rows) if 0 < np.count_nonzero(r) <= n_experts]
    if not fits:
        raise ValueError(f"{path}: no share in 'expert_rows' has rows on 1..{n_experts} experts")
    pick = min(fits, key=lambda i: abs(int(rows[i].sum()) - n_tokens))
    counts = np.zeros(n_experts, dtype=np.int64)
    nonzero = rows[pick][rows[pick] > 0]
    exact = nonzero * n_tokens / nonzero.sum()
    counts[:len(nonzero)] = np.floor(exact).astype(np.int64)
    short = n_tokens - int(counts.sum())
    counts[np.argsort(-(exact - np.floor(exact)), kind="stable")[:short]] += 1
    gen = torch.Generator(device="cpu").manual_seed(seed + 3)
    ids = torch.repeat_interleave(torch.arange(n_experts), torch.as_tensor(counts))
    ids = ids[torch.randperm(n_tokens, generator=gen)][:, None].to(device)
    return ids, torch.ones(n_tokens, 1, device=device)


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
    FLUSH = saved
    return rows


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def gpu_clocks(period_ms: int = 100, nvidia_smi: str | None = None):
    """Yield a dict that on exit holds the GPU's SM clock (MHz: median "sm_MHz", least
    "sm_MHz_min") and power draw (W, median "power_W") that nvidia-smi sampled every period_ms
    while the block ran; NaN where nvidia-smi is absent or sent nothing. Why: a kernel bound by L2
    or the tensor cores runs at the SM clock, which the power cap lowers under load and which
    differs from machine to machine, while a copy bound by DRAM does not (Mixtral's experts at 512
    tokens read 77-86% of the floor on six H200s; benchmarks/kernels/NOTES.md, session 14)."""
    stats = {"sm_MHz": math.nan, "sm_MHz_min": math.nan, "power_W": math.nan}
    exe = nvidia_smi or shutil.which("nvidia-smi")
    proc = None
    if exe:
        try:
            proc = subprocess.Popen([exe, f"--id={_nvidia_smi_index()}", "--query-gpu=clocks.sm,power.draw",
                                     "--format=csv,noheader,nounits", f"--loop-ms={period_ms}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # there but not runnable here: no samples, not a failed benchmark
            pass
    if proc is None:
        yield stats
        return
    try:
        yield stats
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:  # it did not stop: its samples so far
            proc.kill()
            out = proc.communicate()[0]
        samples = []
        for line in out.splitlines():
            try:
                samples.append([float(v) for v in line.split(",")][:2])
            except ValueError:  # "[N/A]" or a line cut short by the termination
                continue
        samples = [s for s in samples if len(s) == 2]
        if samples:
            clocks, power = zip(*samples)
            stats.update(sm_MHz=statistics.median(clocks), sm_MHz_min=min(clocks),
                         power_W=statistics.median(power))


def _nvidia_smi_index() -> int:
    """nvidia-smi's index of the GPU torch runs on (torch counts within CUDA_VISIBLE_DEVICES)."""
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    return int(visible[index]) if index < len(visible) and visible[index].strip().isdigit() else index
