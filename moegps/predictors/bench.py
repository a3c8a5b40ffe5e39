"""Overhead benchmark: one prediction call per predictor for batches of 1 to 4,096 tokens.

    python -m moegps.predictors.bench                       # random trace, CPU
    python -m moegps.predictors.bench --trace deepseek --device cuda --out bench.csv

For each predictor and batch size it prints the median wall time of one call (after warm-up),
the physical floor ``bytes_for(n) / memory bandwidth`` (bandwidth measured in the same run with a
large array copy, read + write bytes) and the ratio to the global-profile baseline measured in the
same run. Distribution predictors get a decode batch's context (past loads of 64 batches); token
predictors a :class:`TokenBatch` of ``n`` test tokens with the true previous-layer experts.
``--device cuda`` moves the torch models to the GPU and times them with CUDA events; table and
tree predictors stay on the CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from ..files import atomic_path
from ..workloads import load_trace, split_by_request
from . import make
from .base import BatchContext
from .batching import token_batch

SIZES = (1, 4, 16, 64, 256, 1024, 4096)
DEFAULT = ("global_profile", "uniform", "phase_profile", "step_profile", "last_batch", "sliding_window", "ema", "own_prefill",
           "learned", "most_frequent", "token_table", "position_table", "cross_layer", "ffn", "sequence", "lgbm", "mlp")


def memory_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second of a large array copy on this CPU (read + written), best of ``repeats``."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def median_time(fn, repeats: int, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after 3 warm-up calls (CUDA events on cuda)."""
    for _ in range(3):
        fn()
    times = []
    if device == "cuda":
        import torch

        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_latency(predictor, tokens, past_loads, sizes=SIZES, repeats: int = 20, device: str = "cpu",
                    rng: np.random.Generator | None = None) -> dict[int, float]:
    """Median seconds of one call per batch size ``{tokens: s}``; also recorded on the predictor, so
    that its ``cost().latency_s`` (CPU) or ``cost().gpu_latency_s`` (torch models on CUDA) report it."""
    rng = rng or np.random.default_rng(0)
    out = {}
    for n in sizes:
        idx = rng.choice(len(tokens), size=n, replace=n > len(tokens))
        tb = tokens.select(idx)
        if hasattr(predictor, "predict_next"):
            L, E = past_loads.shape[1:]
            ctx = BatchContext(
                phase=1, n_tokens=n, n_requests=n, token_ids=tb.token_id, past_phase=np.ones(len(past_loads), np.int8),
                request_prefill_loads=past_loads[rng.integers(0, len(past_loads), size=n)], tokens=tb,
                steps=rng.integers(1, 32, size=n),  # requests at mixed decode steps: the costlier case
            )
            out[n] = median_time(lambda: predictor.predict_next(past_loads, ctx), repeats, "cpu")
        else:
            dev = device if getattr(predictor, "device", "cpu") != "cpu" else "cpu"
            out[n] = median_time(lambda: predictor.predict(tb), repeats, dev)
    on_gpu = device == "cuda" and getattr(predictor, "device", "cpu") != "cpu"
    if on_gpu:
        predictor.gpu_latency_s = {**(getattr(predictor, "gpu_latency_s", None) or {}), **out}
    else:
        predictor.latency_s = {**getattr(predictor, "latency_s", {}), **out}
    return out


def bench(trace_spec: str = "random", names=DEFAULT, sizes=SIZES, device: str = "cpu", repeats: int = 20,
          limit: int | None = None, threads: int = 1) -> pd.DataFrame:

    if threads:
        import torch

        torch.set_num_threads(threads)
    trace = load_trace(trace_spec, limit)
    train, test = split_by_request(trace, 0.2, 0)
    tokens = token_batch(test.by_token())
    past = train.loads(by="request_step").counts[:64]
    bw = memory_bandwidth()
    rows = []
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="bench"):
        p = make(name).fit(train)
        if device == "cuda" and hasattr(p, "to"):
            p.to("cuda")
        lat = measure_latency(p, tokens, past, sizes, repeats, device)
        c = p.cost()
        for n, t in lat.items():
            rows.append({"predictor": p.name, "family": c.family, "tokens": n, "median_s": t,
                         "floor_s": c.bytes_for(n) / bw, "flops": c.flops_for(n), "bytes": c.bytes_for(n),
                         "device": "cuda" if device == "cuda" and hasattr(p, "to") else "cpu",
                         "bandwidth_GBs": bw / 1e9})
    df = pd.DataFrame(rows)
    base = df[df.predictor == "global_profile"].set_index("tokens").median_s
    df["ratio_to_global_profile"] = df.median_s / df.tokens.map(base)
    return df


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="random", help="deepseek | random | a RoutingTrace parquet file/folder")
    ap.add_argument("--limit", type=int, default=None, help="first N requests of the trace")
    ap.add_argument("--predictors", default=",".join(DEFAULT))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="write the table as CSV here")
    a = ap.parse_args(argv)
    names = [n for n in a.predictors.split(",") if n]
    if "global_profile" not in names:
        names = ["global_profile"] + names  # the baseline every ratio refers to
    df = bench(a.trace, names, [int(s) for s in a.sizes.split(",")], a.device, a.repeats, a.limit, a.threads)
    print(f"memory bandwidth (copy, read+write): {df.bandwidth_GBs.iloc[0]:.1f} GB/s")
    wide = df.pivot(index="predictor", columns="tokens", values="median_s") * 1e6
    print("median latency per call (us):")
    print(wide.round(1).to_string())
    print("ratio to global_profile:")
    print(df.pivot(index="predictor", columns="tokens", values="ratio_to_global_profile").round(1).to_string())
    print("floor = bytes read / bandwidth (us):")
    print((df.pivot(index="predictor", columns="tokens", values="floor_s") * 1e6).round(3).to_string())
    if a.out:

        with atomic_path(a.out) as tmp:
            df.to_csv(tmp, index=False)


if __name__ == "__main__":
    main()
