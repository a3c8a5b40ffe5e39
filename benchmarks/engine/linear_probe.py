"""The decode projections on a GPU: the engine's skinny linear kernel against cuBLAS (torch's matmul),
with and without programmatic dependent launch (PDL), per weight shape and batch; the kernel's
launch settings swept (why LINEAR_DEFAULTS in moegps/engine/kernels.py).

    PYTHONPATH=. python benchmarks/engine/linear_probe.py [--sweep]

A time is the median over 10 replays of a CUDA graph of 24 back-to-back products (router_probe.graph_us),
each on the next of enough weight copies (>= 400 MB) that none is still in L2 when it comes round again,
as in a decode step.
Floor: the weight bytes over the copy rate measured here. The skinny kernel is timed with programmatic
dependent launch (moegps.kernels.pdl) off and on: the difference is what the 24 launch boundaries cost.
Every product is first checked against an fp32 matmul of the same bf16 inputs.
"""

import argparse
import itertools
import os
from unittest import mock

import torch
import triton

from moegps.engine import kernels as K
from moegps.executor.generate import copy_bandwidth
from moegps.shapes import from_name
from router_probe import graph_us, print_ranking  # this folder's: the scripts run from it

CALLS = 24


def projections(name: str) -> dict[str, tuple[int, int]]:
    """Weight shapes [N, K] of a decode step's projections."""
    s = from_name(name)
    return {f"{name} qkv": ((s.n_heads + 2 * s.n_kv_heads) * s.head_dim, s.hidden),
            f"{name} out": (s.hidden, s.n_heads * s.head_dim), f"{name} lm_head": (s.vocab_size, s.hidden)}


def rotating_us(fn, weights: list[torch.Tensor]) -> float:
    """Median us per product of CALLS products fn(w), w walking through ``weights``, as one CUDA graph."""
    walk = itertools.cycle(weights)
    return graph_us(lambda: fn(next(walk)), calls=CALLS)


SWEEP = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
         for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "deepseek-v2-lite"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--sweep", action="store_true",
                    help="time every SWEEP setting too (the first shape's weights, batch 1 and 8)")
    args = ap.parse_args()
    rate = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {rate / 1e12:.2f} TB/s; "
          f"defaults {K.LINEAR_DEFAULTS}")
    print("| weight [N, K] | batch | cuBLAS us | skinny us | skinny, PDL us | floor us | cuBLAS % | skinny, PDL % | "
          "max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    sweep_rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (N, Kd) in {k: v for s in args.shapes for k, v in projections(s).items()}.items():
        copies = max(2, -(-400_000_000 // (N * Kd * 2)))
        weights = [torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16, generator=gen) * Kd ** -0.5
                   for _ in range(copies)]
        floor = N * Kd * 2 / rate * 1e6
        for T in args.batches:
            x = torch.randn(T, Kd, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = x.float() @ weights[0].float().T
            err = ((K.linear(x, weights[0]).float() - ref).abs().max() / ref.abs().max()).item()
            cublas = rotating_us(lambda w: x @ w.T, weights)
            us = {}
            for mode in ("0", "1"):
                with mock.patch.dict(os.environ, {"MOEGPS_PDL": mode}):
                    us[mode] = rotating_us(lambda w: K.linear(x, w), weights)
            print(f"| {name} [{N}, {Kd}] | {T} | {cublas:.2f} | {us['0']:.2f} | {us['1']:.2f} | {floor:.2f} | "
                  f"{100 * floor / cublas:.1f} | {100 * floor / us['1']:.1f} | {err:.1e} |", flush=True)
            if args.sweep and T in (1, 8) and name.startswith(args.shapes[0]):
                for s in SWEEP:
                    try:
                        t = rotating_us(lambda w: K.linear(x, w, **s), weights)
                    except triton.runtime.errors.OutOfResources:
                        continue
                    sweep_rows.append((name, T, t, 100 * floor / t, s))
        del weights
        torch.cuda.empty_cache()
    if sweep_rows:
        print("\nbest settings per weight and batch (skinny, PDL as the environment says):")
        for (name, T), rows in itertools.groupby(sweep_rows, key=lambda r: r[:2]):
            rows = sorted(rows, key=lambda r: r[2])
            print(f"{name} batch {T}: " + "; ".join(f"{us:.2f} us ({pct:.0f}%) {s}" for _, _, us, pct, s in rows[:3]))
        print_ranking([(s, us) for _, _, us, _, s in sweep_rows], K.LINEAR_DEFAULTS)


if __name__ == "__main__":
    main()
