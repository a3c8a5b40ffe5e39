"""At what SM clock each MoE call runs when it runs alone: a GPU probe.

The kernels bench times ours, cuBLAS's bmm and the floor's 8192^3 matmul interleaved, one call of
each a round with an L2 flush between, and samples the SM clock over the whole row (timing.gpu_clocks):
a clock the row's mix set, not each call's own. Under load an H200 runs its SM below the top clock
(the bench's rows read 1440-1980 MHz at 300-690 W), and a kernel bound by the tensor cores or L2 runs
at that clock. The 64 experts' one launch ran its K loops at the tensor cores' rate *for the clock it
ran at*, 1.53 GHz at 8192 tokens (NOTES.md, session 21's timeline), yet reads 83% of the floor where
bmm reads 97%. Whether each call holds a different clock is what this asks: each method's CUDA graph
is replayed back to back for --ms milliseconds (no flush: the steady state of that call alone) while
nvidia-smi samples the SM clock and power every 20 ms, in --rounds rounds of every method.

    python benchmarks/kernels/clock_probe.py [--shapes deepseek-v2-lite mixtral-8x7b]
                                             [--tokens 2048 8192 16384] [--ms 300] [--out DIR]

prints, per (shape, tokens, method), the median time a call, the SM clock (median, least) and power
while it ran, and the call in SM cycles (time x clock): where ours' time over bmm's is larger than
its cycles over bmm's, the difference is the clock. nvidia-smi's power.draw is an average over about
a second, so at blocks of 300 ms it still holds part of the method before (session ak's first round
read ours at 226 W after the idle start, its second 698 W); the clock is sampled as it is. GPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from moegps.kernels.bench import balanced_bmm, ceiling_runs, gemm_launches
from moegps.kernels.launch import fused_moe, get_config
from moegps.kernels.timing import capture, gpu_clocks, make_inputs, make_routing
from moegps.kernels.tune import expert_dims, shared_columns


def run_alone(graph, ms: float) -> tuple[float, dict]:
    """(us a call, clocks) of `graph` replayed back to back for about `ms` milliseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    n = max(5, int(ms / max(start.elapsed_time(end), 1e-3)))
    for _ in range(3):  # warm-up
        graph.replay()
    torch.cuda.synchronize()
    with gpu_clocks(period_ms=20) as clocks:
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) * 1e3 / n, clocks


def probe_row(name: str, n_tokens: int, ms: float, rounds: int, seed: int) -> list[dict]:
    """Each method's calls alone, `rounds` times in turn: one record a method and round."""
    n_experts, hidden, ffn, top_k = expert_dims(name)  # the kernels bench's names: NAME+shared, NAME@N too
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    ids, weights = make_routing(n_tokens, n_experts, top_k, seed, shared=shared_columns(name))
    config = get_config(n_tokens, n_experts, hidden, ffn, top_k)
    active = int(torch.unique(ids).numel())
    methods = {"ours": lambda: fused_moe(x, w13, w2, ids, weights, config=config),
               "bmm": balanced_bmm(w13, w2, active, math.ceil(n_tokens * top_k / active)),
               "matmul": ceiling_runs()["matmul"]}
    if config["path"] != "fused":
        methods["gemms"] = gemm_launches(x, w13, w2, ids, weights, config)
    graphs = {method: capture(fn) for method, fn in methods.items()}
    flops = {"matmul": 2 * 8192**3}
    flops.update({m: 2 * n_tokens * top_k * 3 * hidden * ffn for m in ("ours", "bmm", "gemms")})
    records = []
    for r in range(rounds):
        for method, graph in graphs.items():
            us, clocks = run_alone(graph, ms)
            records.append({"shape": name, "tokens": n_tokens, "method": method, "round": r,
                            "us": us, "kcycles": us * clocks["sm_MHz"] / 1e3,
                            "TFLOPs": flops[method] / us * 1e-6, **clocks})
    return records


def summarise(records: list[dict]) -> list[dict]:
    """One line per (shape, tokens, method): medians over the rounds, and each against bmm and the
    matmul's rate in time and in cycles."""
    keys = sorted({(r["shape"], r["tokens"]) for r in records})
    lines = []
    for shape, tokens in keys:
        rows = [r for r in records if (r["shape"], r["tokens"]) == (shape, tokens)]
        med = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            med[method] = {f: statistics.median(r[f] for r in mine)
                           for f in ("us", "kcycles", "TFLOPs", "sm_MHz", "sm_MHz_min", "power_W")}
        for method, m in med.items():
            line = {"shape": shape, "tokens": tokens, "method": method, **m}
            line["time_vs_bmm"] = m["us"] / med["bmm"]["us"]
            line["cycles_vs_bmm"] = m["kcycles"] / med["bmm"]["kcycles"]
            # the matmul's rate, in FLOPs a cycle, as the floor: in time at its own clock, in cycles at any
            line["pct_rate"] = 100 * m["TFLOPs"] / med["matmul"]["TFLOPs"]
            line["pct_rate_cycles"] = line["pct_rate"] * m["sm_MHz"] / med["matmul"]["sm_MHz"]
            lines.append(line)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite", "mixtral-8x7b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192, 16384])
    ap.add_argument("--ms", type=float, default=300.0, help="milliseconds of each method's calls a round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--out", type=Path, default=None, help="folder for clock_probe.json")
    args = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    records = []
    for name in args.shapes:
        for n_tokens in args.tokens:
            records += probe_row(name, n_tokens, args.ms, args.rounds, args.seed)
            torch.cuda.empty_cache()
    lines = summarise(records)
    fields = ("us", "sm_MHz", "sm_MHz_min", "power_W", "kcycles", "TFLOPs", "time_vs_bmm",
              "cycles_vs_bmm", "pct_rate", "pct_rate_cycles")
    print("| shape | tokens | method | " + " | ".join(fields) + " |")
    print("|" + "---|" * (3 + len(fields)))
    for line in lines:
        print(f"| {line['shape']} | {line['tokens']} | {line['method']} | "
              + " | ".join(f"{line[f]:.3g}" if f in ("time_vs_bmm", "cycles_vs_bmm") else f"{line[f]:.1f}"
                           for f in fields) + " |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "clock_probe.json").write_text(json.dumps({"records": records, "summary": lines},
                                                               indent=1))


if __name__ == "__main__":
    main()
