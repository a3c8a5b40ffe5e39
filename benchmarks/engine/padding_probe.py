"""What a chunk's padding rows cost: the graphed step of ``--rows`` decode rows (at ``--context``) beside a chunk of
``--chunk`` (256) tokens that holds the first L tokens of an MMLU prompt, at position 0 of its slot, padded with
token 0 (as serving's chunked policy pads a prompt's last piece), the padding rows routing as themselves
(``Engine(alias_free_rows=False)``, ``serve --free-rows token0``) and as the piece's rows, cyclically (the default:
``model.decode_step_with_chunk``); beside the times, the experts the chunk's rows pick in each MoE layer (an eager
prefill of the padded chunk): distinct, and the blocks of 64 and of 128 rows they fill, for the piece alone,
padded, and cycled, as means over the layers. Token 0 at consecutive positions picks the same few experts, so
padding piles rows on them (on the CPU, random Mixtral-size layers, eight MMLU pieces: 9.6 blocks of 128 a layer
padded against 8.5 cycled and 8.1 for the pieces alone). GPU; ``--device cpu`` checks that it runs. Session ab's
H100 figures: benchmarks/engine/serve-chunk-graphs-h100-2026-12-05-ab/.

    PYTHONPATH=. python benchmarks/engine/padding_probe.py --shape deepseek-v2-lite --pieces 40 100 160 --rows 1 16
    PYTHONPATH=. python benchmarks/engine/padding_probe.py --shape mixtral-8x7b --layers 16 ...   # an 80 GB GPU
"""

import argparse

import numpy as np
import torch

from moegps.engine.bench import chunk_step_engine
from moegps.engine.generate import bucket_for
from moegps.engine.model import KVCache, prefill, random_model
from moegps.engine.serve import mmlu_questions, mmlu_requests
from moegps.executor.generate import device_ms, wall_ms
from moegps.files import markdown_table
from moegps.shapes import from_name


def moe_ids(model, run) -> list[torch.Tensor]:
    """Each MoE layer's top-k expert ids ``[tokens, k]`` as its expert kernels get them (``Model.expert_ids``),
    while ``run()`` runs the model eagerly (``model.count_routes`` counts the router's choices, before
    ``route_as``)."""
    model.expert_ids = []
    try:
        with torch.inference_mode():
            run()
        return model.expert_ids
    finally:
        model.expert_ids = None


def chunk_ids(model, tokens: list[int]) -> list[torch.Tensor]:
    """Each MoE layer's top-k expert ids ``[len(tokens), k]`` for ``tokens`` prefilled as one prompt (eager)."""
    cache = KVCache(model.shape, 1, len(tokens), model.dtype, model.device)
    return moe_ids(model, lambda: prefill(model, cache, [torch.tensor(tokens, device=model.device)]))


def mmlu_pieces(lengths: list[int], mmlu=None) -> list[list[int]]:
    """For each length L, the first L tokens of the first of 128 MMLU requests (serve's draw) with at least L."""
    prompts = [r.prompt for r in mmlu_requests(128, 0.0, 32, 0, questions=mmlu_questions(mmlu))]
    return [next(p for p in prompts if len(p) >= length)[:length] for length in lengths]


def fill(ids: torch.Tensor, n_experts: int) -> np.ndarray:
    """``ids [rows, k]`` -> [distinct experts, blocks of 64 rows, blocks of 128 rows] those rows fill."""
    counts = np.bincount(ids.reshape(-1).cpu().numpy(), minlength=n_experts)
    return np.array([(counts > 0).sum(), np.ceil(counts / 64).sum(), np.ceil(counts / 128).sum()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="the shape's first N layers only")
    ap.add_argument("--pieces", type=int, nargs="+", default=[70, 100, 130], help="prompt tokens in the chunk")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="decode rows beside the chunk")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--mmlu", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a check that it runs (wall-clock times, float32)")
    args = ap.parse_args()
    shape = from_name(args.shape)
    cuda = args.device == "cuda"
    model = random_model(shape.replace(n_layers=args.layers) if args.layers else shape, args.device,
                         torch.bfloat16 if cuda else torch.float32)
    timed = device_ms if cuda else wall_ms
    S = model.shape
    gen = torch.Generator().manual_seed(4)
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}: {args.shape}, {S.n_layers} layers, a prompt's first "
          f"chunk of {args.chunk} tokens, decode rows at context {args.context}")
    routing, times = [], []
    for length, piece in zip(args.pieces, mmlu_pieces(args.pieces, args.mmlu)):
        ids = chunk_ids(model, piece + [0] * (args.chunk - length))
        cycle = torch.arange(args.chunk, device=model.device) % length
        by = {kind: np.mean([fill(rows, S.n_experts) for rows in chosen], axis=0) for kind, chosen in
              (("piece", [i[:length] for i in ids]), ("padded", ids), ("cycled", [i[cycle] for i in ids]))}
        routing.append({"piece": length, **{f"{kind}: experts / blocks of 64 / of 128": " / ".join(f"{v:.1f}" for v in
                                                                                             by[kind])
                                             for kind in by}})
        for rows in args.rows:
            ms = {}
            for alias in (False, True):
                engine, _ = chunk_step_engine(model, rows, args.chunk, args.context, gen, piece, alias)
                with torch.inference_mode():
                    ms[alias] = timed(engine.step(bucket_for(rows), args.chunk), 20, warmup=3)
                del engine
                if cuda:
                    torch.cuda.empty_cache()
            times.append({"piece": length, "decode rows": rows, "ms, padding as itself": ms[False],
                          "ms, padding cycled": ms[True], "cycled / as itself": ms[True] / ms[False]})
    print("the chunk's rows, mean over MoE layers\n" + markdown_table(routing))
    print("the step (graphed on a GPU)\n" + markdown_table(times))


if __name__ == "__main__":
    main()
