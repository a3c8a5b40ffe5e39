"""Top-1 calls on a k-way table: what an expert-parallel rank's compacted rows run (GPU).

An expert-parallel rank computes the tokens whose k experts are not all its own one row per selection,
top-1 (executor.layer.expert_compute), and so does the simulator's kernel timer. No table is tuned for
top-1, so such calls took the default config; `launch.get_config` now serves them the same experts'
k-way entry with as many selections. For each shape and selection count: the call checked against the
fp32 reference, then timed (CUDA graph, clean L2 flush, in rounds) with the config it now gets and with
the default config, beside the floor (active experts' weight bytes over the copy rate, FLOPs over the
matmul rate, both measured in the same rounds):

    python benchmarks/kernels/top1_probe.py [--shapes mixtral-8x7b deepseek-v2-lite] [--selections 2 16 ...]
                                            [--experts N [--slots]]
"""

from __future__ import annotations

import argparse

import torch

from moegps.kernels import timing
from moegps.kernels.bench import ceiling_runs, floors_us, rates
from moegps.kernels.launch import default_config, fused_moe, get_config
from moegps.kernels.reference import moe_reference
from moegps.kernels.tune import expert_dims


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "deepseek-v2-lite"])
    ap.add_argument("--selections", type=int, nargs="+", default=[2, 16, 64, 256, 1024, 4096, 12288])
    ap.add_argument("--experts", type=int, default=None,
                    help="the picks on the first N experts only: one GPU's share under expert parallelism")
    ap.add_argument("--slots", action="store_true",
                    help="with --experts: the weights of those N experts only, as an expert-parallel rank "
                         "holds them (no table is tuned for so few experts: both columns are the default config)")
    args = ap.parse_args(argv)
    timing.FLUSH = "clean"
    ceiling = ceiling_runs()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':<17} {'sel':>6} {'active':>6} {'served':<14} {'rel_err':>8} {'served_us':>10} "
          f"{'default_us':>10} {'floor_us':>9} {'%floor':>7} {'vs_default':>10}")
    for name in args.shapes:
        E, H, F, k = expert_dims(name)
        x_all, w13_all, w2_all = timing.make_inputs(E, H, F, k, max(args.selections), seed=1)
        for n in args.selections:
            ids = timing.make_routing(-(-n // k), E, k, seed=n)[0].reshape(-1)[:n, None]  # k-way picks, a row each
            if args.experts:
                ids = ids % args.experts
            x, gates = x_all[:n], torch.ones(n, 1, device="cuda", dtype=x_all.dtype)
            experts = args.experts if args.slots else E
            w13, w2 = w13_all[:experts], w2_all[:experts]
            served, default = get_config(n, experts, H, F, 1), default_config(n, experts, H, F, 1)
            out = fused_moe(x, w13, w2, ids, gates, config=served)
            ref = moe_reference(x.float(), w13.float(), w2.float(), ids, gates.float())
            err = timing.rel_err(out, ref)
            active = int(torch.unique(ids).numel())
            times = timing.time_many({**ceiling,
                                      "served": lambda: fused_moe(x, w13, w2, ids, gates, config=served),
                                      "default": lambda: fused_moe(x, w13, w2, ids, gates, config=default)},
                                     graph={"served", "default"})
            floor = max(floors_us(active, H, F, n, 1, rates(times))["call"])
            print(f"{name:<17} {n:>6} {active:>6} {served['path'] + '/' + str(served['block_m']):<14} {err:8.1e} "
                  f"{times['served']:10.1f} {times['default']:10.1f} {floor:9.1f} "
                  f"{100 * floor / times['served']:6.0f}% {times['default'] / times['served']:9.2f}x")
            if not err < 1e-2:
                raise SystemExit(f"{name} at {n} selections: relative error {err:.1e} against the fp32 reference")


if __name__ == "__main__":
    main()
