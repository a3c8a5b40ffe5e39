"""Which prefills pay a one-time cost after the serving loop's warm-up, and where it goes.

Session x: a static serving run at 40 requests a second stalled 3.2 s before the eager prefill of 30 prompts
(2,700 tokens), a padded batch of a shape no earlier call had. Two measurements, host wall clock with the GPU
synchronised, each the first call at a shape and then the same call again:

1. SDPA alone on random q, k, v of padded batches of new shapes (the model's heads, GQA as the engine calls it),
   in the default backend order (cuDNN first on Hopper: a plan per new shape) and in ``model.PADDED_BATCH_SDPA``;
2. the engine's packed prefill of several MMLU prompts after ``engine.serve.warm_up``, as
   ``python -m moegps.engine.serve`` runs it (eager past the packed graphs' 2048 tokens, a graph within); a first
   call over a second is profiled on the host (cProfile; a Triton compile shows as LLVM and ptxas). Run it with
   ``TRITON_CACHE_DIR`` a fresh folder: kernels that an earlier process compiled load from the cache in
   milliseconds, and the stall a first serving run meets does not show.

    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python benchmarks/engine/first_call_probe.py --model deepseek-v2-lite --mmlu carry/mmlu
"""

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from moegps.engine.generate import Engine, build_model
from moegps.engine.model import PADDED_BATCH_SDPA, prefill
from moegps.engine.serve import mmlu_questions, mmlu_requests, warm_up


def timed_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--mmlu", default=None)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--packs", type=int, nargs="+", default=[30, 29, 31, 11, 3])
    args = ap.parse_args()
    requests = mmlu_requests(args.requests, 40.0, 128, 0, questions=mmlu_questions(args.mmlu))
    model = build_model(args.model, None, "auto")
    S = model.shape
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"SDPA cuDNN backend enabled: {torch.backends.cuda.cudnn_sdp_enabled()}", flush=True)
    print("| SDPA backends | batch x length | first call ms | again ms |\n|---|---|---|---|")
    for name, backends in (("default order", None), ("PADDED_BATCH_SDPA", PADDED_BATCH_SDPA)):
        for batch, length in ((30, 275 + (backends is not None)), (29, 260 + (backends is not None))):
            q = torch.randn(batch, S.n_heads, length, S.head_dim, device="cuda", dtype=model.dtype)
            k, v = (torch.randn(batch, S.n_kv_heads, length, S.head_dim, device="cuda", dtype=model.dtype)
                    for _ in range(2))

            def run():
                with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True,  # noqa: B023
                                                   enable_gqa=S.n_heads != S.n_kv_heads)
            print(f"| {name} | {batch} x {length} | {timed_ms(run):.1f} | {timed_ms(run):.1f} |", flush=True)

    engine = Engine(model, max_batch=args.max_batch, max_len=max(len(r.prompt) + r.max_new_tokens for r in requests))
    warm_up(engine, requests)
    print("\n| prompts | tokens | prefill | first call ms | again ms |\n|---|---|---|---|---|")
    slow = []
    for count in args.packs:
        prompts = [torch.as_tensor(r.prompt) for r in requests[:count]]
        graphed = engine.prefill_graphs.pays([len(p) for p in prompts])

        def run():
            with torch.inference_mode():
                engine.prefill_graphs(prompts) if graphed else prefill(model, engine.cache, prompts)  # noqa: B023
        profiler = cProfile.Profile()
        first = timed_ms(lambda: profiler.runcall(run))  # noqa: B023
        print(f"| {count} | {sum(len(p) for p in prompts)} | {'graph' if graphed else 'eager'} | "
              f"{first:.1f} | {timed_ms(run):.1f} |", flush=True)
        if first > 1000:  # where a first call's seconds went, on the host
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats("moegps|jit.py|compiler.py", 30)
            slow.append(text.getvalue())
    print(*slow, sep="\n")


if __name__ == "__main__":
    main()
