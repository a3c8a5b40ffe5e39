"""Run one fused_moe call shape repeatedly, for a profiler to attach to (no timing of its own).

    ncu --clock-control none --launch-skip 20 --launch-count 3 --section SpeedOfLight \
        python -m moegps.kernels.profile_one --shape deepseek-v2-lite --tokens 1

The call uses the shipped config for this GPU (as the benchmark's "ours"), on the benchmark's
random inputs and routing, after a warm-up that compiles every kernel it launches.
"""

from __future__ import annotations

import argparse

import torch

from moegps import shapes
from moegps.kernels import fused_moe
from moegps.kernels.tune import expert_dims
from moegps.kernels.timing import make_inputs, make_routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=shapes.names(), default="deepseek-v2-lite")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    n_experts, hidden, ffn, top_k = expert_dims(args.shape)
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, args.tokens)
    ids, weights = make_routing(args.tokens, n_experts, top_k)
    for _ in range(args.calls):
        fused_moe(x, w13, w2, ids, weights)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
