"""Fit the expert roofline on several measured files at once, each weighted equally, and score it on others.

    python benchmarks/simulator/joint_fit.py --system h100_8gpu \
        --fit benchmarks/kernels/logs/h100-2026-12-06-ae/call1-bench-seed41.csv \
              benchmarks/simulator/h100-2026-12-06-ag/call6-expert-shares-b64.csv \
        --score benchmarks/kernels/logs/h100-2026-12-06-ae/call1-bench-seed42.csv ...

`python -m moegps.simulator.calibrate --kernel-bench` fits on one file. Whole kernel calls (a kernels-bench CSV,
tens of rows) and one GPU's shares of a replay (`expert_shares.csv`, thousands) together would be a fit of the
shares alone, so here each file's residuals are scaled by one over the square root of its row count. Session ag
(docs/simulator.md, "Calibrating on the shares themselves") found no single profile serving both well.
"""

from __future__ import annotations

import argparse

from moegps.shapes import from_name
from moegps.simulator.calibrate import cases_from_kernel_bench, error_table, fit
from moegps.simulator.system import load_system

FREE = ("hbm_bandwidth", "matmul_flops", "expert_launch", "layer_overhead", "roofline_p")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", default="h100_8gpu")
    ap.add_argument("--fit", nargs="+", required=True, help="files fitted on, each weighted equally")
    ap.add_argument("--score", nargs="*", default=[], help="files scored only (held out)")
    args = ap.parse_args(argv)
    start, shape = load_system(args.system), from_name("mixtral-8x7b")  # each case carries its own shape
    cases = {path: cases_from_kernel_bench(path) for path in [*args.fit, *args.score]}
    fitted, _ = fit([c for path in args.fit for c in cases[path]], shape, start, FREE,
                    weights=[len(cases[path]) ** -0.5 for path in args.fit for _ in cases[path]])
    print("fitted: " + ", ".join(f"{name} {getattr(fitted, name):.4g}" for name in FREE))
    for path, file_cases in cases.items():
        role = "fit" if path in args.fit else "held out"
        for label, spec in (("profile", start), ("fitted", fitted)):
            t = error_table(file_cases, shape, spec)
            print(f"{label:>8} on {path} ({role}, {len(file_cases)} rows): mean |error| {t.abs_error_pct.mean():.1f}%, "
                  f"max {t.abs_error_pct.max():.1f}%")


if __name__ == "__main__":
    main()
