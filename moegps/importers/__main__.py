"""``python -m moegps.importers {deepseek-csv,olmoe-counts,reconstruct-mixtral} ...``

    python -m moegps.importers deepseek-csv ../shared/data/traces/deepseek-v2-lite-puffin --out traces/deepseek.parquet
    python -m moegps.importers olmoe-counts --model mistral --out mixtral_counts.csv
    python -m moegps.importers reconstruct-mixtral --mmlu --out mixtral_mmlu_reconstructed.parquet --seed 0
    python -m moegps.importers reconstruct-mixtral --domain-text wikipedia --out wiki.parquet
    python -m moegps.importers reconstruct-fidelity
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ..files import atomic_path
from ..trace import RoutingTrace
from .deepseek_csv import read_deepseek_csv
from .olmoe_routing import load_expert_counts
from .reconstruct import domain_token_stream, fidelity, mmlu_token_stream, reconstruct_mixtral_trace


def _summary(trace) -> str:
    m = trace.meta
    imb = trace.loads(by="all").imbalance()[0]
    return (
        f"{m.model}: {len(trace.requests())} requests, {trace.n_tokens} tokens, {len(trace)} rows, "
        f"{m.n_layers} layers x {m.n_experts} experts (top-{m.top_k}); max/mean load per layer "
        f"{imb.min():.2f}-{imb.max():.2f}"
    )


def cmd_deepseek_csv(args):
    vocab = None
    if args.vocab_from:
        vocab = (RoutingTrace.read(args.vocab_from).meta.model_config or {}).get("token_vocab")
        if not vocab:
            raise SystemExit(f"--vocab-from {args.vocab_from}: that trace carries no token vocabulary "
                             "(metadata field model_config.token_vocab)")
    t = time.perf_counter()
    trace = read_deepseek_csv(args.path, limit=args.limit, vocab=vocab)
    where = args.path[0] if len(args.path) == 1 else f"{len(args.path)} paths ({args.path[0]} ... {args.path[-1]})"
    print(f"read {where} in {time.perf_counter() - t:.1f} s: {_summary(trace)}")
    trace.write(args.out)
    print(f"wrote {args.out}")


def cmd_olmoe_counts(args):
    import pandas as pd

    loads = load_expert_counts(args.model, args.domains, top1=args.top1)
    imb = loads.imbalance()
    print(f"{loads.source}: top_k={loads.top_k}; max/mean expert load per layer")
    print("domain".ljust(12) + "".join(f"layer {l:>2}".rjust(10) for l in loads.layer_ids))
    for d, row in zip(loads.groups["domain"], imb):
        print(str(d).ljust(12) + "".join(f"{x:10.3f}" for x in row))
    if args.out:
        D, L, E = loads.counts.shape
        df = pd.DataFrame(
            {
                "domain": np.repeat(loads.groups["domain"], L * E),
                "layer": np.tile(np.repeat(loads.layer_ids, E), D),
                "expert": np.tile(np.arange(E), D * L),
                "count": loads.counts.reshape(-1),
            }
        )
        with atomic_path(args.out) as tmp:
            df.to_csv(tmp, index=False)
        print(f"wrote {args.out} (long format: domain, layer, expert, count)")


def cmd_reconstruct_mixtral(args):

    rng = np.random.default_rng(args.seed)
    if args.domain_text:
        streams = domain_token_stream(args.domain_text, n_tokens=args.tokens)
        request_domain = {i: args.domain_text for i in range(len(streams))}
        dataset = f"olmoe-routing/text/{args.domain_text} (first {args.tokens} Mixtral tokens, 2048-token requests)"
    else:
        streams, subjects = mmlu_token_stream(limit=args.limit, split=args.split)
        request_domain = dict(enumerate(subjects))
        dataset = f"MMLU {args.split} (shared/data/mmlu, zero-shot prompts, Mixtral tokenizer)"
    t = time.perf_counter()
    trace = reconstruct_mixtral_trace(
        streams, rng, domains=args.stats_domains, smoothing=args.smoothing, affinity=not args.no_affinity,
        dataset=dataset, request_domain=request_domain,
    )
    trace.meta.recorded["seed"] = args.seed
    trace.meta.recorded["command"] = " ".join(["python -m moegps.importers"] + sys.argv[1:])
    print(f"drew in {time.perf_counter() - t:.1f} s: {_summary(trace)}")
    trace.write(args.out)
    print(f"wrote {args.out}")


def cmd_reconstruct_fidelity(args):
    import pandas as pd

    rng = np.random.default_rng(args.seed)
    rows = [r for d in args.domains for r in fidelity(d, rng, smoothing=args.smoothing)]
    df = pd.DataFrame(rows)
    cols = ["domain", "layer_id", "load_tv_no_tilt", "load_tv_tilt", "hit_source", "hit_no_tilt", "hit_tilt",
            "cross_tv_no_tilt", "cross_tv_tilt"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.out:
        df[cols].to_csv(args.out, index=False)
        print(f"wrote {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m moegps.importers", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("deepseek-csv", help="DeepSeek-V2-Lite per-token CSVs -> RoutingTrace parquet")
    p.add_argument("path", nargs="+", help="folders of prompt_<n>_data.csv files and/or files; several are "
                   "read as one trace with one token vocabulary (request ids in the order given)")
    p.add_argument("--vocab-from", default=None, help="a trace whose token vocabulary the ids extend (so that a "
                   "test set imported later shares the training set's id space)")
    p.add_argument("--out", required=True, help="output trace (.parquet)")
    p.add_argument("--limit", type=int, default=None, help="first N files by request id")
    p.set_defaults(func=cmd_deepseek_csv)

    p = sub.add_parser("olmoe-counts", help="real Mixtral/OLMoE per-layer expert counts: table, optional CSV")
    p.add_argument("--model", default="mistral", choices=["mistral", "olmoe", "olmoe-sft", "olmoe-dpo"])
    p.add_argument("--domains", nargs="*", default=None)
    p.add_argument("--top1", action="store_true", help="first-choice counts only")
    p.add_argument("--out", default=None, help="CSV (domain, layer, expert, count)")
    p.set_defaults(func=cmd_olmoe_counts)

    p = sub.add_parser("reconstruct-mixtral", help="draw a reconstructed Mixtral-8x7B trace (layers 0, 7, 15)")
    p.add_argument("--out", required=True, help="output trace (.parquet)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mmlu", action="store_true", help="MMLU questions (default)")
    src.add_argument("--domain-text", default=None, help="a routing-statistics domain text (arxiv, book, c4, github, wikipedia)")
    p.add_argument("--limit", type=int, default=None, help="first N MMLU questions")
    p.add_argument("--split", default="test", help="MMLU split folder (test, dev)")
    p.add_argument("--tokens", type=int, default=102 * 2048, help="tokens of --domain-text")
    p.add_argument("--stats-domains", nargs="*", default=None, help="statistics to pool (default all five)")
    p.add_argument("--smoothing", type=float, default=1.0, help="pseudo-count toward the layer marginal")
    p.add_argument("--no-affinity", action="store_true", help="draw layers independently given the token id")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reconstruct_mixtral)

    p = sub.add_parser("reconstruct-fidelity", help="how closely reconstructions reproduce each domain's real statistics")
    p.add_argument("--domains", nargs="*", default=["arxiv", "book", "c4", "github", "wikipedia"])
    p.add_argument("--smoothing", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV")
    p.set_defaults(func=cmd_reconstruct_fidelity)

    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
