"""How widely a random-weight model's decode rows route, by what their context is: MMLU prompts or random tokens.

Session y (benchmarks/engine/serve-calls-h100-2026-12-05-y/README.md) found the 64-expert shape's full 32-row decode
step at 8.8 ms over MMLU prompts and 11.6 ms over random-token prompts (the engine bench's) on one H100, the answers
not degenerate, and read it as the rows picking fewer distinct experts over real text. This counts them: for each
kind of prompt and each row count, that many prompts of the same lengths through ``Engine.generate`` (32 new
tokens), then the full step's device time (CUDA events, median) and the distinct experts each MoE layer's rows pick
over 4 eager steps (``engine.bench.distinct_experts_per_layer``, as the bench's floor counts them), beside what
uniform routing (the serving simulator's) expects; last, the MMLU counts as the serving simulator's
``--active-experts`` argument. GPU.

    PYTHONPATH=. python benchmarks/engine/routing_context_probe.py --model deepseek-v2-lite --rows 8 16 32 --mmlu carry/mmlu

``--layers N`` builds a shape name's random model with its first N layers only, so that Mixtral-8x7B's routing can be
counted on a GPU that does not hold all 32 (its first 16 take 47 GB): random layers are drawn alike and a layer's
routing does not depend on the layers after it, so these are the whole model's first N layers' counts; the distinct
experts of each layer are printed too, to show whether they drift with depth.
"""

import argparse
import statistics

import torch

from moegps.engine.bench import distinct_experts_per_layer
from moegps.engine.generate import Engine, build_model
from moegps.engine.model import random_model
from moegps.engine.serve import mmlu_questions, mmlu_requests
from moegps.executor.generate import device_ms
from moegps.shapes import from_name
from moegps.simulator.serving import uniform_active_experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--mmlu", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[32])
    ap.add_argument("--layers", type=int, default=None, help="a shape name's first N layers only (random weights)")
    args = ap.parse_args()
    if args.layers:
        model = random_model(from_name(args.model).replace(n_layers=args.layers), "cuda", torch.bfloat16)
    else:
        model = build_model(args.model, "cuda")
    S = model.shape
    most = max(args.rows)
    mmlu = [r.prompt for r in mmlu_requests(most, 0.0, 32, 0, questions=mmlu_questions(args.mmlu))]
    gen = torch.Generator().manual_seed(0)
    rand = [torch.randint(3, S.vocab_size, (len(p),), generator=gen).tolist() for p in mmlu]
    print(f"{torch.cuda.get_device_name()}: {model.source}, {S.n_layers} layers")
    print("| rows | prompts | step ms | distinct experts a MoE layer: mean (min-max) | uniform routing |\n|---|---|---|---|---|")
    measured = {}  # rows -> mean distinct experts over MMLU prompts
    for rows in args.rows:
        for name, prompts in (("MMLU", mmlu[:rows]), ("random tokens, same lengths", rand[:rows])):
            engine = Engine(model, max_batch=rows, max_len=max(map(len, prompts)) + 64)
            engine.generate(prompts, max_new_tokens=32)
            ms = device_ms(engine.step(rows), 20, warmup=3)
            touched = distinct_experts_per_layer(engine, rows)[S.dense_layers:]
            print(f"| {rows} | {name} | {ms:.2f} | {statistics.mean(touched):.2f} of {S.n_experts} "
                  f"({min(touched):.1f}-{max(touched):.1f}) | {uniform_active_experts(rows, S.n_experts, S.top_k):.2f} |",
                  flush=True)
            if name == "MMLU":
                measured[rows] = statistics.mean(touched)
                print(f"|   | by layer | | {' '.join(f'{t:.1f}' for t in touched)} | |", flush=True)
            del engine
            torch.cuda.empty_cache()
    print("for the serving simulator (python -m moegps.simulator.serving --calls RUN-calls.csv ...): --active-experts "
          + " ".join(f"{rows}={active:.2f}" for rows, active in measured.items()))


if __name__ == "__main__":
    main()
