"""What a decode step's free rows cost: one bucket's graphed step with some rows running and the rest free.

A serving run's calls (``python -m moegps.engine.serve --out RUN.csv``, RUN-calls.csv; session y,
benchmarks/engine/serve-calls-h100-2026-12-05-y/) put a 32-row step with a few answers running at 11.4 ms on the
H100 against 8.7 with all 32 running, though free rows attend to one position. This replays the step's graph (GPU,
CUDA events, median of --reps) with ``running`` rows at position --context and the others set up as:

- ``free``: position 0, the slot's index as the token: free rows of different tokens, as ``engine.serve`` left
  them before session y (each decoded its own last output, and rows freed at different steps differ);
- ``free, token 0``: position 0, token 0 for every free row, as ``engine.serve`` pins them since: all route alike;
- ``parked long``: the free rows' tokens as ``free`` but at position --context (a control: running-like rows).

Session y, one H100 (``probe32.log``, ``probe8.log`` in benchmarks/engine/serve-calls-h100-2026-12-05-y/): 32 rows
with 8 running 11.31 ms against 8.06 pinned, with 1 running 11.31 against 3.99; 32 running 11.57.

    PYTHONPATH=. python benchmarks/engine/free_rows_probe.py --model deepseek-v2-lite --bucket 32
"""

import argparse

import torch

from moegps.engine.generate import Engine, build_model
from moegps.executor.generate import device_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--bucket", type=int, default=32)
    ap.add_argument("--running", type=int, nargs="+", default=[32, 24, 16, 8, 1])
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    model = build_model(args.model, "cuda")
    # the free rows as session y's engine ran them: routed as themselves (no aliasing, Engine.alias_free_rows)
    engine = Engine(model, max_batch=args.bucket, max_len=args.context + 64, alias_free_rows=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab = model.shape.vocab_size
    print(f"{torch.cuda.get_device_name()}: {model.source}, bucket {args.bucket}, context {args.context}")
    print("| running | free rows | step ms |\n|---|---|---|")
    slots = torch.arange(args.bucket, device="cuda")
    with torch.inference_mode():
        for running in args.running:
            for how in ("free", "free, token 0", "parked long"):
                if running == args.bucket and how != "free":
                    continue
                tokens = torch.randint(0, vocab, (args.bucket,), device="cuda", generator=gen)
                free = slots >= running
                tokens = torch.where(free, slots % vocab if how != "free, token 0" else 0, tokens)
                positions = torch.where(free & (how != "parked long"), 0, args.context)
                engine.tokens[:args.bucket] = tokens
                engine.positions[:args.bucket] = positions
                print(f"| {running} | {how} | {device_ms(engine.step(args.bucket), args.reps, warmup=3):.2f} |", flush=True)


if __name__ == "__main__":
    main()
