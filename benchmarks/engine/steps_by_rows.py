"""What a serving run's decode steps cost by their bucket and by how many of its rows were running, from the calls
file of `python -m moegps.engine.serve --out RUN.csv`:

    python benchmarks/engine/steps_by_rows.py RUN-calls.csv[.gz]

A step's graph computes every row of its bucket; the rows of free slots decode token 0 at position 0. For each
bucket, plain steps and steps with a prompt chunk apart, the median measured time of the steps whose running rows
fall in each quarter of the bucket: read down a column of equal running rows to see what a larger bucket's free rows
cost, along a row to see what running rows cost.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from moegps.simulator.serving import read_call_records, timed_call


def steps_by_rows(records: list[dict]) -> dict:
    """{(with chunk, bucket, quarter): [measured seconds]}; quarter q (1-4) holds the steps with
    (q - 1) * bucket / 4 < running rows <= q * bucket / 4 (running: rows past position 0)."""
    steps = defaultdict(list)
    for record in records:
        call, seconds = timed_call(record)
        if call.prompts:
            continue
        bucket = len(call.decode_positions)
        running = sum(p > 0 for p in call.decode_positions)
        quarter = max(1, -(-4 * running // bucket))
        steps[(bool(call.chunk), bucket, quarter)].append(seconds)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calls", type=Path)
    args = ap.parse_args()
    steps = steps_by_rows(read_call_records(args.calls))
    print(f"{args.calls}: median ms (steps) by running rows, a quarter of the bucket each")
    print("| step | bucket | running <= 1/4 | <= 1/2 | <= 3/4 | <= all |\n|---|---|---|---|---|---|")
    for chunked in (False, True):
        for bucket in sorted({b for c, b, _ in steps if c == chunked}):
            cells = [f"{1e3 * statistics.median(steps[chunked, bucket, q]):.2f} ({len(steps[chunked, bucket, q])})"
                     if steps.get((chunked, bucket, q)) else "" for q in (1, 2, 3, 4)]
            print(f"| {'with a chunk' if chunked else 'decode'} | {bucket} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
