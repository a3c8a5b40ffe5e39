"""How long reading and aggregating a 10M-row RoutingTrace takes.

    python benchmarks/trace_io.py [--rows 10000000]

Prints median wall time of: parquet write, parquet read into numpy (with validation), per-step and
per-request load matrices, and the token-major view; plus the floor for the read (file bytes over
this machine's measured memcpy rate of the same byte count) and rows per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from moegps.trace import RoutingTrace, TraceMeta


def synthetic(rows: int, n_layers: int = 32, n_experts: int = 8, top_k: int = 2, seed: int = 0) -> RoutingTrace:
    """``rows`` (token, layer) rows: requests of 256 prompt tokens then 64 decode steps."""
    rng = np.random.default_rng(seed)
    tokens = rows // n_layers
    per_request = 256 + 64
    req = np.arange(tokens) // per_request
    idx = np.arange(tokens) % per_request
    step = np.where(idx < 256, 0, idx - 255)
    experts = np.argsort(rng.random((tokens, n_layers, n_experts), dtype=np.float32), axis=-1)[..., :top_k]
    weights = rng.random((tokens, n_layers, top_k), dtype=np.float32)
    meta = TraceMeta(model="synthetic", n_layers=n_layers, n_experts=n_experts, top_k=top_k, source="benchmark")
    return RoutingTrace.from_token_major(meta, req, step, idx, rng.integers(0, 32000, tokens), experts, weights)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    trace = synthetic(args.rows)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.parquet"
        t_write, _ = timed(lambda: trace.write(path), args.repeats)
        size = path.stat().st_size
        t_read, back = timed(lambda: RoutingTrace.read(path), args.repeats)
    buf = np.empty(size, dtype=np.uint8)
    t_copy, _ = timed(lambda: buf.copy(), 5)
    t_step, _ = timed(lambda: back.loads(by="step", phase="decode"), args.repeats)
    t_req, _ = timed(lambda: back.loads(by="request"), args.repeats)
    t_tok, _ = timed(lambda: back.by_token(), args.repeats)
    rows = len(back)
    print(f"{rows:,} rows, {trace.meta.n_layers} layers, top-{trace.meta.top_k} of {trace.meta.n_experts}, file {size / 1e6:.1f} MB")
    print(f"{'operation':<34}{'median s':>10}{'Mrows/s':>10}{'vs floor':>10}")
    for name, t in (("write parquet (zstd, validated)", t_write), ("read parquet -> numpy (validated)", t_read),
                    ("loads(by=step, phase=decode)", t_step), ("loads(by=request)", t_req), ("by_token()", t_tok)):
        floor = f"{t / t_copy:>9.0f}x" if name.startswith("read") else f"{'':>10}"
        print(f"{name:<34}{t:>10.3f}{rows / t / 1e6:>10.1f}{floor}")
    print(f"floor: memcpy of the file's {size / 1e6:.1f} MB here takes {t_copy * 1e3:.2f} ms ({size / t_copy / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
