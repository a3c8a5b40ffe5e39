"""The one-GPU measurement suite behind docs/executor.md: runner rows at the Mixtral and 64-expert shapes,
then the MoE-layer decode and generation benchmarks against transformers, all in one process.

    python -m moegps.executor.gpu_suite --out results/gpu_suite [--deepseek-trace PATH] [--quick]

Writes ``exec_rows.csv`` (one results row per runner configuration), ``exec_layers.csv`` (per-layer
side table), ``exec.md`` (the summary table) and the benchmark files of ``generate.main``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from ..files import markdown_table
from . import generate
from .runner import ExecuteConfig, run

SUMMARY = ["shape", "phase", "batch_requests", "n_layers", "placement", "predictor", "predictor_overlap", "tokens",
           "moe_ms", "ms_per_layer_batch", "dispatch_ms", "expert_ms", "combine_ms", "predictor_ms", "migration_ms",
           "imbalance", "trace"]


def runner_configs(deepseek_trace: str | None, out: str) -> list[ExecuteConfig]:
    base = dict(out=out, warmup=3, max_batches=12)
    cfgs = [
        ExecuteConfig(shape="mixtral-8x7b", n_layers=2, batch_requests=1, **base),
        ExecuteConfig(shape="mixtral-8x7b", n_layers=2, batch_requests=8, **base),
        ExecuteConfig(shape="mixtral-8x7b", n_layers=2, phase="prefill", batch_requests=2, **{**base, "max_batches": 4}),
        ExecuteConfig(shape="deepseek-v2-lite", n_layers=4, batch_requests=1, **base),
        ExecuteConfig(shape="deepseek-v2-lite", n_layers=4, batch_requests=8, **base),
    ]
    if deepseek_trace:
        ds = dict(shape="deepseek-v2-lite", n_layers=4, trace=deepseek_trace, phase="prefill", batch_requests=4, **base)
        cfgs += [
            ExecuteConfig(**ds),
            ExecuteConfig(**ds, placement="balanced", predictor="last_batch", window=2),
            ExecuteConfig(**ds, placement="balanced", predictor="last_batch", window=2, predictor_overlap=True),
        ]
    return cfgs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/gpu_suite")
    ap.add_argument("--deepseek-trace", default=None, help="RoutingTrace of DeepSeek-V2-Lite (64 experts, top-6)")
    ap.add_argument("--skip-runner", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_runner:
        rows, layers = [], []
        for cfg in runner_configs(args.deepseek_trace, "/tmp/moegps_exec"):
            t0 = time.perf_counter()
            try:
                row, layer_rows = run(cfg, write=False)
            except Exception as e:  # keep going: one failed configuration must not lose the others
                print(f"FAILED {cfg}: {type(e).__name__}: {e}")
                continue
            rows.append(row)
            layers += layer_rows
            print(f"{cfg.shape} {cfg.phase} b{cfg.batch_requests} {cfg.placement}/{cfg.predictor}: "
                  f"moe_ms={row['moe_ms']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            torch.cuda.empty_cache()
        table = pd.DataFrame(rows)
        table.to_csv(out / "exec_rows.csv", index=False)
        pd.DataFrame(layers).to_csv(out / "exec_layers.csv", index=False)
        if len(table):
            table.columns = [c.removeprefix("config.") for c in table.columns]
            table["ms_per_layer_batch"] = table["moe_ms"] / (table["n_layers"] * table["max_batches"])
            table["trace"] = table["trace"].map(lambda t: Path(t).name if t else "random")
            md = f"device: {rows[0]['device']}\n\n" + markdown_table(table[SUMMARY].to_dict("records"))
            (out / "exec.md").write_text(md)
            print(md, flush=True)
    if not args.skip_bench:
        generate.main(["--mode", "all", "--out", str(out)])


if __name__ == "__main__":
    main()
