"""Replay speed: tokens x layers per second of the simulator, against the floor of counting each selection once.

``python -m moegps.simulator.bench [--tokens 1000000] [--layers 32] [--experts 8] [--top-k 2] [--gpus 8]``

A synthetic token-major trace (skewed routing, requests of 128-token prompts then 64 decode steps)
is batched and replayed under the static plan and the oracle plan (placement from every step's true
loads). Printed per stage: median seconds over ``--repeats`` runs, tokens x layers per second, and the
ratio to the floor measured in the same run: one ``np.bincount`` over every (step, layer, expert)
selection, the least work any replay must do.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from ..trace import TokenRouting
from .replay import PlaceFn, ReplayConfig, make_batches, oracle_plan, simulate, static_plan
from ..shapes import from_name
from .system import load_system


def synthetic_routing(rng: np.random.Generator, n_tokens: int, n_layers: int, n_experts: int, top_k: int,
                      prompt: int = 128, decode: int = 64) -> TokenRouting:
    per = prompt + decode
    n_req = -(-n_tokens // per)
    pos = np.tile(np.arange(per), n_req)[:n_tokens]
    req = np.repeat(np.arange(n_req), per)[:n_tokens]
    step = np.maximum(pos - prompt + 1, 0)
    p = 1.0 / np.arange(1, n_experts + 1) ** 1.2
    # top-k without repeats: a random expert plus distinct offsets
    first = rng.choice(n_experts, size=(n_tokens, n_layers), p=p / p.sum())
    offsets = np.stack([rng.permutation(np.arange(1, n_experts))[:top_k - 1] for _ in range(n_layers)], axis=0)
    experts = (first[:, :, None] + np.concatenate([np.zeros((n_layers, 1), int), offsets], 1)[None]) % n_experts
    return TokenRouting(request_id=req, step=step, phase=(step > 0).astype(np.int8), position=pos,
                        token_id=rng.integers(0, 32000, n_tokens), experts=experts.astype(np.int16), weights=None)


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    routing = synthetic_routing(rng, args.tokens, args.layers, args.experts, args.top_k)
    system = load_system("h100_8gpu").replace(n_gpus=args.gpus, gpus_per_node=min(args.gpus, 8))
    shape = from_name("mixtral-8x7b", n_experts=args.experts, top_k=args.top_k)
    cfg = ReplayConfig(batch_size=args.batch_size)
    tl = args.tokens * args.layers

    t_batch, batches = _median_time(lambda: make_batches(routing, args.gpus, args.experts, cfg), args.repeats)
    S, E = batches.n_steps, args.experts
    flat_index = (batches.step[:, None, None] * args.layers + np.arange(args.layers)[None, :, None]) * E + batches.experts

    def floor():
        return np.bincount(flat_index.ravel(), minlength=S * args.layers * E)

    t_floor, _ = _median_time(floor, args.repeats)
    static = static_plan(batches)
    t_static, _ = _median_time(lambda: simulate(batches, static, shape, system, cfg), args.repeats)
    place = PlaceFn("balanced", system, E)
    t_oplan, oracle = _median_time(lambda: oracle_plan(batches, place), 1)
    t_oracle, _ = _median_time(lambda: simulate(batches, oracle, shape, system, cfg), args.repeats)

    print(f"replay benchmark on {platform.node()} ({platform.processor() or platform.machine()}), numpy {np.__version__}")
    print(f"{args.tokens:,} tokens x {args.layers} layers, {E} experts top-{args.top_k}, {args.gpus} GPUs, "
          f"batch {args.batch_size} requests -> {S:,} steps; median of {args.repeats}")
    print(f"{'stage':<34} {'seconds':>9} {'tok x layer / s':>16} {'x floor':>8}")
    rows = [("floor: bincount of all selections", t_floor), ("batching (make_batches)", t_batch),
            ("simulate, static plan", t_static), ("oracle plan (placement per step)", t_oplan),
            ("simulate, oracle plan (token homes)", t_oracle)]
    for name, t in rows:
        print(f"{name:<34} {t:9.3f} {tl / t:16.3g} {t / t_floor:8.1f}")
    total = t_batch + t_static
    print(f"batch + static replay: {total:.2f} s = {tl / total:.3g} token-layers/s")


if __name__ == "__main__":
    main()
