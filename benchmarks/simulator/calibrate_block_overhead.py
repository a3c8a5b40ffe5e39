"""Fit a system profile's per-layer fixed cost of a model call (``block_overhead_us``) to the engine's decode steps.

The serving simulator (``moegps.simulator.serving.call_seconds``) costs a decode step by rooflines: the attention
block's weights and K/V, the experts its tokens pick, the vocabulary projection. The engine's measured steps
(``python -m moegps.engine.bench --parts decode``, random-token prompts, so the routing is the uniform one the model
assumes) sit a near-constant 0.7-1.3 ms above that on H100 and H200, for both the 64-expert shape and Mixtral:
about 30-40 us a layer, the launches and tails of the layer's small kernels (norms, rope and cache write, attention,
router). This fits that per-layer cost (``fit_calls`` with it alone free) to some benchmark files' decode rows and
checks it on others (another shape: out of sample), printing measured and modelled step times.

    python benchmarks/simulator/calibrate_block_overhead.py --system h200_8gpu \\
        --fit benchmarks/engine/h200-2026-12-04-r/call1-deepseek/engine_bench.json \\
        --check benchmarks/engine/h200-2026-12-04-r/call2/engine_bench.json
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

from moegps.shapes import from_name
from moegps.simulator.serving import Call, call_seconds, fit_calls
from moegps.simulator.system import load_system


def decode_records(path: str, new_tokens: int) -> list[tuple[str, dict]]:
    """(shape name, call record) for each decode row of an engine benchmark file (the engine's own variant): a step
    of ``batch`` rows at the mean position of the benchmark's decode, timed at its ``engine_ms``."""
    rows = json.loads(Path(path).read_text()).get("decode") or []
    if not rows:
        raise SystemExit(f"{path}: no 'decode' rows (the JSON of `python -m moegps.engine.bench --parts decode`)")
    return [(r["shape"], {"prompts": "", "positions": " ".join([str(r["context"] + new_tokens // 2)] * r["batch"]),
                          "chunk": 0, "chunk_start": 0, "start_s": 0.0, "end_s": r["engine_ms"] / 1e3, "slept_s": 0.0,
                          "batch": r["batch"], "context": r["context"]})
            for r in rows if r.get("variant", "engine") == "engine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", required=True)
    ap.add_argument("--fit", nargs="+", required=True, help="engine benchmark JSON files to fit on")
    ap.add_argument("--check", nargs="*", default=[], help="engine benchmark JSON files held out")
    ap.add_argument("--new-tokens", type=int, default=32, help="the benchmark's --new-tokens")
    args = ap.parse_args()
    system = replace(load_system(args.system), n_gpus=1, gpus_per_node=1, block_overhead=0.0)
    fit_on = [x for path in args.fit for x in decode_records(path, args.new_tokens)]
    shapes = {name for name, _ in fit_on}
    if len(shapes) != 1:
        raise SystemExit(f"--fit: rows of one shape, got {sorted(shapes)}")
    shape = from_name(shapes.pop())
    fitted = fit_calls([r for _, r in fit_on], shape, system, free=("block_overhead",))
    print(f"{args.system}: block_overhead_us {fitted.block_overhead * 1e6:.1f} (fitted on {shape.name}'s decode rows)")
    print("| set | shape | batch | context | measured ms | roofline ms | with the fitted cost | error |\n|---|---|---|---|---|---|---|---|")
    for label, paths in (("fit", args.fit), ("held out", args.check)):
        for name, r in (x for path in paths for x in decode_records(path, args.new_tokens)):
            s = from_name(name)
            call = Call(decode_positions=tuple(int(p) for p in r["positions"].split()))
            measured, bare, modelled = r["end_s"] * 1e3, call_seconds(call, s, system) * 1e3, call_seconds(call, s, fitted) * 1e3
            print(f"| {label} | {name} | {r['batch']} | {r['context']} | {measured:.2f} | {bare:.2f} | {modelled:.2f} | "
                  f"{modelled / measured - 1:+.1%} |")


if __name__ == "__main__":
    main()
