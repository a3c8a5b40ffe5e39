"""The wgmma path's row gather on one GPU: launch.gather_rows (one Triton launch that skips padding
rows) at a few block settings, against the torch form it replaced (clamp, divide, index_select of
every row, padding included), at the prefill sizes where the wgmma path runs.

    PYTHONPATH=. python benchmarks/kernels/gather_probe.py [--tokens 2048 8192]

Times: time_many (every method of a row in the same rounds, CUDA graphs, L2 flushed by a clean
read before each run). Floor: the bytes that must move (the used rows written, each token row
read once) over the copy rate measured here. Each setting's copied rows are checked against
torch's before it is timed.
"""

from __future__ import annotations

import argparse

import torch

from moegps.executor.generate import copy_bandwidth
from moegps.kernels import launch
from moegps.kernels.timing import make_routing, time_many

SHAPES = {"mixtral-8x7b": (8, 4096, 2), "deepseek-v2-lite": (64, 2048, 6)}
SETTINGS = [(r, h, w) for r in (1, 2, 4, 8) for h in (512, 1024, 2048) for w in (4, 8)]


def torch_gather(x, routing, top_k):
    """The wgmma path's gather before session 12: every row, padding rows reading a valid row."""
    rows = torch.clamp(routing.sorted_pair_ids, min=0, max=routing.n_pairs - 1) // top_k
    return x.index_select(0, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192])
    args = parser.parse_args(argv)
    copy_rate = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {copy_rate / 1e12:.2f} TB/s")
    for name in args.shapes:
        n_experts, hidden, top_k = SHAPES[name]
        for n_tokens in args.tokens:
            x = torch.randn(n_tokens, hidden, device="cuda", dtype=torch.bfloat16)
            ids, _ = make_routing(n_tokens, n_experts, top_k, seed=n_tokens)
            routing = launch.route(ids.reshape(-1), n_experts, {"path": "wgmma", "block_m": 128,
                                                                "half_tail": True})
            ref = torch_gather(x, routing, top_k)
            used = int(routing.n_padded)
            real = (routing.sorted_pair_ids[:used] < routing.n_pairs).nonzero().squeeze(1)
            fns = {"torch": lambda: torch_gather(x, routing, top_k)}
            for r, h, w in SETTINGS:
                out = launch.gather_rows(x, routing, top_k, block_r=r, block_h=h, num_warps=w)
                assert torch.equal(out[real], ref[real]), (name, n_tokens, r, h, w)
                fns[f"r{r}_h{h}_w{w}"] = (lambda r=r, h=h, w=w:
                                          launch.gather_rows(x, routing, top_k, block_r=r, block_h=h, num_warps=w))
            times = time_many(fns, graph=set(fns))
            floor_us = (real.numel() + n_tokens) * hidden * 2 / copy_rate * 1e6
            best = min((k for k in times if k != "torch"), key=times.get)
            print(f"{name} T={n_tokens}: {real.numel()} rows of {used} used, {routing.sorted_pair_ids.numel()} "
                  f"allocated; floor {floor_us:.1f} us; torch {times['torch']:.1f} us "
                  f"({100 * floor_us / times['torch']:.0f}% of floor); best {best} {times[best]:.1f} us "
                  f"({100 * floor_us / times[best]:.0f}%), {times['torch'] / times[best]:.2f}x torch")
            print("  " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: kv[1])),
                  flush=True)


if __name__ == "__main__":
    main()
