"""A/B of the wgmma path's kernels against a baseline copy of wgmma_moe.py, in the same rounds.

    git show <rev>:moegps/kernels/wgmma_moe.py > /tmp/wgmma_base.py
    python benchmarks/kernels/ab_wgmma.py --baseline /tmp/wgmma_base.py \
        [--shapes mixtral-8x7b deepseek-v2-lite] [--tokens 2048 8192]

For each (shape, tokens): the shipped config where it is a wgmma_moe one (not swap), else the
probe's "ht" tile; routing computed once; each GEMM launch of both versions (and for a one-launch config
its launch of both GEMMs too) timed by time_many (interleaved rounds,
CUDA graphs, L2 flushed by a clean read); both versions' h and y compared on the rows that hold
pairs: identical bit for bit where the change keeps the arithmetic, else each version's h against
an fp32 reference (relative error), which is what a change of the arithmetic must keep. One
NVIDIA Hopper GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from moegps.kernels import launch, wgmma_moe
from moegps.kernels.launch import get_config
from moegps.kernels.reference import swiglu
from moegps.kernels import timing
from moegps.kernels.timing import make_inputs, make_routing, time_many
from moegps.kernels.tune import expert_dims, shared_columns

HT = {"path": "wgmma", "block_m": 128, "half_tail": True,
      "gate_up": {"block_n": 128, "block_k": 64, "num_stages": 4, "group_m": 8},
      "down": {"block_n": 256, "block_k": 64, "num_stages": 4, "group_m": 8}}


def load(path: str, name: str = "wgmma_baseline"):
    """A baseline copy of a module, from its file, as module `name` (registered before it runs:
    a dataclass looks its module up in sys.modules). benchmarks/kernels/ab_align.py loads with it too."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def launches(module, x, w13, w2, gates, routing, config, top_k):
    """{gate_up, down} of one version of the kernels, on buffers made once (h from a first run),
    and for a one-launch config both GEMMs in one launch too ("gate_up+down": y)."""
    def gate_up():
        return launch.wgmma_gate_up(x, w13, routing, config, top_k, kernels=module)
    h = gate_up()
    fns = {"gate_up": gate_up, "down": lambda: module.launch_down(h, w2, gates, routing, config)}
    if config.get("one_launch"):
        a, rows_top_k = launch.gate_up_rows(x, routing, config, top_k)
        fns["gate_up+down"] = lambda: module.launch_moe(a, w13, w2, gates, routing, config, rows_top_k)
    return fns


def reference_h(x, w13, ids, sorted_pairs, top_k):
    """fp32 h of the given sorted rows (pair ids): silu(x[t] @ w1[e]^T) * (x[t] @ w3[e]^T)."""
    experts = ids.reshape(-1)[sorted_pairs]
    h = torch.empty(sorted_pairs.numel(), w13.shape[1] // 2, device=x.device)
    for e in experts.unique().tolist():
        rows = experts == e
        h[rows] = swiglu(x[sorted_pairs[rows] // top_k].float(), w13[e].float())
    return h


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="a copy of wgmma_moe.py to compare with")
    parser.add_argument("--shapes", nargs="*", default=["mixtral-8x7b", "deepseek-v2-lite"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192])
    args = parser.parse_args(argv)
    base = load(args.baseline)
    timing.FLUSH = "clean"
    print(f"device: {torch.cuda.get_device_name()}, baseline {args.baseline}")
    for name in args.shapes:
        dims = expert_dims(name)
        n_experts, hidden, ffn, top_k = dims
        for n_tokens in args.tokens:
            config = get_config(n_tokens, *dims)
            # (a swap config runs wgmma_swap.py's kernels, which this A/B does not load)
            config = config if config["path"] == "wgmma" and not config.get("swap") else HT
            x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens)
            ids, weights = make_routing(n_tokens, n_experts, top_k, shared=shared_columns(name))
            routing = launch.route(ids.reshape(-1), n_experts, config)
            gates = weights.reshape(-1)
            fns = {}
            for label, module in (("base", base), ("new", wgmma_moe)):
                for part, fn in launches(module, x, w13, w2, gates, routing, config, top_k).items():
                    fns[f"{label}.{part}"] = fn
            outs = {k: fn() for k, fn in fns.items()}
            pairs = routing.sorted_pair_ids[:int(routing.n_padded[0])]
            real = pairs < routing.n_pairs  # not padding
            rows = {k: out[:real.numel()][real] for k, out in outs.items()}
            parts = [k.removeprefix("new.") for k in fns if k.startswith("new.")]
            same = all(torch.equal(rows[f"base.{p}"], rows[f"new.{p}"]) for p in parts)
            if same:
                verdict = "outputs identical"
            else:
                ref = reference_h(x, w13, ids, pairs[real].long(), top_k)
                verdict = (f"outputs differ; h against fp32: base {timing.rel_err(rows['base.gate_up'], ref):.2e}, "
                           f"new {timing.rel_err(rows['new.gate_up'], ref):.2e}")
            us = time_many(fns, graph=set(fns))
            cells = ", ".join(f"{p} {us[f'base.{p}']:.1f} -> {us[f'new.{p}']:.1f} us "
                              f"({us[f'base.{p}'] / us[f'new.{p}']:.3f}x)" for p in parts)
            print(f"{name:18s} T={n_tokens:6d} {'shipped' if config is not HT else 'ht'}: {cells}; {verdict}",
                  flush=True)


if __name__ == "__main__":
    main()
