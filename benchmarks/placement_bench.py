"""Placement benchmark: speed and balance against DeepSeek's EPLB, and the gap to the MILP optimum.

    python benchmarks/placement_bench.py [--eplb-ref /tmp/eplb_ref/eplb.py] [--reps 7] [--milp-layers 6]

Part 1 times the two instances of issue 6 (58 layers onto 64 GPUs: 64 experts + 64 extra slots,
global policy; 256 experts in 8 groups over 8 nodes + 64 extra slots, hierarchical policy) and
compares balance (max/mean GPU load per layer) with DeepSeek's EPLB when its ``eplb.py`` is given
(``--eplb-ref`` or env ``MOEGPS_EPLB_REF``; it needs torch; it is not part of moegps). Loads: the
real DeepSeek-V2-Lite per-layer loads (26 layers, tiled to 58) when the shared data is there, and
lognormal synthetic loads (sigma 1.0). The "floor" is one argsort of the loads, which every greedy
pays. Part 2 measures the heuristics' gap to the exact optimum (scipy MILP) on small instances;
part 3 (``--real-milp``) does the same on the real Mixtral-8x7B counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np

from moegps.placement import split
from moegps.placement.balanced import balanced_duplication
from moegps.placement.hierarchical import hierarchical_duplication
from moegps.placement.metrics import balance_bound, placement_imbalance
from moegps.placement.optimal import optimal
from moegps.placement.placement import Placement


def median_time(fn, reps: int) -> tuple[float, object]:
    """Median wall seconds over ``reps`` calls (and the last result)."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def median_cpu(fn, reps: int) -> float:
    """Median process CPU seconds: less sensitive than wall time to other jobs on a shared machine."""
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times))


def load_eplb(path: str | None):
    if not path:
        return None
    if not os.path.exists(path):
        raise SystemExit(f"--eplb-ref {path}: no such file (expected DeepSeek's eplb.py)")
    spec = importlib.util.spec_from_file_location("deepseek_eplb_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def real_loads(layers: int) -> tuple[str, np.ndarray] | None:
    try:
        from moegps.importers.deepseek_csv import read_deepseek_csv
        from moegps.paths import shared_data

        t = read_deepseek_csv(shared_data("traces", "deepseek-v2-lite-puffin"), 100)
    except Exception as exc:  # the shared data is optional here
        print(f"(no DeepSeek-V2-Lite loads: {exc})")
        return None
    counts = t.loads(by="all").counts[0].astype(float)  # [26, 64]
    return "DeepSeek-V2-Lite real (26 layers tiled)", np.resize(counts, (layers, counts.shape[1]))


def part1(args, eplb):
    rng = np.random.default_rng(args.seed)
    L, G = 58, 64
    cases = []
    real = real_loads(L)
    if real is not None:
        cases.append((real[0], real[1], 64, 64, 1, 1))
    cases.append(("lognormal synthetic", rng.lognormal(0, 1.0, (L, 64)) * 1000, 64, 64, 1, 1))
    cases.append(("lognormal synthetic", rng.lognormal(0, 1.0, (L, 256)) * 1000, 256, 64, 8, 8))
    print(f"\n== Part 1: {L} layers onto {G} GPUs, median of {args.reps} runs, this machine "
          f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}) ==")
    head = f"{'loads':40s} {'experts':>7s} {'slots':>5s} {'policy':>12s} | {'moegps s':>8s} {'cpu s':>6s} {'floor s':>8s}"
    if eplb is not None:
        head += f" {'EPLB s':>8s} {'cpu s':>6s} {'speedup':>7s} | {'imb moegps':>10s} {'imb EPLB':>9s} {'max moegps':>10s} {'max EPLB':>9s} {'better':>6s} {'worse':>5s}"
    else:
        head += f" | {'imb moegps':>10s} {'max moegps':>10s}"
    print(head + f" {'bound':>6s}")
    for name, w, E, extra, nodes, groups in cases:
        S = (E + extra) // G
        if nodes == 1:
            fn = lambda: balanced_duplication(w, G, S)  # noqa: E731
        else:
            fn = lambda: hierarchical_duplication(w, G, S, nodes, groups)  # noqa: E731
        fn()  # warm-up
        t_mine, p = median_time(fn, args.reps)
        c_mine = median_cpu(fn, args.reps)
        t_floor, _ = median_time(lambda: np.argsort(-w, axis=1), args.reps)
        imb = placement_imbalance(p, w)
        bound = balance_bound(w, G, S) if nodes == 1 else np.full(L, np.nan)
        row = f"{name:40s} {E:7d} {S:5d} {'global' if nodes == 1 else f'hier {nodes}n':>12s} | {t_mine:8.4f} {c_mine:6.3f} {t_floor:8.5f}"
        if eplb is not None:
            import torch

            wt = torch.tensor(w)
            eplb.rebalance_experts(wt, E + extra, groups, nodes, G)  # warm-up
            ref_fn = lambda: eplb.rebalance_experts(wt, E + extra, groups, nodes, G)  # noqa: E731
            t_ref, out = median_time(ref_fn, max(3, args.reps // 2))
            c_ref = median_cpu(ref_fn, max(3, args.reps // 2))
            ref = placement_imbalance(Placement.from_eplb(out[0].numpy(), G, E), w)
            row += (f" {t_ref:8.4f} {c_ref:6.3f} {t_ref / t_mine:6.1f}x | {imb.mean():10.4f} {ref.mean():9.4f} {imb.max():10.4f} {ref.max():9.4f}"
                    f" {(imb < ref - 1e-9).sum():6d} {(imb > ref + 1e-9).sum():5d}")
        else:
            row += f" | {imb.mean():10.4f} {imb.max():10.4f}"
        print(row + (f" {bound.mean():6.4f}" if nodes == 1 else f" {'-':>6s}"))
    print("speedup = EPLB wall / moegps wall (same run, same machine); cpu = process CPU seconds")
    print("imb = mean over layers of max/mean GPU load (1 = even); max = worst layer; better/worse = layers where"
          " moegps beats/loses to EPLB; bound = mean over layers of the lowest reachable imbalance (global policy)")


def part2(args):
    rng = np.random.default_rng(args.seed + 1)
    print(f"\n== Part 2: gap to the MILP optimum (scipy HiGHS), {args.milp_layers} random lognormal layers per row ==")
    print(f"{'E':>3s} {'G':>3s} {'S':>3s} | {'greedy+search (even)':>22s} {'+16 restarts (even)':>20s} {'+restarts, load-prop. split':>28s} | "
          f"{'EPLB-style greedy':>18s} {'within 2%':>9s}")
    print(f"{'':11s} | {'gap to MILP even: mean/max %':>43s} {'gap to MILP free':>28s} | {'gap to even, mean %':>18s}")
    for E, G, extra in ((8, 2, 0), (8, 2, 1), (8, 2, 2), (8, 4, 0), (8, 4, 1), (8, 4, 2), (16, 4, 1), (16, 2, 1)):
        S = -(-E // G) + extra
        w = rng.lognormal(0, 1.0, (args.milp_layers, E)) * 1000
        _, even_opt = optimal(w, G, S, "even", time_limit=args.milp_time)
        _, free_opt = optimal(w, G, S, "free", time_limit=args.milp_time)
        h0 = placement_imbalance(balanced_duplication(w, G, S), w)
        h1p = balanced_duplication(w, G, S, restarts=16)
        h1 = placement_imbalance(h1p, w)
        h2 = placement_imbalance(split.load_proportional(h1p, w), w)
        g0 = balanced_duplication(w, G, S, refine=False)
        gr = placement_imbalance(g0, w)
        gap = lambda h, o: 100 * (h / o - 1)  # noqa: E731
        print(f"{E:3d} {G:3d} {S:3d} | {gap(h0, even_opt).mean():10.2f}/{gap(h0, even_opt).max():6.2f}"
              f"      {gap(h1, even_opt).mean():9.2f}/{gap(h1, even_opt).max():6.2f}"
              f"      {gap(h2, free_opt).mean():15.2f}/{gap(h2, free_opt).max():6.2f}      | {gap(gr, even_opt).mean():18.2f}"
              f" {(gap(h1, even_opt) <= 2 + 1e-9).mean() * 100:8.0f}%")
    print("even = replicas split tokens evenly (EPLB's model); free = the best split too; a MILP stopped by its time"
          " limit reports its incumbent (then the gap is understated)")


def part3(args):
    """The same yardstick on the real Mixtral-8x7B counts (olmoe-routing, layers 0, 7, 15)."""
    from moegps.importers.olmoe_routing import load_expert_counts

    w = load_expert_counts("mistral").counts.sum(0).astype(float)  # [3, 8]
    print("\n== Part 3: real Mixtral-8x7B counts (3 layers, 8 experts): heuristic vs MILP ==")
    print(f"{'G':>3} {'S':>3} | {'MILP even':>9} {'balanced':>8} {'+restarts':>9} {'max gap %':>9} | "
          f"{'MILP free':>9} {'+lp split':>9} {'max gap %':>9} | MILP s")
    for G, extra in ((2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (8, 1), (8, 2)):
        S = -(-8 // G) + extra
        t0 = time.perf_counter()
        _, even_opt = optimal(w, G, S, "even", time_limit=args.milp_time)
        _, free_opt = optimal(w, G, S, "free", time_limit=args.milp_time)
        seconds = time.perf_counter() - t0
        plain = placement_imbalance(balanced_duplication(w, G, S), w)
        best = balanced_duplication(w, G, S, restarts=16)
        h = placement_imbalance(best, w)
        lp = placement_imbalance(split.load_proportional(best, w), w)
        print(f"{G:3d} {S:3d} | {even_opt.mean():9.4f} {plain.mean():8.4f} {h.mean():9.4f} {100 * (h / even_opt - 1).max():9.2f} | "
              f"{free_opt.mean():9.4f} {lp.mean():9.4f} {100 * (lp / free_opt - 1).max():9.2f} | {seconds:.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eplb-ref", default=os.environ.get("MOEGPS_EPLB_REF"), help="path to DeepSeek's eplb.py (optional)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--milp-layers", type=int, default=6)
    ap.add_argument("--milp-time", type=float, default=20.0, help="seconds per layer")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-milp", action="store_true")
    ap.add_argument("--real-milp", action="store_true", help="also part 3: MILP on the real Mixtral counts (minutes)")
    args = ap.parse_args()
    if not args.skip_speed:
        part1(args, load_eplb(args.eplb_ref))
    if not args.skip_milp:
        part2(args)
    if args.real_milp:
        part3(args)


if __name__ == "__main__":
    main()
