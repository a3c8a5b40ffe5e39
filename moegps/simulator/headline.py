"""The MoE-GPS headline across traces in one figure: the guide's gain of the best distribution-only
over the best token-to-expert predictor against batch size, one line per link bandwidth.

``python -m moegps.simulator.headline LABEL=outputs/guide/<run>/decision.csv ... --out docs/img/simulator-headline.png``

Each argument is ``label=path`` of a ``decision.csv`` written by ``python -m moegps.simulator.guide``;
panels go by label (columns) and the file's attention mode (rows). A dashed line marks MoE-GPS's
reported 23% (Mixtral-8x7B / MMLU), so whether a cell reaches it can be read off directly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from ..files import save_png

MOE_GPS_CLAIM = 0.23  # MoE-GPS (arXiv 2506.07366): distribution-only beats token-to-expert by "more than 23%"


def read_decisions(specs: list[str]) -> pd.DataFrame:
    """``label=path`` specs -> one frame of their decision rows with a ``label`` column."""
    frames = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"argument {spec!r}: expected label=path/to/decision.csv")
        frame = pd.read_csv(path)
        missing = {"batch_size", "link_gbps", "attention", "gain_dist_over_token"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: not a guide decision table (columns {sorted(missing)} missing)")
        frames.append(frame.assign(label=label))
    return pd.concat(frames, ignore_index=True)


def plot_headline(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Gain (%) vs batch size; columns = ``label`` (in the order given), rows = attention mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(table["label"]))
    modes = [m for m in ("dp", "tp") if m in set(table["attention"])]
    bandwidths = sorted(table["link_gbps"].unique())
    batches = sorted(table["batch_size"].unique())
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(bandwidths)))
    fig, axes = plt.subplots(len(modes), len(labels), figsize=(3.6 * len(labels), 3.0 * len(modes) + 0.8),
                             squeeze=False, sharex=True, sharey=True)
    for i, mode in enumerate(modes):
        for j, label in enumerate(labels):
            ax = axes[i][j]
            sub = table[(table["label"] == label) & (table["attention"] == mode)]
            for bw, colour in zip(bandwidths, colours):
                line = sub[sub["link_gbps"] == bw].sort_values("batch_size")
                if len(line):
                    ax.plot(line["batch_size"], 100 * line["gain_dist_over_token"], "o-", color=colour, ms=3,
                            label=f"{bw:g} GB/s")
            ax.axhline(100 * MOE_GPS_CLAIM, color="crimson", ls="--", lw=1)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [f"{b:g}" for b in batches])
            ax.set_title(f"{label}\n{'data' if mode == 'dp' else 'tensor'}-parallel attention", fontsize=8)
            if j == 0:
                ax.set_ylabel("gain of distribution-only\nover token-to-expert (%)", fontsize=8)
            if i == len(modes) - 1:
                ax.set_xlabel("batch size (requests)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].annotate("MoE-GPS: >23%", (0.02, 100 * MOE_GPS_CLAIM), xycoords=("axes fraction", "data"),
                        color="crimson", va="top", fontsize=7, xytext=(0, -2), textcoords="offset points")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(bandwidths), fontsize=7, title="link bandwidth",
               title_fontsize=7)
    fig.suptitle(title or "t(best token-to-expert) / t(best distribution-only) - 1, simulated", fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    return save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="label=path/to/decision.csv")
    parser.add_argument("--out", default="outputs/guide/headline.png")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    table = read_decisions(args.tables)
    pivot = table.pivot_table(index=["label", "attention", "batch_size"], columns="link_gbps",
                              values="gain_dist_over_token", sort=False)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print((100 * pivot).round(1).to_string())
    print(f"wrote {plot_headline(table, Path(args.out), args.title)}")


if __name__ == "__main__":
    main()
