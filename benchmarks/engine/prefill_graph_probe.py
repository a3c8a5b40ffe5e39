"""A single prompt's prefill captured as a CUDA graph (PrefillGraphs) against the eager prefill, on a
shape cut to a few layers, with SDPA restricted to one backend: which attention backends replay
correctly inside a graph here. One backend per process (an illegal access ends the CUDA context).

    PYTHONPATH=. python benchmarks/engine/prefill_graph_probe.py --shape mixtral-8x7b --backend flash
"""

import argparse
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moegps.engine.bench import kernel_trace, random_hf_mixtral
from moegps.engine.generate import PrefillGraphs
from moegps.engine.model import KVCache, from_transformers, prefill, random_model
from moegps.executor.generate import device_ms
from moegps.shapes import from_name

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--backend", choices=BACKENDS, default="default")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--batch", type=int, nargs="*", default=[],
                    help="also a batch of prompts of these lengths, graphed and eager (agreement and time)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--transformers", action="store_true",
                    help="the model as the engine bench builds Mixtral: views of a random transformers model")
    ap.add_argument("--profile-first", action="store_true", help="profile an eager prefill before the capture")
    args = ap.parse_args()
    shape = from_name(args.shape).replace(n_layers=args.layers)
    model = from_transformers(random_hf_mixtral(shape)) if args.transformers else random_model(shape)
    backend = BACKENDS[args.backend]
    for n in args.tokens:
        prompt = torch.randint(3, shape.vocab_size, (n,), device="cuda")
        with torch.inference_mode(), (sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()):
            cache = KVCache(shape, 1, n, model.dtype, model.device)
            eager = prefill(model, cache, [prompt])
            if args.profile_first:
                kernel_trace(lambda: prefill(model, cache, [prompt]))  # noqa: B023
            graphs = PrefillGraphs(model, KVCache(shape, 1, n, model.dtype, model.device))
            graphed = graphs([prompt])
            torch.cuda.synchronize()
            again = graphs([prompt])
            torch.cuda.synchronize()
        err = ((graphed - eager).norm() / eager.norm()).item()
        print(f"{args.shape} {n} tokens, SDPA {args.backend}: graph vs eager rel err {err:.2e}, "
              f"replays agree {torch.equal(graphed, again)}", flush=True)

    if args.batch:
        prompts = [torch.randint(3, shape.vocab_size, (n,), device="cuda") for n in args.batch]
        cache = KVCache(shape, len(prompts), max(args.batch), model.dtype, model.device)
        graphs = PrefillGraphs(model, cache)
        with torch.inference_mode():
            eager = prefill(model, cache, prompts)
            graphed = graphs(prompts)
            eager_ms = device_ms(lambda: prefill(model, cache, prompts), reps=5)
            graph_ms = device_ms(lambda: graphs(prompts), reps=5)
        err = ((graphed - eager).norm() / eager.norm()).item()
        agree = (graphed.argmax(-1) == eager.argmax(-1)).float().mean().item()
        print(f"{args.shape} batch of {args.batch} tokens: graph vs eager rel err {err:.2e}, top-1 agreement "
              f"{agree:.0%}; eager {eager_ms:.2f} ms, graph {graph_ms:.2f} ms ({args.layers} layers)", flush=True)


if __name__ == "__main__":
    main()
