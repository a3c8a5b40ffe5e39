"""Probe of the Hopper-only Gluon path (moegps/kernels/wgmma_moe.py) against the shipped Triton
config and cuBLAS bmm, on one H100/H200.

    python benchmarks/kernels/wgmma_probe.py [--shapes ...] [--tokens 512 2048 8192]
                                             [--variants ...] [--skip-checks] [--write-config]
                                             [--hang-seconds 150]

(`--tokens` with no values: the checks only.)

1. Checks: the wgmma path against an fp32 reference (relative error, the bench's rel_err) on
   random routing, routing that leaves experts empty, one expert for every token, and a few
   token counts that leave ragged blocks; a row fails above 1e-2.
2. Times (time_many: every method of a row in the same rounds, graphs, L2 flushed by a clean
   read): the shipped config ("ours"), wgmma variants (tiles below), balanced cuBLAS bmm, and the
   call's floor (bench.floors_us: weight bytes plus x read and the output written over the copy
   rate, or FLOPs over the 8192^3 matmul rate, both measured in the row's rounds);
   and each GEMM alone ("parts": the shipped launches and the wgmma ones, gather and combine).
3. `--write-config`: where the fastest wgmma variant beats the shipped config by >= 2% in the
   same rounds, it goes into the device's table (moegps/kernels/configs/<device>.json).

A check or row that takes longer than `--hang-seconds` (a kernel that never ends) ends the run
with "HUNG: <which>" on stderr and exit status 3 (deadline.py).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton

from moegps.kernels import launch, timing
from moegps.kernels.bench import balanced_bmm, ceiling_runs, floors_us, gemm_parts, rates
from moegps.kernels.launch import fused_moe, get_config
from moegps.kernels.reference import moe_reference
from moegps.kernels.timing import make_inputs, make_routing, rel_err, time_many
from moegps.kernels.tune import expert_dims, shared_columns, write_winners

from deadline import deadline  # (a sibling script: this folder is on the path when it runs)


def wgmma_config(block_m=128, gu_n=128, down_n=256, stages=4, group=8, block_k=64,
                 half_tail=False, dynamic=True, gather=0, one_launch=False) -> dict:
    tile = {"block_k": block_k, "num_stages": stages, "group_m": group, "dynamic": dynamic}
    gate_up = {"block_n": gu_n, **tile, **({"gather": gather} if gather else {})}
    return {"path": "wgmma", "block_m": block_m, "half_tail": half_tail,
            "gate_up": gate_up, "down": {"block_n": down_n, **tile},
            **({"one_launch": True} if one_launch else {})}


VARIANTS = {
    "w128": wgmma_config(),
    "ht": wgmma_config(half_tail=True),
    "ht_d128": wgmma_config(half_tail=True, down_n=128),
    "ht_d128_g16": wgmma_config(half_tail=True, down_n=128, group=16),
    # the gate/up producer, a warpgroup, gathering the token rows itself (cp.async; NOTES.md v21;
    # with one warp it was 5-18% slower everywhere, v22)
    "ht_ga": wgmma_config(half_tail=True, gather=4),
    # the tile order's group of row blocks (which tiles run side by side, sharing weight slabs and token
    # rows through L2) around the shipped 8
    "ht_ga_g4": wgmma_config(half_tail=True, gather=4, group=4),
    "ht_ga_g16": wgmma_config(half_tail=True, gather=4, group=16),
    "ht_ga_g32": wgmma_config(half_tail=True, gather=4, group=32),
    # both GEMMs in one launch, gate/up's h stored and counted by the producer (NOTES.md v43)
    "ht_1": wgmma_config(half_tail=True, one_launch=True),
    "ht_ga_1": wgmma_config(half_tail=True, gather=4, one_launch=True),
    "ht_ga_g4_1": wgmma_config(half_tail=True, gather=4, group=4, one_launch=True),
    "ht_ga_g16_1": wgmma_config(half_tail=True, gather=4, group=16, one_launch=True),
}


def parts(x, w13, w2, ids, weights, config) -> dict:
    """Each GEMM alone (the kernels bench's gemm_parts) and, for a wgmma config, its row gather
    and its gathering combine alone too."""
    timed = gemm_parts(x, w13, w2, ids, weights, config)
    if config["path"] == "wgmma":
        top_k = ids.shape[1]
        routing = launch.route(ids.reshape(-1), w13.shape[0], config)
        h = launch.wgmma_gate_up(x, w13, routing, config, top_k)
        y = launch.wgmma_down(h, w2, weights.reshape(-1), routing, config)  # (a swap entry's too)
        if not config["gate_up"].get("gather"):  # else its gate/up gathers the rows itself
            timed["gather"] = lambda: launch.gather_rows(x, routing, top_k)
        timed["combine"] = lambda: launch.combine_sum(y, top_k, slots=routing.pair_slot)
    return timed


def check(name, dims, n_tokens, routing_kind, seed) -> bool:
    n_experts, hidden, ffn, top_k = dims
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    ids, weights = make_routing(n_tokens, n_experts, top_k, seed, shared=shared_columns(name))
    if routing_kind == "empty_experts":  # only experts 0..k: most experts get no row
        ids = torch.stack([torch.randperm(top_k + 1, device="cuda")[:top_k]
                           for _ in range(n_tokens)])
    if routing_kind == "one_expert":
        ids = torch.zeros(n_tokens, 1, dtype=ids.dtype, device="cuda")
        weights = torch.ones(n_tokens, 1, dtype=weights.dtype, device="cuda")
    ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float()).float()
    ok = True
    outs = {}
    shipped = rel_err(fused_moe(x, w13, w2, ids, weights), ref)  # (the same for every variant)
    for variant in [v for v in ("w128", "ht", "ht_d128", "ht_ga", "ht_1", "ht_ga_1") if v in VARIANTS]:
        out = outs[variant] = fused_moe(x, w13, w2, ids, weights, config=VARIANTS[variant])
        err = rel_err(out, ref)
        good = err < 1e-2 and bool(torch.isfinite(out).all())
        # one launch runs the same tiles as two: the same output, bit for bit (and again: no race)
        two = outs.get(variant.removesuffix("_1")) if variant.endswith("_1") else None
        if two is not None:
            again = fused_moe(x, w13, w2, ids, weights, config=VARIANTS[variant])
            good &= bool(torch.equal(out, two)) and bool(torch.equal(again, two))
        ok &= good
        print(f"  check {name:18s} T={n_tokens:5d} {routing_kind:14s} {variant:7s} "
              f"rel_err {err:.2e} (shipped {shipped:.2e})"
              f"{'' if two is None else ', as two launches' if good else ', NOT as two launches'} "
              f"{'ok' if good else 'FAIL'}", flush=True)
    return ok


def bench_row(name, dims, n_tokens, seed) -> dict:
    n_experts, hidden, ffn, top_k = dims
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    ids, weights = make_routing(n_tokens, n_experts, top_k, seed, shared=shared_columns(name))
    active = int(torch.unique(ids).numel())
    fns = {"ours": lambda: fused_moe(x, w13, w2, ids, weights),
           "bmm": balanced_bmm(w13, w2, active, math.ceil(n_tokens * top_k / active))}
    for variant, config in VARIANTS.items():
        fns[variant] = (lambda c=config: fused_moe(x, w13, w2, ids, weights, config=c))
    shipped = get_config(n_tokens, *dims)
    for part, fn in parts(x, w13, w2, ids, weights, shipped).items():
        fns[f"ours.{part}"] = fn
    for variant in [v for v in ("w128", "ht_ga") if v in VARIANTS]:
        for part, fn in parts(x, w13, w2, ids, weights, VARIANTS[variant]).items():
            fns[f"{variant}.{part}"] = fn
    times = time_many({**fns, **ceiling_runs()}, graph=set(fns))
    rate = rates(times)
    floor = max(floors_us(active, hidden, ffn, n_tokens, top_k, rate)["call"])
    row = {"shape": name, "tokens": n_tokens, "floor_us": floor,
           "matmul_TFLOPs": rate["matmul_flops"] / 1e12, "shipped": get_config(n_tokens, *dims)["path"]}
    for method in ["ours", "bmm", *VARIANTS]:
        row[f"{method}_us"] = times[method]
        row[f"{method}_pct"] = 100 * floor / times[method]
    row["parts"] = {k: round(v, 1) for k, v in times.items() if "." in k}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["mixtral-8x7b", "deepseek-v2-lite"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--seed", type=int, default=50)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS),
                        help="time (and check) only these wgmma variants")
    parser.add_argument("--hang-seconds", type=float, default=150,
                        help="end the run, saying where, when one check or row takes longer (a hung kernel)")
    parser.add_argument("--write-config", action="store_true",
                        help="where the best wgmma variant beats the shipped config by >= 2%%, "
                             "write it into configs/<device>.json for that shape and token count")
    args = parser.parse_args(argv)
    for name in set(VARIANTS) - set(args.variants or VARIANTS):
        del VARIANTS[name]
    timing.FLUSH = "clean"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    ok = True
    if not args.skip_checks:
        for name in args.shapes:
            dims = expert_dims(name)
            for n_tokens, kind in [(1, "random"), (7, "random"), (300, "random"),
                                   (2048, "random"), (8192, "random"), (200, "empty_experts"),
                                   (333, "one_expert")]:
                with deadline(args.hang_seconds, f"check {name} T={n_tokens} {kind}"):
                    ok &= check(name, dims, n_tokens, kind, args.seed)
        print("checks:", "all ok" if ok else "FAILED", flush=True)
    rows = []
    for name in args.shapes:
        for n_tokens in args.tokens:
            with deadline(args.hang_seconds, f"timing {name} T={n_tokens}"):
                row = bench_row(name, expert_dims(name), n_tokens, args.seed)
            rows.append(row)
            print(f"{name} T={n_tokens}: floor {row['floor_us']:.1f} us "
                  f"(matmul {row['matmul_TFLOPs']:.0f} TFLOP/s); " + ", ".join(
                      f"{m} {row[m + '_us']:.1f} us {row[m + '_pct']:.0f}%"
                      for m in ["ours", "bmm", *VARIANTS]) + f"; parts (us) {row['parts']}",
                  flush=True)
    if args.write_config and ok:
        write_winners(rows, VARIANTS, " ".join(["python benchmarks/kernels/wgmma_probe.py", *(argv or sys.argv[1:])]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
