r"""A/B of the routing metadata (routing.align) against a baseline copy of routing.py, in the same rounds.

    git show <rev>:moegps/kernels/routing.py | sed 's/^from \.pdl/from moegps.kernels.pdl/' > /tmp/routing_base.py
    python benchmarks/kernels/ab_align.py --baseline /tmp/routing_base.py \
        [--shapes mixtral-8x7b deepseek-v2-lite] [--tokens 512 2048 8192 16384] [--method chunked]

For each (shape, tokens): the bench's random routing, align at BLOCK_M 128 with half tails (the wgmma
path's) by both versions and by this tree's one-launch walk, timed by time_many (interleaved rounds,
CUDA graphs, L2 flushed by a clean read); both versions' outputs compared bit for bit (sorted rows,
block tables, the inverse map). One NVIDIA GPU.
"""

from __future__ import annotations

import argparse

import torch

from moegps.kernels import routing, timing
from moegps.kernels.timing import make_routing, time_many
from moegps.kernels.tune import expert_dims, shared_columns

from ab_wgmma import load  # (this script's folder is on the path when it runs)


def same(a, b) -> bool:
    """Two RoutingMetas alike on every entry the kernels read."""
    n_blocks, n_padded = int(a.n_blocks[0]), int(a.n_padded[0])
    return (n_blocks == int(b.n_blocks[0]) and n_padded == int(b.n_padded[0])
            and torch.equal(a.sorted_pair_ids[:n_padded], b.sorted_pair_ids[:n_padded])
            and torch.equal(a.block_start[:n_blocks + 1], b.block_start[:n_blocks + 1])
            and torch.equal(a.block_expert[:n_blocks], b.block_expert[:n_blocks])
            and torch.equal(a.pair_slot, b.pair_slot))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="a copy of an older routing.py")
    parser.add_argument("--shapes", nargs="*", default=["mixtral-8x7b", "deepseek-v2-lite"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[512, 2048, 8192, 16384])
    parser.add_argument("--method", default="chunked", choices=["one", "chunked"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = load(args.baseline, "routing_baseline")
    timing.FLUSH = "clean"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name in args.shapes:
        n_experts, _, _, top_k = expert_dims(name)
        for n_tokens in args.tokens:
            ids, _ = make_routing(n_tokens, n_experts, top_k, args.seed, shared=shared_columns(name))
            fns = {version: (lambda m=module, method=method: m.align(ids, n_experts, 128, half_tail=True,
                                                                       method=method))
                   for version, module, method in (("new", routing, args.method),
                                                    ("base", base, args.method), ("one", routing, "one"))}
            alike = same(fns["new"](), fns["base"]())
            times = time_many(fns, graph=set(fns))
            print(f"{name:18s} T={n_tokens:6d} ({-(-n_tokens * top_k // routing.SCAN):3d} chunks): "
                  f"{args.method} {times['new']:6.1f} us against the baseline's {times['base']:6.1f}, "
                  f"one launch {times['one']:6.1f}; {'identical' if alike else 'DIFFERENT'}", flush=True)


if __name__ == "__main__":
    main()
