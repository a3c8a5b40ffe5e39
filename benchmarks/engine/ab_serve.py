"""Two serving runs of the same requests, B over A, run by run: measured, and the simulator's prediction beside it.

    python -m moegps.engine.serve ... --free-rows token0 --out A.csv
    python -m moegps.engine.serve ... --free-rows alias --out B.csv
    python benchmarks/engine/ab_serve.py A.csv B.csv --predicted SIM_A.csv SIM_B.csv

For each (rate, policy): throughput, median time to first token, median time per output token and median
latency of B over A (below 1 is shorter for the times), measured, then predicted where ``--predicted`` gives the
simulator's CSVs (``python -m moegps.simulator.serving --out``) of the same two settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plot_serve import runs

KEYS = (("tokens_per_s", "tokens/s"), ("ttft_p50_ms", "TTFT p50"), ("tpot_p50_ms", "TPOT p50"),
        ("latency_p50_ms", "latency p50"))


def ratios(a: dict, b: dict) -> dict[tuple[float, str], dict[str, float]]:
    """{(rate, policy): {key: B / A}} over the runs both hold (``plot_serve.runs``'s nesting)."""
    return {(rate, policy): {k: b[policy][rate][k] / a[policy][rate][k] for k, _ in KEYS}
            for policy in a for rate in a[policy] if rate in b.get(policy, {})}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--predicted", type=Path, nargs=2, default=None, metavar=("SIM_A", "SIM_B"))
    args = ap.parse_args(argv)
    measured = ratios(runs(args.a), runs(args.b))
    predicted = ratios(*(runs(p) for p in args.predicted)) if args.predicted else {}
    label = " (measured / predicted)" if predicted else ""
    print(f"{args.b} over {args.a}{label}")
    print("| rate/s | policy | " + " | ".join(name for _, name in KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    for rate, policy in sorted(measured):
        m, p = measured[rate, policy], predicted.get((rate, policy))
        cells = [f"{m[k]:.3f}" + (f" / {p[k]:.3f}" if p else "") for k, _ in KEYS]
        print(f"| {rate:g} | {policy} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
