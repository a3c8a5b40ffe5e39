"""The decode QKV projection with the rotary embedding and the K/V cache write in its epilogue
(``moegps.engine.kernels.qkv_rope_cache_write``, one launch) against the same as two launches (the skinny
projection, then ``rope_cache_write``), per model shape and batch; its launch settings swept (why
QKV_ROPE_DEFAULTS).

    PYTHONPATH=. python benchmarks/engine/qkv_rope_probe.py [--sweep]

A time is the median over 10 replays of a CUDA graph of 24 back-to-back calls (router_probe.graph_us), each on
the next of enough weight copies (>= 400 MB) that none is still in L2 when it comes round again, as in a decode
step, with programmatic dependent launch as the engine runs it. Floor: the QKV weight bytes over the copy rate
measured here. Every setting's q and cache rows are first checked against the two-launch path's.
"""

import argparse
import itertools

import torch
import triton

from moegps.engine import kernels as K
from moegps.executor.generate import copy_bandwidth
from moegps.shapes import from_name
from router_probe import graph_us, print_ranking  # this folder's: the scripts run from it

CALLS = 24
SWEEP = [dict(pairs=p, block_k=bk, num_warps=w, num_stages=st)
         for p, bk, w, st in itertools.product((16, 32), (128, 256), (4, 8), (3, 4, 6))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "deepseek-v2-lite"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--sweep", action="store_true", help="time every SWEEP setting too")
    args = ap.parse_args()
    rate = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: copy "
          f"{rate / 1e12:.2f} TB/s; defaults {K.QKV_ROPE_DEFAULTS}")
    print("| shape | batch | two launches us | one launch us | floor us | two launches % | one launch % | "
          "one / two | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sweep_rows = []
    for name in args.shapes:
        S = from_name(name)
        N, H = (S.n_heads + 2 * S.n_kv_heads) * S.head_dim, S.hidden
        copies = max(2, -(-400_000_000 // (N * H * 2)))
        weights = [torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H ** -0.5
                   for _ in range(copies)]
        floor = N * H * 2 / rate * 1e6
        cos, sin = K.rope_tables(4096, S.head_dim, S.rope_theta, "cuda")
        for T in args.batches:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
            pos = torch.randint(0, 4096, (T,), device="cuda", generator=gen)
            slots = torch.arange(T, device="cuda")
            caches = [torch.zeros(T, S.n_kv_heads, 4096, S.head_dim, device="cuda", dtype=torch.bfloat16)
                      for _ in range(4)]

            def two(w):
                return K.rope_cache_write(K.linear(x, w), caches[0], caches[1], pos, slots, cos, sin, S.n_heads,
                                          S.n_kv_heads)

            def one(w, **s):
                return K.qkv_rope_cache_write(x, w, caches[2], caches[3], pos, slots, cos, sin, S.n_heads,
                                              S.n_kv_heads, **s)

            def diff(w, **s):
                """Largest difference of q and the written K/V rows from the two-launch path's, over their
                largest magnitude."""
                outs = [(two(w), caches[0][slots, :, pos], caches[1][slots, :, pos]),
                        (one(w, **s), caches[2][slots, :, pos], caches[3][slots, :, pos])]
                return max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                           for a, b in zip(outs[1], outs[0]))

            walk = itertools.cycle(weights)
            t_two = graph_us(lambda: two(next(walk)), calls=CALLS)
            t_one = graph_us(lambda: one(next(walk)), calls=CALLS)
            print(f"| {name} | {T} | {t_two:.2f} | {t_one:.2f} | {floor:.2f} | {100 * floor / t_two:.1f} | "
                  f"{100 * floor / t_one:.1f} | {t_one / t_two:.3f} | {diff(weights[0]):.1e} |", flush=True)
            if args.sweep:
                for s in SWEEP:
                    if (S.head_dim // 2) % s["pairs"]:
                        continue
                    try:
                        err = diff(weights[0], **s)
                        t = graph_us(lambda: one(next(walk), **s), calls=CALLS)
                    except triton.runtime.errors.OutOfResources:
                        continue
                    sweep_rows.append((name, T, t, t / t_two, err, s))
        del weights
        torch.cuda.empty_cache()
    if sweep_rows:
        print("\nbest settings per shape and batch (one launch; time, its ratio to two launches, max rel diff):")
        for (name, T), rows in itertools.groupby(sweep_rows, key=lambda r: r[:2]):
            rows = sorted(rows, key=lambda r: r[2])
            print(f"{name} batch {T}: " + "; ".join(f"{us:.2f} us ({ratio:.3f}, {err:.0e}) {s}"
                                                    for _, _, us, ratio, err, s in rows[:3]))
        print_ranking([(s, us) for _, _, us, _, _, s in sweep_rows], K.QKV_ROPE_DEFAULTS)


if __name__ == "__main__":
    main()
