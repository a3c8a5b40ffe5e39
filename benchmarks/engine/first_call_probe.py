"""Which prefills pay a one-time cost after the serving loop's warm-up: each packed prefill timed on the host (wall
clock, synchronised) the first time and again, after ``engine.serve.warm_up`` as ``python -m moegps.engine.serve``
runs it. A first call much slower than the second is a compile, a library's plan for a new shape, or an
allocation that warm-up did not cover. (Session x: a static run at 40 requests a second stalled 3.2 s before
the prefill of 30 prompts, 2,700 tokens, an eager pack.)

    PYTHONPATH=. python benchmarks/engine/first_call_probe.py --model deepseek-v2-lite --mmlu carry/mmlu
"""

import argparse
import time

import torch

from moegps.engine.generate import Engine, build_model
from moegps.engine.model import prefill
from moegps.engine.serve import mmlu_questions, mmlu_requests, warm_up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--mmlu", default=None)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--packs", type=int, nargs="+", default=[30, 30, 29, 31, 11, 11, 3, 3])
    args = ap.parse_args()
    requests = mmlu_requests(args.requests, 40.0, 128, 0, questions=mmlu_questions(args.mmlu))
    model = build_model(args.model, None, "auto")
    engine = Engine(model, max_batch=args.max_batch, max_len=max(len(r.prompt) + r.max_new_tokens for r in requests))
    warm_up(engine, requests)
    print(f"SDPA backends enabled: flash {torch.backends.cuda.flash_sdp_enabled()}, efficient "
          f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, cudnn {torch.backends.cuda.cudnn_sdp_enabled()}, "
          f"math {torch.backends.cuda.math_sdp_enabled()}", flush=True)
    graphs = engine.prefill_graphs
    for count in args.packs:
        prompts = [torch.as_tensor(r.prompt) for r in requests[:count]]
        graphed = graphs.pays([len(p) for p in prompts])
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            graphs(prompts) if graphed else prefill(model, engine.cache, prompts)
        torch.cuda.synchronize()
        print(f"{count} prompts, {sum(len(p) for p in prompts)} tokens, {'graph' if graphed else 'eager'}: "
              f"{(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
