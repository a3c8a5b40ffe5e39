"""The weights-as-rows Gluon kernels (moegps/kernels/wgmma_swap.py) against the shipped config and
cuBLAS's batched GEMM, checked and timed in the same rounds.

    python benchmarks/kernels/swap_probe.py [--shapes deepseek-v2-lite mixtral-8x7b] \
        [--tokens 512 2048 8192] [--variants 6x32 6x32:160/32] [--groups 8] [--skip-checks] [--write-config]

Checks first (unless --skip-checks): whole calls (routing, row gather, both GEMMs, k-way combine)
against the fp32 reference at 1, 7, 100 and 2048 tokens (empty experts, blocks of every height the
variant's padding gives), one expert for all, and balanced routing, for every variant. Then for each (shape, tokens): the medians of
time_many (interleaved rounds, CUDA graphs, L2 flushed by a clean read) of each GEMM launch and
of the whole call, for every variant and for the shipped config, beside cuBLAS's bmm of the same
projections on balanced rows, each as % of the floor measured in the same rounds (the bench's:
weight + io bytes over the copy rate, or FLOPs over the 8192^3 matmul rate, the larger). One
NVIDIA Hopper GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import torch

import carried
from moegps.kernels import timing
from moegps.kernels.bench import balanced_bmm_parts, ceiling_runs, floors_us, gemm_parts, rates
from moegps.kernels.launch import fused_moe, get_config
from moegps.kernels.reference import moe_reference
from moegps.kernels.timing import make_inputs, make_routing, rel_err, time_many
from moegps.kernels.tune import describe, expert_dims, shared_columns, write_winners


def variant(spec: str, group: int) -> dict:
    """A swap config from "STAGESxBLOCK_K[:BLOCK_M/PAD_M[o]]" (block_m 192, pad_m 64 where not given;
    "o": blocks of 160 or 192 rows as one MMA, `one`)."""
    tiles, _, block = spec.partition(":")
    stages, block_k = map(int, tiles.split("x"))
    block_m, pad_m = map(int, (block.rstrip("o") or "192/64").split("/"))
    tile = {"block_k": block_k, "num_stages": stages, "group_m": group}
    config = {"path": "wgmma", "swap": True, "block_m": block_m, "pad_m": pad_m,
              "gate_up": dict(tile), "down": dict(tile)}
    if block.endswith("o"):  # blocks of 160 or 192 rows as one MMA
        config["one"] = True
    return config


def checks(configs) -> bool:
    ok = True
    for name in ("deepseek-v2-lite", "mixtral-8x7b"):
        n_experts, hidden, ffn, top_k = expert_dims(name)
        for n_tokens, how in ((1, "random"), (7, "random"), (100, "random"), (2048, "random"),
                              (300, "one expert"), (2048, "balanced")):
            x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed=3)
            ids, weights = make_routing(n_tokens, n_experts, top_k, seed=3, balanced=how == "balanced")
            if how == "one expert":  # every token's first choice the same expert
                ids[:, 0] = 5
                ids[:, 1:] = (ids[:, 1:] % (n_experts - 6)) + 6
            ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float())
            for label, config in configs.items():
                err = rel_err(fused_moe(x, w13, w2, ids, weights, config=config), ref)
                good = err < 1e-2
                ok &= good
                print(f"  check {name} T={n_tokens} {how} {label}: rel err {err:.2e} "
                      f"{'ok' if good else 'FAILED'}", flush=True)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["deepseek-v2-lite", "mixtral-8x7b"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--groups", type=int, nargs="*", default=[8])
    parser.add_argument("--variants", nargs="*", default=["3x64", "6x32"],
                        help="each variant's STAGESxBLOCK_K[:BLOCK_M/PAD_M[o]] (block_m 192, pad_m 64 if not "
                             "given; o: blocks of 160 or 192 rows as one MMA)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--cubins", help="where this Triton cannot compile the one-MMA kernels: the folder "
                        "benchmarks/kernels/carried.py compiled them into")
    parser.add_argument("--write-config", action="store_true",
                        help="where the fastest variant's whole call beats the shipped config's by >= 2%%, "
                             "write it into configs/<device>.json for that shape and token count")
    args = parser.parse_args(argv)
    timing.FLUSH = "clean"
    if args.cubins:
        carried.install(args.cubins)
    configs = {f"s{v}g{g}": variant(v, g) for v in args.variants for g in args.groups}
    print(f"device: {torch.cuda.get_device_name()}")
    if not args.skip_checks and not checks(configs):
        raise SystemExit("a check failed")
    rows = []
    for name in args.shapes:
        n_experts, hidden, ffn, top_k = dims = expert_dims(name)
        for n_tokens in args.tokens:
            shipped = get_config(n_tokens, *dims)
            x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens)
            ids, weights = make_routing(n_tokens, n_experts, top_k, shared=shared_columns(name))
            ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float())
            fns = {"shipped.call": lambda: fused_moe(x, w13, w2, ids, weights, config=shipped)}
            errs = {"shipped": rel_err(fns["shipped.call"](), ref)}
            for part, fn in gemm_parts(x, w13, w2, ids, weights, shipped).items():
                fns[f"shipped.{part}"] = fn
            for label, config in configs.items():
                fns[f"{label}.call"] = functools.partial(fused_moe, x, w13, w2, ids, weights, config=config)
                errs[label] = rel_err(fns[f"{label}.call"](), ref)
                for part, fn in gemm_parts(x, w13, w2, ids, weights, config).items():
                    fns[f"{label}.{part}"] = fn
            active = int(torch.unique(ids).numel())
            for part, fn in balanced_bmm_parts(w13, w2, active, math.ceil(n_tokens * top_k / active)).items():
                fns[f"bmm.{part}"] = fn
            us = time_many({**fns, **ceiling_runs()}, graph=set(fns))
            floors = {part: max(f) for part, f in floors_us(active, hidden, ffn, n_tokens, top_k, rates(us)).items()}
            print(f"{name} T={n_tokens}: shipped {describe(shipped)}; errors "
                  + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
            for part in ("call", "gate_up", "down"):
                cells = ", ".join(f"{label} {us[f'{label}.{part}']:.1f} us ({100 * floors[part] / us[f'{label}.{part}']:.0f}%)"
                                  for label in ["shipped", *configs, "bmm"] if f"{label}.{part}" in us)
                print(f"  {part:8s} floor {floors[part]:.1f} us: {cells}", flush=True)
            rows.append({"shape": name, "tokens": n_tokens, "ours_us": us["shipped.call"],
                         **{f"{label}_us": us[f"{label}.call"] for label in configs}})
    if args.write_config:
        write_winners(rows, configs, " ".join(["python benchmarks/kernels/swap_probe.py", *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    main()
