"""Another device's tuned entries on this one: each (shape, tokens), the config this device's table serves
against the one another device's table serves (e.g. the H200's on an H100: both Hopper, 132 SMs, the
H200's table the newer, with the wgmma paths), checked and timed in the same rounds.

    python benchmarks/kernels/table_probe.py --other NVIDIA_H200 [--shapes mixtral-8x7b deepseek-v2-lite] \
        [--tokens 512 2048 8192] [--seed 41] [--write-config]

For each row: both calls' relative error against the fp32 reference (a row fails above 1e-2), the medians of
time_many (interleaved rounds, CUDA graphs, L2 flushed by a clean read) of both calls and of cuBLAS's bmm of
the same projections on balanced rows, each as % of the floor measured in the same rounds (the bench's).
`--write-config`: each row's winner goes into this device's table at that token count, the other table's entry
where it beats this one's by >= 2%, else this one's (written too, so that a neighbour's new entry does not become
its nearest); an entry records its time and the command ("tuned_by" or "kept_by"). One GPU.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from moegps.kernels import timing
from moegps.kernels.bench import balanced_bmm, ceiling_runs, floors_us, rates
from moegps.kernels.launch import device_name, fused_moe, get_config
from moegps.kernels.reference import moe_reference
from moegps.kernels.timing import make_inputs, make_routing, rel_err, time_many
from moegps.kernels.tune import describe, expert_dims, shared_columns, write_size_winner


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", required=True, help="the table to try, named as in moegps/kernels/configs/")
    parser.add_argument("--shapes", nargs="*", default=["mixtral-8x7b", "deepseek-v2-lite"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--seed", type=int, default=41)
    parser.add_argument("--write-config", action="store_true")
    args = parser.parse_args(argv)
    timing.FLUSH = "clean"
    print(f"device: {torch.cuda.get_device_name()}; its table {device_name()} against {args.other}", flush=True)
    failed = []
    command = " ".join(["python benchmarks/kernels/table_probe.py", *(argv or sys.argv[1:])])
    # what this device's table serves, read before anything is written (an entry written at one size would be
    # the nearest at the next)
    own = {(name, n): get_config(n, *expert_dims(name)) for name in args.shapes for n in args.tokens}
    for name in args.shapes:
        n_experts, hidden, ffn, top_k = dims = expert_dims(name)
        for n_tokens in args.tokens:
            configs = {"own": own[name, n_tokens], "other": get_config(n_tokens, *dims, table=args.other)}
            x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, args.seed)
            ids, weights = make_routing(n_tokens, n_experts, top_k, args.seed, shared=shared_columns(name))
            ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float())
            fns = {label: (lambda c=config: fused_moe(x, w13, w2, ids, weights, config=c))
                   for label, config in configs.items()}
            errs = {label: rel_err(fn(), ref) for label, fn in fns.items()}
            failed += [f"{name} T={n_tokens} {label}" for label, err in errs.items() if not err < 1e-2]
            active = int(torch.unique(ids).numel())
            fns["bmm"] = balanced_bmm(w13, w2, active, math.ceil(n_tokens * top_k / active))
            us = time_many({**fns, **ceiling_runs()}, graph=set(fns))
            floor = max(floors_us(active, hidden, ffn, n_tokens, top_k, rates(us))["call"])
            print(f"{name} T={n_tokens}: own {describe(configs['own'])}\n  other {describe(configs['other'])}\n  "
                  + ", ".join(f"{label} {us[label]:.1f} us ({100 * floor / us[label]:.0f}%)" for label in fns)
                  + f"; other/own {us['own'] / us['other']:.3f}x faster; errors "
                  + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
            if args.write_config and not failed:  # row by row: a run cut short keeps what it finished
                write_size_winner(name, n_tokens, configs["own"], configs["other"], us["own"], us["other"], command)
    if failed:
        raise SystemExit(f"checks failed (relative error >= 1e-2): {failed}")


if __name__ == "__main__":
    main()
