"""Where the host's time goes while it issues a prefill: cProfile of one eager prefill on a GPU.

    PYTHONPATH=. python benchmarks/engine/host_probe.py [--tokens 2048] [--layers 4]

A prefill is eager (no CUDA graph), so when the host takes longer to issue a layer than the GPU takes
to run it, the GPU waits (the engine bench's `idle_ms` and longest gaps). Shapes with random bf16
weights, cut to ``--layers`` layers (the host's cost per layer does not depend on their number).
Prints, per shape, the host's time to issue one prefill, the GPU's time for it, and the functions
with the most time of their own.
"""

import argparse
import cProfile
import io
import pstats
import time

import torch

from moegps.engine.model import KVCache, prefill, random_model
from moegps.executor.generate import device_ms
from moegps.shapes import from_name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite", "mixtral-8x7b"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    for name in args.shapes:
        shape = from_name(name).replace(n_layers=args.layers)
        model = random_model(shape)
        cache = KVCache(shape, 1, args.tokens, model.dtype, model.device)
        prompt = torch.randint(3, shape.vocab_size, (args.tokens,), device="cuda")
        with torch.inference_mode():
            run = lambda: prefill(model, cache, [prompt])  # noqa: E731
            gpu_ms = device_ms(run, reps=5, warmup=2)
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            host_ms = (time.perf_counter() - start) * 1e3
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            run()
            profiler.disable()
            torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"## {name}, {args.layers} layers, {args.tokens} tokens: host issues a prefill in {host_ms:.2f} ms "
              f"({host_ms / args.layers:.3f} per layer), the GPU runs it in {gpu_ms:.2f} ms\n{text.getvalue()}",
              flush=True)
        model = cache = None  # freed before the next shape's
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
