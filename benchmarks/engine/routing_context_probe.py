"""How widely a random-weight model's decode rows route, by what their context is: MMLU prompts or random tokens.

Session y (benchmarks/engine/serve-calls-h100-2026-12-05-y/README.md) found the 64-expert shape's full 32-row decode
step at 8.8 ms over MMLU prompts and 11.6 ms over random-token prompts (the engine bench's) on one H100, the answers
not degenerate, and read it as the rows picking fewer distinct experts over real text. This counts them: for each
kind of prompt, 32 prompts of the same lengths through ``Engine.generate`` (32 new tokens), then the 32-row step's
device time (CUDA events, median) and the distinct experts each MoE layer's 32 rows pick over 4 eager steps
(``engine.bench.distinct_experts_per_layer``, as the bench's floor counts them). GPU.

    PYTHONPATH=. python benchmarks/engine/routing_context_probe.py --model deepseek-v2-lite --mmlu carry/mmlu
"""

import argparse
import statistics

import torch

from moegps.engine.bench import distinct_experts_per_layer
from moegps.engine.generate import Engine, build_model
from moegps.engine.serve import mmlu_questions, mmlu_requests
from moegps.executor.generate import device_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--mmlu", default=None)
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    model = build_model(args.model, "cuda")
    mmlu = [r.prompt for r in mmlu_requests(args.rows, 0.0, 32, 0, questions=mmlu_questions(args.mmlu))]
    gen = torch.Generator().manual_seed(0)
    rand = [torch.randint(3, model.shape.vocab_size, (len(p),), generator=gen).tolist() for p in mmlu]
    print(f"{torch.cuda.get_device_name()}: {model.source}, {args.rows} rows")
    print("| prompts | step ms | distinct experts a MoE layer (mean, min-max) |\n|---|---|---|")
    for name, prompts in (("MMLU", mmlu), ("random tokens, same lengths", rand)):
        engine = Engine(model, max_batch=args.rows, max_len=max(map(len, prompts)) + 64)
        engine.generate(prompts, max_new_tokens=32)
        ms = device_ms(engine.step(args.rows), 20, warmup=3)
        touched = distinct_experts_per_layer(engine, args.rows)[model.shape.dense_layers:]
        print(f"| {name} | {ms:.2f} | {statistics.mean(touched):.1f} of {model.shape.n_experts} "
              f"({min(touched):.0f}-{max(touched):.0f}) |", flush=True)
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
