"""Plot the kernel benchmark: % of the physical floor against tokens, per expert shape.

    python -m moegps.kernels.plot --clean benchmarks/kernels/logs/h100_bench_seed36_clean.csv \
        --zero benchmarks/kernels/logs/h100_bench_seed36_zero.csv --out docs/img/kernels-h100.png

One panel per shape of the CSV (names of moegps.shapes): ours (the tuned config, whole call) under the clean and,
if given, the zero-fill L2 flush, the default config, the `torch._grouped_mm` pipeline, vLLM's
tuned fused_moe as the issue quotes it for an H100, and the issue's bar where it sets one; where
the CSV has them (runs from session 6 on), the two references of the same run: cuBLAS's batched
GEMM on balanced routing (the GEMMs alone) and a plain read of the weight bytes.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import save_png
from .tune import expert_dims

# The figures for vLLM's Triton fused_moe with a config tuned for an H100 (% of floor),
# and its bar for moegps's kernel; token counts as keys.
VLLM_TUNED = {"mixtral-8x7b": {1: 84, 8: 97, 32: 97, 128: 93, 512: 72, 2048: 55, 16384: 62},
              "deepseek-v2-lite": {1: 46, 8: 86, 32: 91, 128: 88, 512: 79, 2048: 51, 16384: 55}}
BAR = {"mixtral-8x7b": {512: 80, 2048: 80, 16384: 75},
       "deepseek-v2-lite": {1: 70, 512: 80, 2048: 80, 16384: 75}}
CURVES = {"ours": "pct_floor", "default config": "pct_floor_default",
          "torch._grouped_mm": "pct_floor_gmm"}
# drawn where the CSV has it (runs from 2026-12-04 "f" on): ours given bmm's balanced routing
OPTIONAL_CURVES = {"ours, balanced routing": "pct_floor_balanced"}
# drawn dotted, where the CSV has them: references, not MoE pipelines
REFERENCES = {"cuBLAS bmm, balanced routing, GEMMs only": "pct_floor_bmm",
              "plain read of the weight bytes (memory-bound rows)": "pct_floor_read"}


def read_bench(path: Path) -> pd.DataFrame:
    """A `bench.csv` with the columns the plot needs (a clear error names what is missing)."""
    df = pd.read_csv(path)
    missing = {"shape", "tokens", *CURVES.values()} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a moegps.kernels.bench CSV, missing columns {sorted(missing)}")
    return df


def series(df: pd.DataFrame, shape: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, % of floor) of one shape and column, by tokens; rows without a value left out."""
    rows = df[(df["shape"] == shape) & df[column].notna()].sort_values("tokens")
    return rows["tokens"].to_numpy(), rows[column].to_numpy(dtype=float)


def title(shape: str) -> str:
    """A panel's title: the shape's name (moegps.kernels.tune.shape_names) and the expert sizes its kernels see."""
    n_experts, hidden, ffn, top_k = expert_dims(shape)
    return f"{shape} experts ({n_experts}, H {hidden}, F {ffn}, top-{top_k})"


FLUSH_LABELS = {"clean": "L2 flushed clean", "zero": "do_bench's zero-fill flush"}


def _curve(ax, df: pd.DataFrame, shape: str, column: str, label: str, **style) -> None:
    """One column's series for the shape, if the run has any value of it (no empty legend entries:
    a run may skip methods)."""
    if column in df:
        tokens, pct = series(df, shape, column)
        if len(tokens):
            ax.plot(tokens, pct, label=label, **style)


def plot_bench(clean: Path, zero: Path | None, out: Path, device: str = "H100",
               first_flush: str = "clean", trace: Path | None = None) -> Path:
    """Write the figure to `out` (PNG, written atomically) and return its path. `clean` is the
    main run (its flush named by `first_flush`), `zero` an optional zero-flush run beside it,
    `trace` the same run's `trace.csv` (ours on recorded routing, a curve per trace layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"clean": read_bench(clean), **({"zero": read_bench(zero)} if zero else {})}
    shapes = list(dict.fromkeys(runs["clean"]["shape"]))  # in the order the run timed them
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.2 * len(shapes), 4.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        clean = runs["clean"]
        for name, column in CURVES.items():
            ours = name == "ours"
            _curve(ax, clean, shape, column, f"{name} ({FLUSH_LABELS[first_flush]})" if ours else name,
                   marker="o" if ours else ".", lw=2.2 if ours else 1.2)
        for name, column in OPTIONAL_CURVES.items():
            _curve(ax, clean, shape, column, name, marker="s", mfc="none", lw=1.2, color="C0")
        for i, (name, column) in enumerate(REFERENCES.items()):
            _curve(ax, clean, shape, column, name, ls=":", marker=".", lw=1.2, color=f"C{4 + i}")
        if "pct_floor_bmm" in clean:  # the engine issue's bar: within 10 points of bmm
            tokens, pct = series(clean, shape, "pct_floor_bmm")
            ax.fill_between(tokens, pct - 10, pct, color="C4", alpha=0.12, lw=0,
                            label="within 10 points of bmm (the engine issue's bar)")
        if "zero" in runs:
            _curve(ax, runs["zero"], shape, "pct_floor", f"ours ({FLUSH_LABELS['zero']})",
                   ls="--", marker="o", mfc="none", color="C0", lw=1.2)
        recorded = pd.read_csv(trace) if trace else pd.DataFrame(columns=["shape", "routing"])
        for i, (label, rows) in enumerate(recorded[recorded["shape"] == shape].groupby("routing", sort=False)):
            _curve(ax, rows, shape, "pct_floor", f"ours, recorded routing: {label}", ls="--", marker="^",
                   lw=1.2, color=f"C{7 + i % 3}")
        vllm, bar = VLLM_TUNED.get(shape, {}), BAR.get(shape, {})
        if vllm:
            ax.plot(list(vllm), list(vllm.values()), ls="none", marker="x", ms=8, color="k",
                    label="vLLM fused_moe, tuned (issue's H100 figures)")
        if bar:
            ax.plot(list(bar), list(bar.values()), ls="none", marker="_", ms=22, mew=2.5,
                    color="C3", label="the kernels issue's bar (H100)")
        ax.set_xscale("log", base=2)
        ticks = sorted({*clean["tokens"].unique(), *vllm, *bar})
        ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 2048 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(0, 105)
        ax.set_xlabel("tokens in the batch")
        ax.set_ylabel("% of the physical floor (higher is better)")
        ax.set_title(title(shape), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7.5, loc="lower left")
    fig.suptitle(textwrap.fill(f"Fused MoE expert FFN on one {device}, routing metadata included "
                               "(floor: weight bytes / copy rate or FLOPs / matmul rate)",
                               80 * len(shapes)), fontsize=10)  # wrapped to the panels' width
    fig.tight_layout()
    return save_png(fig, out, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean", type=Path, required=True, help="bench.csv of a --flush clean run")
    ap.add_argument("--zero", type=Path, help="bench.csv of a zero-flush run (optional)")
    ap.add_argument("--out", type=Path, default=Path("kernels.png"))
    ap.add_argument("--device", default="H100", help="device named in the title")
    ap.add_argument("--trace", type=Path, help="trace.csv of the run (--routing-trace; optional)")
    args = ap.parse_args(argv)
    print(plot_bench(args.clean, args.zero, args.out, args.device, trace=args.trace))


if __name__ == "__main__":
    main()
