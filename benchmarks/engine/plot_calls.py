"""Where a serving run's time goes, from the calls file of `python -m moegps.engine.serve --out RUN.csv`:

    python benchmarks/engine/plot_calls.py RUN-calls.csv[.gz] --title "..." --out calls.png

One bar per run (arrival rate and policy), its length the run's span from its first call to its last, cut into the
time its model calls took by kind (whole prompts prefilled alone or packed, decode steps, decode steps with a prompt
chunk), the serving loop's own host work between calls, and its sleeps waiting for arrivals; a table of the same
seconds is printed.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moegps.simulator.serving import call_of, loop_seconds, read_call_records, timed_call  # noqa: E402

PARTS = {  # kind: colour
    "prefill, one prompt": "tab:purple",
    "prefill, several packed": "tab:pink",
    "decode steps": "tab:blue",
    "decode steps with a chunk": "tab:cyan",
    "loop between calls": "tab:red",
    "waiting for arrivals": "lightgray",
}


def kind(record: dict) -> str:
    call = call_of(record)
    if call.prompts:
        return "prefill, one prompt" if len(call.prompts) == 1 else "prefill, several packed"
    return "decode steps with a chunk" if call.chunk else "decode steps"


def breakdown(records: list[dict]) -> dict[tuple[float, str], dict[str, float]]:
    """{(rate, policy): {part: seconds}} over each run's calls (in the file's order)."""
    runs: dict[tuple[float, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(PARTS, 0.0))
    for r, loop in zip(records, loop_seconds(records)):
        parts = runs[float(r["rate"]), r["policy"]]
        parts[kind(r)] += timed_call(r)[1]
        if loop is not None:  # not the run's first call
            parts["waiting for arrivals"] += float(r["slept_s"])
            parts["loop between calls"] += loop
    return dict(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calls", type=Path)
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", type=Path, default=Path("serve-calls.png"))
    args = ap.parse_args()
    runs = breakdown(read_call_records(args.calls))
    order = sorted(runs, key=lambda run: (run[0], run[1]))
    print(f"{'rate':>6} {'policy':<11}" + "".join(f" {p:>26}" for p in PARTS) + "   (seconds)")
    for run in order:
        print(f"{run[0]:>6g} {run[1]:<11}" + "".join(f" {runs[run][p]:>26.3f}" for p in PARTS))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(order) + 1.6))
    for y, run in enumerate(order):
        left = 0.0
        for part, colour in PARTS.items():
            width = runs[run][part]
            ax.barh(y, width, left=left, color=colour, label=part if y == 0 else None)
            left += width
    ax.set_yticks(range(len(order)), [f"{rate:g}/s {policy}" for rate, policy in order])
    ax.invert_yaxis()
    ax.set_xlabel("seconds of the run")
    ax.set_title(args.title or str(args.calls))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
