"""The simulator's attention over the context (``replay.attention_context``) against the engine on one H200.

The cost model's non-MoE part charges a layer's weights once a step; with ``attention_context`` it also
charges each decode token's K/V read (its request's cache up to its position) and every token's QK and PV
FLOPs (``moegps.simulator.cost.other_time``). Two measurements of this project's engine on one NVIDIA H200
(``python -m moegps.engine.bench``, files under ``benchmarks/engine/``) test both terms, with no fitting:

* decode: a step at context 4096 minus the same step at context 128, same batch and same run (only the
  context, hence only the KV bytes, differ: the experts are the same);
* prefill: the attention part of the time to first token (the projections and the attention kernels, the
  bench's profile of the prompt) at 128, 2048 and 8192 prompt tokens.

Each is predicted from the system profile the simulator uses (``--system``, default ``h200_8gpu``: HBM
and matmul rates calibrated on the expert kernels) and, beside it, from the rates the bench measured in
that run (copy and bf16 8192^3 matmul). Prints a table; nothing is fitted to these files.

    python benchmarks/simulator/attention_context.py \
        --decode benchmarks/engine/h200-2026-12-04-r/call2/engine_bench.json \
        --prefill benchmarks/engine/h200-2026-12-04-r/call2/engine_bench.json \
                  benchmarks/engine/h200-2026-12-04-r/call1-deepseek/engine_bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moegps.files import markdown_table
from moegps.shapes import ModelShape, from_name, names
from moegps.simulator.cost import other_time
from moegps.simulator.system import SystemSpec, load_system


def layer_seconds(shape: ModelShape, system: SystemSpec, positions: np.ndarray, decode: bool) -> float:
    """Seconds of one layer's non-MoE part (one GPU, data-parallel) for tokens at ``positions`` [n]
    (0-based), with the attention over their context."""
    context = float((positions + 1).sum())
    return float(other_time(np.array([len(positions)]), shape, system, "dp", np.array([context]),
                            np.array([context if decode else 0.0]))[()])


def weights_only(shape: ModelShape, system: SystemSpec, n: int) -> float:
    return float(other_time(np.array([n]), shape, system, "dp")[()])


def rates(system: SystemSpec, ceilings: dict) -> dict[str, SystemSpec]:
    """The profile, and the same with the copy and matmul rates the bench measured beside its rows."""
    measured = system.replace(hbm_bandwidth=ceilings["copy_bytes_per_s"], matmul_flops=ceilings["matmul_flops_per_s"])
    return {"profile": system, "measured rates": measured}


def decode_rows(path: Path, system: SystemSpec, new_tokens: int) -> list[dict]:
    """Measured and predicted growth of a decode step from the smallest to the largest context of each batch."""
    result = json.loads(path.read_text())
    rows = [r for r in result.get("decode", []) if r.get("variant", "engine") == "engine" and r["shape"] in names()]
    out = []
    for shape_name, batch in sorted({(r["shape"], r["batch"]) for r in rows}):
        by_context = {r["context"]: r["engine_ms"] for r in rows if (r["shape"], r["batch"]) == (shape_name, batch)}
        if len(by_context) < 2:
            continue
        short, long = min(by_context), max(by_context)
        shape = from_name(shape_name)
        row = dict(shape=shape_name, batch=batch, context=f"{short}->{long}",
                   measured_ms=by_context[long] - by_context[short])
        for label, spec in rates(system, result["ceilings"]).items():
            # the bench decodes new_tokens steps from each context: their mean position
            def step(context):
                positions = np.full(batch, context + (new_tokens - 1) / 2)
                return shape.n_layers * layer_seconds(shape, spec, positions, decode=True)
            row[f"{label}_ms"] = (step(long) - step(short)) * 1e3
        out.append(row)
    return out


def prefill_rows(path: Path, system: SystemSpec) -> list[dict]:
    """Measured attention part of the prompt's time against the prediction, weights only and with the context."""
    result = json.loads(path.read_text())
    out = []
    for shape_name, prompt in sorted({(r["shape"], r["prompt"]) for r in result.get("ttft", []) if "attention_ms" in r}):
        rows = [r for r in result["ttft"] if (r["shape"], r["prompt"]) == (shape_name, prompt)]
        measured = [r["attention_ms"] for r in rows]
        # the bench's attention part holds the projections and the attention kernels, not the shared expert
        shape = from_name(shape_name).replace(shared_ffn=0)
        # the SM clock the run held (power-limited at long prompts: the profile's rates were taken nearer 1980 MHz)
        row = dict(shape=shape_name, prompt=prompt, sm_MHz=int(np.median([r.get("sm_MHz", np.nan) for r in rows])),
                   measured_ms=float(np.median(measured)))
        for label, spec in rates(system, result["ceilings"]).items():
            row[f"{label}_weights_only_ms"] = shape.n_layers * weights_only(shape, spec, prompt) * 1e3
            row[f"{label}_ms"] = shape.n_layers * layer_seconds(shape, spec, np.arange(prompt), decode=False) * 1e3
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decode", nargs="*", type=Path, default=[], help="engine_bench.json files with decode rows")
    ap.add_argument("--prefill", nargs="*", type=Path, default=[], help="engine_bench.json files with ttft rows")
    ap.add_argument("--system", default="h200_8gpu", help="system profile the simulator would use")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps the bench timed from each context")
    args = ap.parse_args(argv)
    system = load_system(args.system)
    print(f"system profile {system.name}: HBM {system.hbm_bandwidth / 1e12:.2f} TB/s, "
          f"matmul {system.matmul_flops / 1e12:.0f} TFLOP/s\n")
    if args.decode:
        print("## Decode: growth of a step's time with the context (ms)\n")
        print(markdown_table([r for f in args.decode for r in decode_rows(f, system, args.new_tokens)], "{:.2f}"), "\n")
    if args.prefill:
        print("## Prefill: the attention part of the prompt's time (ms)\n")
        print(markdown_table([r for f in args.prefill for r in prefill_rows(f, system)], "{:.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
