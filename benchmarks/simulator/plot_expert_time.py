"""Speedup over static placement per plan, the expert part modelled against measured: one panel a trace.

Reads what `python -m moegps.simulator` prints (its plan table), so that runs made on a lent GPU whose
files did not all come back can still be drawn side by side:

    python benchmarks/simulator/plot_expert_time.py --out docs/img/expert-time-h200.png \
        "decode-dominated (mmlu-5000)|roofline=RUN.log" "decode-dominated (mmlu-5000)|kernels=RUN.log" ...

Each argument is "PANEL|LABEL=LOG"; bars keep the order the labels first appear in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLANS = {"oracle_placement": "balanced,\ntrue loads", "global_profile": "global_profile\n(distribution)",
         "step_profile": "step_profile\n(distribution)", "token_table": "token_table\n(token)",
         "oracle": "oracle\n(bound)"}


def plan_speedups(log: Path) -> dict[str, float]:
    """{plan: speedup over static} from a simulator run's printed table. A run whose expert part was
    measured (its log says "expert time measured on") is recomputed from its parts, without the layer's
    fixed overhead (the total less expert, dispatch, combine, other, predictor and migration): runs
    before session ag (2026-12-06) added it to timed calls that already hold it; since then it is 0
    there and the recomputation changes nothing. A modelled run's own speedups are read as printed."""
    text = log.read_text()
    measured = "expert time measured on" in text
    out, table = {}, False
    for line in text.splitlines():
        if line.startswith("plan "):
            table = True
        elif table and line.startswith("wrote "):
            break
        elif table and line.split():
            fields = line.split()
            out[fields[0]] = sum(map(float, fields[3:9])) if measured else float(fields[-1])
    if not out:
        raise ValueError(f"{log}: no plan table (the lines between 'plan ...' and 'wrote ...' of the simulator)")
    return {plan: out["static"] / ms for plan, ms in out.items()} if measured else out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help='"PANEL|LABEL=LOG"')
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS), help="plans drawn, in this order")
    ap.add_argument("--ylim", type=float, nargs=2, default=(0.5, 1.3))
    args = ap.parse_args(argv)
    plans = {plan: PLANS[plan] for plan in args.plans}
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for run in args.runs:
        panel, rest = run.split("|", 1)
        label, log = rest.split("=", 1)
        panels.setdefault(panel, {})[label] = plan_speedups(Path(log))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (panel, runs) in zip(axes[0], panels.items()):
        x = np.arange(len(plans))
        width = 0.8 / len(runs)
        for i, (label, speedups) in enumerate(runs.items()):
            values = [speedups.get(plan, np.nan) for plan in plans]
            bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(x, list(plans.values()), fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_ylim(*args.ylim)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("speedup over static placement (end to end)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(args.out)


if __name__ == "__main__":
    main()
