"""Where uneven routing costs: each GEMM of the shipped config on random and on balanced routing,
beside cuBLAS's batched GEMM of the same projection on balanced rows, in the same rounds.

    python benchmarks/kernels/parts.py [--shapes mixtral-8x7b] [--tokens 512 2048]

For each (shape, tokens): the experts' row counts under the bench's random routing, then the
median of each launch (time_many: interleaved rounds, CUDA graphs, L2 flushed by a clean read),
with its share of that GEMM's own floor (its weight bytes over the copy rate, or its FLOPs over
the 8192^3 matmul rate, whichever is larger; both measured in the same rounds). One NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import math

import torch

from moegps.kernels import timing
from moegps.kernels.bench import balanced_bmm_parts, ceiling_runs, floors_us, gemm_parts, rates
from moegps.kernels.launch import get_config
from moegps.kernels.timing import make_inputs, make_routing, time_many
from moegps.kernels.tune import describe, expert_dims, shared_columns


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["mixtral-8x7b"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[512])
    args = parser.parse_args(argv)
    timing.FLUSH = "clean"
    print(f"device: {torch.cuda.get_device_name()}")
    for name in args.shapes:
        n_experts, hidden, ffn, top_k = dims = expert_dims(name)
        shared = shared_columns(name)
        for n_tokens in args.tokens:
            config = get_config(n_tokens, *dims)
            x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens)
            fns = {}
            for routing_name, balanced in (("random", False), ("balanced", True)):
                ids, weights = make_routing(n_tokens, n_experts, top_k, shared=shared, balanced=balanced)
                if not balanced:
                    counts = torch.bincount(ids.reshape(-1), minlength=n_experts)
                    print(f"{name} T={n_tokens} {describe(config)}\n  rows an expert (random): "
                          f"min {counts.min().item()}, mean {counts.float().mean().item():.1f}, "
                          f"max {counts.max().item()}", flush=True)
                for part, fn in gemm_parts(x, w13, w2, ids, weights, config).items():
                    fns[f"{part}.{routing_name}"] = fn
            for part, fn in balanced_bmm_parts(w13, w2, n_experts, math.ceil(n_tokens * top_k / n_experts)).items():
                fns[f"{part}.bmm"] = fn
            ceilings = ceiling_runs()
            us = time_many({**fns, **ceilings}, graph=set(fns))
            floors = floors_us(n_experts, hidden, ffn, n_tokens, top_k, rates(us))
            for part in ("gate_up", "down"):
                floor = max(floors[part])
                cells = ", ".join(f"{r} {us[f'{part}.{r}']:.1f} us ({100 * floor / us[f'{part}.{r}']:.0f}%)"
                                  for r in ("random", "balanced", "bmm"))
                print(f"  {part:8s} floor {floor:.1f} us: {cells}", flush=True)


if __name__ == "__main__":
    main()
