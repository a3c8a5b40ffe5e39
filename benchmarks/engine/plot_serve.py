"""Continuous against static batching over offered load, from the CSV of `python -m moegps.engine.serve --out`:

    python -m moegps.engine.serve --requests 48 --rate 1 2 4 8 --max-batch 8 --max-new-tokens 64 --out RUN.csv
    python benchmarks/engine/plot_serve.py RUN.csv --title "mixtral-tiny, CPU" --out docs/img/serve-cpu.png

Four panels against the arrival rate: throughput (new tokens a second, with the run's decode ceiling
dotted), time to first token, time per output token and end-to-end latency (median; the 90th percentile
dashed), one line per policy. With `--simulated SIM.csv` (`python -m moegps.simulator.serving --out`, the same
requests in the cost model's time) each policy's simulated medians are drawn beside the measured ones (dotted,
crosses) in place of the 90th percentiles, and a table of both with the simulated over the measured is printed:

    python benchmarks/engine/plot_serve.py RUN.csv --simulated SIM.csv --out serve-vs-sim.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from moegps.engine.serve import served_by_run, summarize  # noqa: E402

COLOURS = {"continuous": "tab:orange", "chunked": "tab:blue", "static": "tab:gray"}
FIELDS = ("rate", "policy", "request", "new_tokens", "arrival_s", "first_token_s", "finish_s")


def runs(path: Path) -> dict[str, dict[float, dict[str, float]]]:
    """{policy: {rate: summarize(...)}} from the serve command's CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in FIELDS if rows and k not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected the CSV of `python -m moegps.engine.serve --out` with columns "
                         f"{', '.join(FIELDS)}; {'no rows' if not rows else f'missing {missing}'}")
    out: dict[str, dict[float, dict[str, float]]] = defaultdict(dict)
    for (policy, rate), served in sorted(served_by_run(rows).items()):
        out[policy][rate] = summarize(served)
    return out


def ceiling_of(path: Path) -> float | None:
    """The run's decode ceiling (new tokens/s), from the CSV's decode_ceiling column when it has one."""
    with open(path, newline="") as f:
        row = next(csv.DictReader(f), {})
    return float(row["decode_ceiling"]) if row.get("decode_ceiling") else None


def print_comparison(measured: dict, simulated: dict) -> None:
    """Each (rate, policy) run's medians, measured and simulated, and simulated / measured."""
    keys = (("tokens_per_s", "tokens/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("tpot_p50_ms", "TPOT p50 ms"),
            ("latency_p50_ms", "latency p50 ms"))
    print(f"{'rate':>6} {'policy':<11}" + "".join(f" {label + ': measured / simulated (x)':>44}" for _, label in keys))
    for rate in sorted({r for by_rate in measured.values() for r in by_rate}):
        for policy in (p for p in COLOURS if rate in measured.get(p, {}) and rate in simulated.get(p, {})):
            m, s = measured[policy][rate], simulated[policy][rate]
            cells = "".join(f" {m[k]:>18.1f} / {s[k]:>9.1f} ({s[k] / m[k]:.2f}x)" for k, _ in keys)
            print(f"{rate:>6g} {policy:<11}{cells}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--simulated", type=Path, default=None,
                    help="CSV of `python -m moegps.simulator.serving --out` for the same requests, drawn beside")
    ap.add_argument("--ceiling", type=float, default=None,
                    help="the decode ceiling (new tokens/s) where the CSV has no decode_ceiling column")
    args = ap.parse_args(argv)
    data = runs(args.csv)
    simulated = runs(args.simulated) if args.simulated else {}
    if simulated:
        print_comparison(data, simulated)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9))
    for policy, by_rate in sorted(data.items()):
        colour = COLOURS.get(policy, "tab:gray")
        rates = sorted(by_rate)
        figure = {k: [by_rate[r][k] for r in rates] for k in by_rate[rates[0]]}
        axes[0].plot(rates, figure["tokens_per_s"], "o-", color=colour, label=policy)
        axes[2].plot(rates, figure["tpot_p50_ms"], "o-", color=colour, label=f"{policy} median")
        for ax, key in ((axes[1], "ttft"), (axes[3], "latency")):
            ax.plot(rates, [v / 1e3 for v in figure[f"{key}_p50_ms"]], "o-", color=colour, label=f"{policy} median")
            if not simulated:
                ax.plot(rates, [v / 1e3 for v in figure[f"{key}_p90_ms"]], "o--", color=colour, alpha=0.5,
                        label=f"{policy} p90")
    for policy, by_rate in sorted(simulated.items()):
        colour = COLOURS.get(policy, "tab:gray")
        rates = sorted(by_rate)
        figure = {k: [by_rate[r][k] for r in rates] for k in by_rate[rates[0]]}
        axes[0].plot(rates, figure["tokens_per_s"], "x:", color=colour, label=f"{policy} simulated")
        axes[2].plot(rates, figure["tpot_p50_ms"], "x:", color=colour, label=f"{policy} simulated")
        for ax, key in ((axes[1], "ttft"), (axes[3], "latency")):
            ax.plot(rates, [v / 1e3 for v in figure[f"{key}_p50_ms"]], "x:", color=colour, label=f"{policy} simulated")
    labels = ("new tokens / s", "time to first token (s)", "time per output token (ms)", "request latency (s)")
    for ax, label in zip(axes, labels):
        ax.set_xlabel("arrival rate (requests / s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (axes[1], axes[3]):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ceiling = args.ceiling or ceiling_of(args.csv)
    if ceiling:
        axes[0].axhline(ceiling, color="k", ls=":", lw=1)
        axes[0].text(0.02, ceiling, "decode ceiling", transform=axes[0].get_yaxis_transform(), va="bottom", fontsize=8)
    fig.suptitle(args.title or args.csv.parent.name)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
