"""Where a chunked-prefill step's time goes as decode rows are added beside its chunk: for each row count, the
graphed step of that many decode rows with a chunk of ``--chunk`` prompt tokens (``engine.bench.chunk_step_engine``,
as the bench's chunk part: the rows at ``--context`` tokens, the chunk's rows after ``--context`` earlier positions
of its own slot), its device time and its kernels by name (``engine.bench.kernel_trace``), then each kernel's time at
the most rows less at the fewest; and, from the same step run eagerly, what the step's rows (decode and chunk)
fill in each MoE layer: distinct experts and blocks of 64 and of 128 rows (each block of an expert streams its
weights again, in part from L2: on the H100's sorted path, blocks of 64, about 0.4 of a read from memory, session
ac). GPU; ``--device cpu`` counts the blocks only.

    PYTHONPATH=. python benchmarks/engine/chunk_probe.py --shape deepseek-v2-lite --rows 1 24 --chunk 256
    PYTHONPATH=. python benchmarks/engine/chunk_probe.py --shape mixtral-8x7b --layers 16 --rows 1 32 --piece 100
    python benchmarks/engine/chunk_probe.py --shape mixtral-8x7b --layers 4 --rows 1 32 --piece 60 100 160 \
        --context 64 --device cpu                                      # the blocks only: 24 GB of memory, minutes
"""

import argparse

import numpy as np
import torch
from padding_probe import fill, mmlu_pieces, moe_ids

from moegps.engine.bench import chunk_step_engine, kernel_trace
from moegps.engine.generate import bucket_for
from moegps.engine.model import random_model
from moegps.executor.generate import device_ms
from moegps.files import markdown_table
from moegps.shapes import from_name


def step_kernels(model, rows: int, chunk: int, context: int, gen: torch.Generator,
                 piece: list[int] | None = None) -> tuple[float, dict, np.ndarray]:
    """(ms of the graphed step, {kernel name: summed us}, [distinct experts, blocks of 64, blocks of 128] its rows
    fill, means over MoE layers) for ``rows`` decode rows and a chunk of ``chunk`` tokens (random tokens after
    ``context`` of its slot's positions, or ``piece`` padded, at position 0). On the CPU only the fill (ms nan)."""
    engine, _ = chunk_step_engine(model, rows, chunk, context, gen, piece)
    cuda = model.device.type == "cuda"
    ms, by_name = float("nan"), {}
    with torch.inference_mode():
        if cuda:
            run = engine.step(bucket_for(rows), chunk)
            ms = device_ms(run, 20, warmup=3)
            for _, dur, name in kernel_trace(run):
                by_name[name[:70]] = by_name.get(name[:70], 0.0) + dur
        engine.cuda_graph = False  # the same step eagerly, for its routing (it rewrites the same K/V)
        ids = moe_ids(model, engine.step(bucket_for(rows), chunk))
    del engine
    if cuda:
        torch.cuda.empty_cache()
    return ms, by_name, np.mean([fill(i, model.shape.n_experts) for i in ids], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="deepseek-v2-lite")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 24])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="the shape's first N layers only")
    ap.add_argument("--piece", type=int, nargs="+", default=None,
                    help="the chunk is an MMLU prompt's first PIECE tokens, padded, at position 0 of its slot "
                         "(as serving's chunked policy runs a short prompt), instead of random tokens; several: each")
    ap.add_argument("--mmlu", default=None, help="MMLU folder for --piece (default: ../shared/data/mmlu/test)")
    ap.add_argument("--device", default="cuda", help="cpu: the blocks the rows fill only (bf16, no times)")
    args = ap.parse_args()
    shape = from_name(args.shape)
    model = random_model(shape.replace(n_layers=args.layers) if args.layers else shape, args.device)
    pieces = mmlu_pieces(args.piece, args.mmlu) if args.piece else [None]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device}: {args.shape}, {model.shape.n_layers} layers, a chunk of {args.chunk} tokens, decode rows at "
          f"context {args.context}")
    for piece in pieces:
        gen = torch.Generator().manual_seed(4)
        runs = {rows: step_kernels(model, rows, args.chunk, args.context, gen, piece) for rows in args.rows}
        where = (f"an MMLU prompt's first {len(piece)} tokens, padded, at position 0" if piece
                 else f"random tokens after {args.context}")
        print(f"\nthe chunk: {where}")
        for rows, (ms, _, filled) in runs.items():
            print(f"{rows} rows + chunk: {ms:.3f} ms a step (bucket {bucket_for(rows)}); its rows fill, a MoE layer: "
                  f"{filled[0]:.2f} experts, {filled[1]:.2f} blocks of 64 rows, {filled[2]:.2f} of 128")
        if args.device != "cuda":
            continue
        fewest, most = runs[min(runs)][1], runs[max(runs)][1]
        table = [dict(kernel=name, **{f"us at {min(runs)} rows": fewest.get(name, 0.0),
                                      f"us at {max(runs)} rows": most.get(name, 0.0)},
                      more_us=most.get(name, 0.0) - fewest.get(name, 0.0)) for name in set(fewest) | set(most)]
        print(markdown_table(sorted(table, key=lambda r: -abs(r["more_us"]))[:16]))


if __name__ == "__main__":
    main()
