"""Run one fused_moe call shape repeatedly, for a profiler to attach to (no timing of its own).

    ncu --clock-control none --launch-skip 20 --launch-count 3 --section SpeedOfLight \
        python -m moegps.kernels.profile_one --shape deepseek-v2-lite --tokens 1

The call uses the shipped config for this GPU (as the benchmark's "ours"), on the benchmark's
random inputs and routing (`--balanced`: its balanced routing), after a warm-up that compiles every
kernel it launches. `--part` runs one piece instead of the whole call: either of its two GEMM
launches on routing computed once (bench.gemm_parts), or the benchmark's reference, cuBLAS's
batched GEMMs on balanced rows (bench.balanced_bmm), so that a profile sets them side by side.
"""

from __future__ import annotations

import argparse
import math

import torch

from moegps import shapes
from moegps.kernels import fused_moe
from moegps.kernels.bench import balanced_bmm, gemm_parts
from moegps.kernels.launch import get_config
from moegps.kernels.tune import expert_dims, shared_columns
from moegps.kernels.timing import make_inputs, make_routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=shapes.names(), default="deepseek-v2-lite")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--part", choices=["call", "gate_up", "down", "bmm"], default="call")
    ap.add_argument("--balanced", action="store_true", help="the random routing's A experts, n * k / A rows each")
    args = ap.parse_args()
    n_experts, hidden, ffn, top_k = expert_dims(args.shape)
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, args.tokens)
    ids, weights = make_routing(args.tokens, n_experts, top_k, shared=shared_columns(args.shape),
                                balanced=args.balanced)
    if args.part == "call":
        run = lambda: fused_moe(x, w13, w2, ids, weights)  # noqa: E731
    elif args.part == "bmm":
        run = balanced_bmm(w13, w2, n_experts, math.ceil(args.tokens * top_k / n_experts))
    else:
        config = get_config(args.tokens, n_experts, hidden, ffn, top_k)
        run = gemm_parts(x, w13, w2, ids, weights, config)[args.part]
    for _ in range(args.calls):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
