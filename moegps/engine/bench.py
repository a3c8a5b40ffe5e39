"""Benchmark of the engine against transformers on one GPU (random bf16 weights of a real shape).

    python -m moegps.engine.bench --out benchmarks/results/engine       # everything below
    python -m moegps.engine.bench --parts decode ttft --batches 1 8 --contexts 128
    python -m moegps.engine.bench --shapes mixtral-8x7b --layers 16 --parts ttft   # half of Mixtral: fits an H100
    python -m moegps.engine.bench --replot runs/engine_bench.json --out figures   # a saved run's plots

Parts (``--parts``), each printed as a table and written to ``--out`` (JSON rows, report.md, plot):

* ``checks``: each engine kernel at the shape's sizes in bf16 against a float64 torch reference on
  fresh random inputs, outputs poisoned with NaN first (relative error; every element written).
* ``ceilings``: the copy rate (2 GiB device copy, bytes read + written) and the bf16 matmul rate
  (8192^3 on random data), measured first; every floor below is computed from them.
* ``agree``: the engine against transformers on the same weights (the engine takes views of the
  transformers model's tensors): logits' relative error and teacher-forced top-1 agreement, beside
  transformers' own grouped_mm path against its eager experts (what bf16 rounding alone gives).
* ``decode``: per-step decode latency and tokens/s at each batch and context (``--new-tokens``
  steps, one CUDA graph per bucket, median of ``--reps`` runs) against the floor per step:
  (non-expert weights + lm_head + distinct experts touched per layer x expert bytes + KV-cache
  bytes) / copy rate. Distinct experts are counted from this run's routing. ``--decode-variants``
  also times the step with one of the engine's choices changed (DECODE_VARIANTS), side by side.
* ``attention``: the decode-attention kernel alone against its floor (KV bytes / copy rate).
* ``ttft``: time to first token at batch 1 and each ``--prompts`` length against the matmul floor
  (2 x active parameters x tokens / matmul rate, attention FLOPs included), at the ceilings' rate and
  at the rate of matmul bursts timed in rounds beside the prompt (same power and heat); timed back to
  back with those bursts (a GPU kept busy) and, ``--rest-s``, each after the GPU idled (a prompt
  arriving at an idle server), against bursts started from the same rest; the GPU's idle time
  between kernels and the host's time to issue the prefill; eager and as a CUDA graph
  (PrefillGraphs, what the engine runs for one prompt).
* ``pack``: several prompts prefilled at once (``--packs``: their counts, lengths drawn in 40-250 tokens), eager
  against the packed prefill graph (``part_pack``), with the pack's floor.
* ``chunk``: chunked prefill's price (``part_chunk``): per batch (``--batches``) and chunk size (``--chunks``),
  the decode step alone, with a prompt chunk beside it, and the chunk prefilled alone, at ``--chunk-context``.
* ``peers``: transformers in the same run: ``generate()`` as shipped, transformers under the
  project's graphed static-cache loop, and (``--compile``) static cache + torch.compile with
  grouped_mm kept in decode (its switch to batched_mm set aside: that copies the chosen experts'
  weights every step).
* ``breakdown``: where a decode step's time goes (attention, norms, MoE, lm_head, gaps), the
  engine beside transformers' graphed loop, from the profiler's kernel times; a stacked bar plot.

Decode and time-to-first-token rows also record the SM clock (median ``sm_MHz``, least
``sm_MHz_min``) and power (``power_W``) that nvidia-smi sampled while they were timed
(``kernels.timing.gpu_clocks``): the power cap moves the clock, and with it whatever is bound by
the tensor cores or L2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from ..executor.generate import (copy_bandwidth, device_ms, set_experts_implementation, static_decode,
                                 wall_ms)
from ..files import markdown_table
from ..kernels import deterministic_algorithms
from ..kernels.timing import gpu_clocks
from ..models.adapters import cache_argument
from ..shapes import ModelShape, from_name
from . import kernels as K
from .generate import BUCKETS, Engine, PrefillGraphs, bucket_for
from .kernels import ATTENTION_DEFAULTS, decode_attention
from .model import (KVCache, Model, decode_step, from_transformers, prefill, random_model,
                    weight_bytes_per_step)

PARTS = ("checks", "ceilings", "agree", "decode", "attention", "ttft", "pack", "chunk", "peers", "breakdown")


# ---- measuring ---------------------------------------------------------------------------------
# device_ms and copy_bandwidth are the executor's. Small kernels are timed with graph=True (a captured
# graph's replay, as the engine runs its decode step): timed eagerly, the host's launch cost of a few
# microseconds per Triton launch from Python would be measured instead of the kernel.

def _matmul_ms() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return device_ms(lambda: a @ b, reps=20)


def ceilings() -> dict:
    copy_rate, mm_ms = copy_bandwidth(), _matmul_ms()  # each frees its buffers on return
    torch.cuda.empty_cache()
    return dict(copy_bytes_per_s=copy_rate, matmul_flops_per_s=2 * 8192 ** 3 / (mm_ms * 1e-3),
                device=torch.cuda.get_device_name(), torch=torch.__version__, host=host_cpu())


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host's CPU model (from `cpuinfo`, Linux's) and cores: transformers' generate() at batch 1
    is bound by the host's Python (26.9-28.7 ms a step on one H200 machine's host, 36-43 ms on
    others'; docs/engine.md)."""
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def random_hf_mixtral(shape: ModelShape, seed: int = 0):
    """transformers' MixtralForCausalLM of ``shape`` in bf16, built on the GPU, weights ~ N(0, fan_in^-1)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden, intermediate_size=shape.expert_ffn,
                           num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                           num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                           num_local_experts=shape.n_experts, num_experts_per_tok=shape.top_k,
                           rope_theta=shape.rope_theta, rms_norm_eps=shape.norm_eps, max_position_embeddings=16384,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = MixtralForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            else:
                p.fill_(1.0)
    return model


def distinct_experts_per_layer(engine: Engine, bucket: int, steps: int = 4) -> list[float]:
    """Mean over ``steps`` eager decode steps of each layer's number of distinct experts chosen."""
    model = engine.model
    counts = model.count_routes()
    touched = torch.zeros(len(model.layers), device=model.device)
    with torch.inference_mode():
        for _ in range(steps):
            counts.zero_()
            logits = decode_step(model, engine.cache, engine.tokens[:bucket], engine.positions[:bucket])
            touched += (counts > 0).sum(1)
            engine.tokens[:bucket] = logits.argmax(-1)
    model.routing_counts = None
    return (touched / steps).tolist()


# ---- parts -------------------------------------------------------------------------------------

def part_checks(shape: ModelShape) -> list[dict]:
    S, dev, bf = shape, "cuda", torch.bfloat16
    rows = []

    def rel(out, ref):
        return float((out.double() - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("nan")

    T = 37
    resid, delta, w = (torch.randn(T, S.hidden, device=dev, dtype=bf), torch.randn(T, S.hidden, device=dev, dtype=bf),
                       torch.randn(S.hidden, device=dev, dtype=bf))
    out = torch.full_like(resid, float("nan"))
    r64 = resid.double().clone()
    K.add_rmsnorm(resid, delta, w, S.norm_eps, out=out)
    rows.append(dict(kernel="add_rmsnorm", rel_err=rel(out, K.add_rmsnorm_torch(r64, delta.double(), w.double(),
                                                                                S.norm_eps))))
    width = (S.n_heads + 2 * S.n_kv_heads) * S.head_dim
    qkv = torch.randn(T, width, device=dev, dtype=bf)
    cos, sin = K.rope_tables(8192, S.head_dim, S.rope_theta, dev)
    pos, slots = torch.randint(0, 8192, (T,), device=dev), torch.randperm(64, device=dev)[:T]
    kc = torch.full((64, S.n_kv_heads, 8192, S.head_dim), float("nan"), device=dev, dtype=bf)
    vc = kc.clone()
    k64 = torch.zeros(kc.shape, dtype=torch.float64, device=dev)
    v64 = torch.zeros_like(k64)
    q = K.rope_cache_write(qkv, kc, vc, pos, slots, cos, sin, S.n_heads, S.n_kv_heads)
    q64 = K.rope_cache_write_torch(qkv.double(), k64, v64, pos, slots, cos.double(), sin.double(), S.n_heads,
                                   S.n_kv_heads)
    rows.append(dict(kernel="rope_cache_write", rel_err=max(rel(q, q64), rel(kc[slots, :, pos], k64[slots, :, pos]),
                                                           rel(vc[slots, :, pos], v64[slots, :, pos]))))
    for rows_in in (1, 8, K.FUSED_QKV_ROPE_MAX_ROWS):  # the decode QKV projection with rotary and cache write
        x = torch.randn(rows_in, S.hidden, device=dev, dtype=bf)
        w_qkv = torch.randn(width, S.hidden, device=dev, dtype=bf) * S.hidden ** -0.5
        for cache in (kc, vc):
            cache.fill_(float("nan"))
        s, p = slots[:rows_in], pos[:rows_in]
        q = K.qkv_rope_cache_write(x, w_qkv, kc, vc, p, s, cos, sin, S.n_heads, S.n_kv_heads)
        q64 = K.rope_cache_write_torch(x.double() @ w_qkv.double().T, k64, v64, p, s, cos.double(), sin.double(),
                                       S.n_heads, S.n_kv_heads)
        rows.append(dict(kernel=f"qkv_rope_cache_write T={rows_in}", rel_err=max(
            rel(q, q64), rel(kc[s, :, p], k64[s, :, p]), rel(vc[s, :, p], v64[s, :, p]))))
    for B, length in ((1, 1), (3, 4096), (32, 1000)):
        lens = torch.randint(1, length + 1, (B,), device=dev, dtype=torch.int32)
        lens[0] = length
        q = torch.randn(B, S.n_heads, S.head_dim, device=dev, dtype=bf)
        kc = torch.randn(B, S.n_kv_heads, length + 5, S.head_dim, device=dev, dtype=bf)
        vc = torch.randn_like(kc)
        out = torch.full_like(q, float("nan"))
        K.decode_attention(q, kc, vc, lens, out=out)
        rows.append(dict(kernel=f"decode_attention B={B} context<={length}",
                         rel_err=rel(out, K.decode_attention_torch(q.double(), kc.double(), vc.double(), lens))))
    for rows_in in (1, 8, K.SKINNY_MAX_ROWS):  # the skinny projection kernel (bf16 in, fp32 sums)
        x = torch.randn(rows_in, S.hidden, device=dev, dtype=bf)
        w_qkv = torch.randn(width, S.hidden, device=dev, dtype=bf) * S.hidden ** -0.5
        rows.append(dict(kernel=f"linear T={rows_in}", rel_err=rel(K.linear(x, w_qkv), x.double() @ w_qkv.double().T)))
    x = torch.randn(T, S.hidden, device=dev, dtype=bf)
    router = torch.randn(S.n_experts, S.hidden, device=dev, dtype=bf) * S.hidden ** -0.5
    ids, gates = K.router_topk(x, router, S.top_k, True)
    ids64, gates64 = K.router_topk_torch(x.double(), router.double(), S.top_k, True)
    rows.append(dict(kernel="router_topk", rel_err=rel(gates, gates64),
                     ids_agree=float((ids.sort(-1).values == ids64.sort(-1).values).float().mean())))
    r64 = resid.double().clone()
    normed, ids, gates = K.add_rmsnorm_router(resid, delta, w, S.norm_eps, router, S.top_k, True)
    normed64 = K.add_rmsnorm_torch(r64, delta.double(), w.double(), S.norm_eps)
    ids64, gates64 = K.router_topk_torch(normed64, router.double(), S.top_k, True)
    rows.append(dict(kernel="add_rmsnorm_router", rel_err=max(rel(normed, normed64), rel(gates, gates64)),
                     ids_agree=float((ids.sort(-1).values == ids64.sort(-1).values).float().mean())))
    for r in rows:
        r["shape"] = S.name
        print(r, flush=True)
    return rows

def part_agree(hf, model: Model, prompt_len: int = 128, new: int = 32) -> dict:
    """Teacher-forced agreement on one random sequence of ``prompt_len + new`` tokens: engine vs
    transformers (grouped_mm experts) vs transformers (eager experts), at the last prompt position and the
    ``new`` after it. The engine twice: its prefill over the whole sequence, and its decode path (the prompt
    prefilled, then one ``decode_step`` a position fed the sequence's own next token), whose kernels (skinny
    projections, the one QKV launch, decode attention, the fused router, the decode MoE) prefill never runs.
    The decode path runs twice as it is and twice under ``deterministic_algorithms``: whether each pair's
    logits are the same bits (a tuned MoE config that adds with atomics makes them differ)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.shape.vocab_size, (1, prompt_len + new), generator=gen).to(model.device)

    def decode_path() -> torch.Tensor:
        cache = KVCache(model.shape, 1, prompt_len + new, model.dtype, model.device)
        decoded = [prefill(model, cache, [ids[0, :prompt_len]])]
        for p in range(prompt_len, prompt_len + new):
            decoded.append(decode_step(model, cache, ids[0, p:p + 1], torch.tensor([p], device=model.device)))
        return torch.cat(decoded)

    with torch.inference_mode():
        set_experts_implementation(hf, "grouped_mm")
        ref = hf(ids).logits[0, prompt_len - 1:].float()
        set_experts_implementation(hf, "eager")
        eager = hf(ids).logits[0, prompt_len - 1:].float()
        set_experts_implementation(hf, "grouped_mm")
        cache = KVCache(model.shape, 1, prompt_len + new, model.dtype, model.device)
        ours = prefill(model, cache, [ids[0]], all_positions=True)[prompt_len - 1:]
        decoded, again = decode_path(), decode_path()
        with deterministic_algorithms():
            fixed, fixed_again = decode_path(), decode_path()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def top1(a, b):
        return float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return dict(positions=new + 1, engine_vs_grouped_mm_rel_err=rel(ours, ref),
                engine_vs_grouped_mm_top1=top1(ours, ref), engine_decode_vs_grouped_mm_rel_err=rel(decoded, ref),
                engine_decode_vs_grouped_mm_top1=top1(decoded, ref),
                eager_vs_grouped_mm_rel_err=rel(eager, ref), eager_vs_grouped_mm_top1=top1(eager, ref),
                engine_decode_repeats_same_bits=bool(torch.equal(decoded, again)),
                deterministic_decode_repeats_same_bits=bool(torch.equal(fixed, fixed_again)),
                deterministic_decode_vs_grouped_mm_top1=top1(fixed, ref))


# The engine's decode as it runs and beside it with one of its choices changed: without programmatic
# dependent launch (moegps.kernels.pdl), with cuBLAS for the projections, with shorter attention splits at
# short contexts, with the norm + router as two launches (the tiled router) or a token's router split
# otherwise, with the QKV projection and the rotary embedding + cache write as two launches, under torch's
# deterministic mode (MoE configs without atomics: kernels.deterministic_algorithms). What each gives,
# measured in one run (--decode-variants). "kernels": moegps.engine.kernels settings patched while the engine
# captures its graphs.
DECODE_VARIANTS = {"engine": {}, "no PDL": {"pdl": "0"}, "cuBLAS projections": {"kernels": {"SKINNY_MAX_ROWS": 0}},
                   "attention splits >= 64 keys": {"attention": {"min_split": 64}},
                   "norm + router as two launches": {"kernels": {"FUSED_ROUTER_MAX_PROGRAMS": 0}},
                   "QKV and rotary as two launches": {"kernels": {"FUSED_QKV_ROPE_MAX_ROWS": 0}},
                   "deterministic": {"deterministic": True},
                   **{f"router {n} experts a program": {"kernels": {"ROUTER_EXPERTS_PER_PROGRAM": n}}
                      for n in (4, 8, 16, 32, 64)}}


def decode_variant(name: str) -> contextlib.ExitStack:
    """A context that sets a DECODE_VARIANTS entry while an engine captures its graphs (launch options
    are baked in), and restores everything after."""
    variant = DECODE_VARIANTS[name]
    stack = contextlib.ExitStack()
    if "pdl" in variant:
        stack.enter_context(mock.patch.dict(os.environ, {"MOEGPS_PDL": variant["pdl"]}))
    for setting, value in variant.get("kernels", {}).items():
        stack.enter_context(mock.patch.object(K, setting, value))
    stack.enter_context(mock.patch.dict(K.ATTENTION_DEFAULTS, variant.get("attention", {})))
    if variant.get("deterministic"):
        stack.enter_context(deterministic_algorithms())
    return stack


def part_decode(model: Model, batches, contexts, new: int, reps: int, copy_rate: float,
                variants=("engine",)) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(2)
    for context in contexts:
        for batch in batches:
            kv_bytes = bucket_for(batch) * (context + new) * model.shape.kv_bytes_per_token * model.shape.n_layers
            if kv_bytes > 0.8 * torch.cuda.mem_get_info()[0]:
                print(f"skip batch {batch} context {context}: its KV cache ({kv_bytes / 1e9:.0f} GB) does not fit "
                      "beside the weights", flush=True)
                continue
            prompts = torch.randint(3, model.shape.vocab_size, (batch, context), generator=gen).tolist()
            first_tokens = None
            for variant in variants:  # side by side, so that the machine's state is the same for each
                with decode_variant(variant):
                    engine = Engine(model, max_batch=batch, max_len=context + new)
                    times = []
                    out = engine.generate(prompts, new)  # captures the graph
                    with gpu_clocks() as clocks:  # the SM clock the steps ran at (the weights' reads do not)
                        for _ in range(reps):
                            out = engine.generate(prompts, new)
                            times.append(out.decode_ms_per_step)
                rows.append(_decode_row(model, engine, batch, context, new, statistics.median(times), copy_rate))
                rows[-1].update(clocks)
                first_tokens = first_tokens or out.tokens
                # greedy tokens as the first variant's (a launch option changes no value; cuBLAS's sums may)
                rows[-1].update(variant=variant, same_tokens=out.tokens == first_tokens)
                print(rows[-1], flush=True)
                del engine
                torch.cuda.empty_cache()
    return rows


def _decode_row(model: Model, engine: Engine, batch: int, context: int, new: int, ms: float,
                copy_rate: float) -> dict:
    """A decode row: the step time against the floor of the weights and KV bytes the step reads."""
    touched = distinct_experts_per_layer(engine, bucket_for(batch))
    weights = weight_bytes_per_step(model, touched)
    # each row reads its context (mean over the steps: context + new / 2) of K and V in every layer
    kv = batch * (context + new / 2) * model.shape.kv_bytes_per_token * model.shape.n_layers
    floor = (weights + kv) / copy_rate * 1e3
    return dict(shape=model.shape.name, batch=batch, context=context, engine_ms=ms,
                tokens_per_s=batch * 1e3 / ms, floor_ms=floor, pct_of_floor=100 * floor / ms,
                distinct_experts=statistics.mean(touched[model.shape.dense_layers:]),
                weight_gb=weights / 1e9, kv_gb=kv / 1e9)


ATTENTION_SWEEP = [dict(block_n=bn, num_warps=w, num_stages=st, target_programs=tp, min_split=ms)
                   for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4) for tp in (264, 528, 1056)
                   for ms in (128, 256)]


def part_attention(shape: ModelShape, batches, contexts, copy_rate: float, sweep: bool = True) -> list[dict]:
    """The decode-attention kernel of one layer on full cache rows: the default settings and, with
    ``sweep``, the best of ATTENTION_SWEEP (the defaults are chosen from such a sweep)."""
    rows = []
    for context in contexts:
        for batch in batches:
            q = torch.randn(batch, shape.n_heads, shape.head_dim, device="cuda", dtype=torch.bfloat16)
            # several layers' caches in turn so that one call's K/V are not in L2 from the last
            n_copies = max(2, min(16, int(4e8 // (batch * context * shape.kv_bytes_per_token) + 1)))
            caches = [tuple(torch.randn(batch, shape.n_kv_heads, context, shape.head_dim, device="cuda",
                                        dtype=torch.bfloat16) for _ in "kv") for _ in range(n_copies)]
            lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
            floor_us = batch * context * shape.kv_bytes_per_token / copy_rate * 1e6

            def time_us(settings):
                def run():
                    for k, v in caches:
                        decode_attention(q, k, v, lengths, **settings)
                return device_ms(run, reps=10, warmup=2, graph=True) / n_copies * 1e3
            default_us = time_us({})
            row = dict(shape=shape.name, batch=batch, context=context, floor_us=floor_us, default_us=default_us,
                       pct_of_floor=100 * floor_us / default_us)
            if sweep:
                timed = [(time_us(s), s) for s in ATTENTION_SWEEP]
                best_us, best = min(timed, key=lambda x: x[0])
                row.update(best_us=best_us, best_pct_of_floor=100 * floor_us / best_us,
                           best={k: v for k, v in best.items() if ATTENTION_DEFAULTS[k] != v})
            rows.append(row)
            print(rows[-1], flush=True)
            caches = None  # freed before the next size's
    return rows


def active_params(shape: ModelShape) -> int:
    """Weights a token multiplies by (its top-k experts, the non-expert weights, the lm_head once)."""
    inactive_experts = shape.n_moe_layers * (shape.n_experts - shape.top_k) * 3 * shape.hidden * shape.expert_ffn
    return shape.total_params - inactive_experts - shape.vocab_size * shape.hidden


def prefill_work(S: ModelShape, lengths: list[int]) -> tuple[float, float]:
    """(FLOPs, weight bytes) of prefilling prompts of these lengths at once: matmuls of 2 x active parameters
    a token (the lm_head once a prompt) and each prompt's causal attention (QK^T and PV); every weight read
    once, of the experts only as many as the tokens can touch."""
    T = sum(lengths)
    flops = 2 * (active_params(S) - S.vocab_size * S.hidden) * T + 2 * S.vocab_size * S.hidden * len(lengths) \
        + 2 * 2 * S.n_layers * S.n_heads * S.head_dim * sum(n * n for n in lengths) / 2
    experts = min(S.n_experts, T * S.top_k)
    weight_bytes = S.total_params * S.dtype_bytes - S.n_moe_layers * (S.n_experts - experts) * S.expert_weight_bytes
    return flops, weight_bytes


def part_pack(model: Model, counts, copy_rate: float, matmul_rate: float, reps: int = 10) -> list[dict]:
    """Several prompts prefilled at once, as a serving loop admits newcomers: for each count of prompts, lengths
    drawn in MMLU questions' range (40-250 tokens), the eager packed prefill (``prefill``: SDPA on the padded
    batch, every kernel launched from Python) against the packed prefill graph (``PrefillGraphs``: one graph
    per 128-token multiple, block-diagonal attention), the eager prefill the baseline. Floor: the pack's matmuls
    over the matmul rate or its weights over the copy rate, whichever is longer (``prefill_work``)."""
    rows = []
    S = model.shape
    gen = torch.Generator().manual_seed(5)
    for count in counts:
        lengths = torch.randint(40, 251, (count,), generator=gen).tolist()
        prompts = [torch.randint(3, S.vocab_size, (n,), generator=gen).cuda() for n in lengths]
        cache = KVCache(S, count, max(lengths), model.dtype, model.device)
        graphs = PrefillGraphs(model, cache, max_graphs=1)
        runs = {"eager": lambda: prefill(model, cache, prompts), "graph": lambda: graphs(prompts)}  # noqa: B023
        with torch.inference_mode():
            logits = {mode: run() for mode, run in runs.items()}  # the graph's capture here, outside the timing
            ms = {mode: device_ms(run, reps) for mode, run in runs.items()}
        flops, weight_bytes = prefill_work(S, lengths)
        floor = max(flops / matmul_rate, weight_bytes / copy_rate) * 1e3
        eager, graphed = logits["eager"], logits["graph"]
        rows.append(dict(shape=S.name, prompts=count, tokens=sum(lengths), padded=graphs.packed_length(sum(lengths)),
                         eager_ms=ms["eager"], graph_ms=ms["graph"], graph_vs_eager=ms["eager"] / ms["graph"],
                         floor_ms=floor, graph_pct_of_floor=100 * floor / ms["graph"],
                         rel_err=((graphed - eager).norm() / eager.norm()).item(),
                         top1_agree=(graphed.argmax(-1) == eager.argmax(-1)).float().mean().item()))
        print(rows[-1], flush=True)
        cache = graphs = None  # freed before the next pack's
        torch.cuda.empty_cache()
    return rows


def chunk_step_engine(model: Model, batch: int, size: int, context: int, gen: torch.Generator,
                      piece: list[int] | None = None, alias_free_rows: bool = True) -> tuple[Engine, torch.Tensor]:
    """An engine whose ``step(bucket_for(batch), size)`` decodes ``batch`` rows of random tokens at ``context`` and a
    chunk of ``size`` random prompt tokens in the slot past the bucket, after ``context`` earlier positions of it;
    and that chunk. ``piece``: the chunk is these tokens padded with token 0 to ``size`` and is a prompt's first
    (position 0 of its slot), as serving runs a prompt of up to ``size`` tokens."""
    bucket = bucket_for(batch)
    engine = Engine(model, max_batch=bucket + 1, max_len=context + size + 2,  # the chunk's slot: `bucket`
                    alias_free_rows=alias_free_rows)
    prompts = torch.randint(3, model.shape.vocab_size, (batch, context), generator=gen).tolist()
    engine.generate(prompts, 1)  # the batch's K/V, tokens and positions as after its prefill
    if piece is None:
        engine.load_chunk(size, torch.randint(3, model.shape.vocab_size, (size,), generator=gen), bucket, context)
    else:
        engine.load_chunk(size, piece, bucket, 0)
    return engine, engine.chunk_inputs(size)[0].cpu()


def part_chunk(model: Model, batches, chunks, context: int, copy_rate: float, matmul_rate: float,
               reps: int = 20) -> list[dict]:
    """What chunked prefill (``moegps.engine.serve``'s chunked policy) costs on this device, per decode batch
    and chunk size: the graphed decode step of ``batch`` sequences at ``context`` tokens alone; the same step
    with a chunk of a prompt beside it (its rows attending over ``context`` earlier positions of its own
    slot, one slot past the bucket); and the chunk's tokens prefilled alone as a prompt (the engine's prefill
    graph, as the continuous policy runs a lone newcomer). ``saved``: the share of that prefill the chunk's
    ride on the decode step's weight reads saves. Floors: the decode step's bytes over the copy rate, the
    chunk's matmuls (2 x active parameters a token) over the matmul rate."""
    rows = []
    S = model.shape
    gen = torch.Generator().manual_seed(4)
    timed = device_ms if model.device.type == "cuda" else wall_ms
    for batch in batches:
        bucket = bucket_for(batch)
        if bucket == BUCKETS[-1]:
            print(f"chunk: skip batch {batch}: the chunk's slot would be past the largest bucket", flush=True)
            continue
        for size in chunks:
            engine, chunk = chunk_step_engine(model, batch, size, context, gen)
            graphs, cache = engine.prefill_graphs, engine.cache
            with torch.inference_mode():
                runs = {"decode": engine.step(bucket), "with_chunk": engine.step(bucket, size),
                        "chunk_alone": (lambda: graphs([chunk], slots=[bucket])) if graphs is not None else
                        (lambda: prefill(model, cache, [chunk], slots=[bucket]))}
                ms = {name: timed(run, reps) for name, run in runs.items()}  # each warmed up (and captured) first
            touched = distinct_experts_per_layer(engine, bucket)
            kv = batch * context * S.kv_bytes_per_token * S.n_layers
            decode_floor = (weight_bytes_per_step(model, touched) + kv) / copy_rate * 1e3
            extra = ms["with_chunk"] - ms["decode"]
            rows.append(dict(shape=S.name, batch=batch, context=context, chunk=size,
                             **{f"{k}_ms": v for k, v in ms.items()}, chunk_extra_ms=extra,
                             saved=1 - extra / ms["chunk_alone"], decode_floor_ms=decode_floor,
                             chunk_matmul_floor_ms=2 * active_params(S) * size / matmul_rate * 1e3))
            print(rows[-1], flush=True)
            del engine
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _beside_matmuls(fn, reps: int, rest_s: float = 0.0) -> tuple[list[float], float]:
    """(ms of each ``fn()``, median bf16 matmul rate in FLOP/s) from ``reps`` rounds of one ``fn()`` then a
    burst of 8192^3 matmuls as long as it. The ceilings' 20 matmuls (28 ms) run cooler than a long
    compute-bound prefill: on the H200 the 8192^3 rate read 741-803 TFLOP/s at the start of runs and
    684-700 inside the kernels benchmark's long rows (its rounds share the clocks), so a prompt's matmul
    floor is also given at the rate measured beside it, under the same power and heat. With ``rest_s``,
    the GPU idles that long before each ``fn()`` and each burst: a prompt arriving at an idle GPU (the
    usual reading of time to first token), against matmuls started from the same rest."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b, c = torch.randn_like(a), torch.empty_like(a)
    one = device_ms(lambda: torch.mm(a, b, out=c), reps=5)
    fn_ms = device_ms(fn, reps=1, warmup=1)
    burst = max(1, round(fn_ms / one))

    def matmuls():
        for _ in range(burst):
            torch.mm(a, b, out=c)

    times, rates = [], []
    for _ in range(reps):
        time.sleep(rest_s)
        times.append(device_ms(fn, reps=1, warmup=0))
        time.sleep(rest_s)
        rates.append(2 * 8192 ** 3 * burst / (device_ms(matmuls, reps=1, warmup=0) * 1e-3))
    return times, statistics.median(rates)


def part_ttft(model: Model, prompt_lengths, matmul_rate: float, copy_rate: float, reps: int = 5,
              rest_s: float = 1.0) -> list[dict]:
    rows = []
    S = model.shape
    gen = torch.Generator().manual_seed(3)
    for n in prompt_lengths:
        cache = KVCache(S, 1, n, model.dtype, model.device)
        prompt = torch.randint(3, S.vocab_size, (n,), generator=gen).cuda()
        flops, weight_bytes = prefill_work(S, [n])

        def floor_ms(rate):  # the prompt's floor at a matmul rate in FLOP/s
            return max(flops / rate, weight_bytes / copy_rate) * 1e3

        floor = floor_ms(matmul_rate)
        graphs = PrefillGraphs(model, cache, max_graphs=1)
        for mode, run in (("eager", lambda: prefill(model, cache, [prompt])), ("graph", lambda: graphs([prompt]))):
            with torch.inference_mode():
                run()  # a graph's capture happens here, outside the timing
                with gpu_clocks() as clocks:  # the SM clock of the prompts and their matmul bursts
                    times, rate_beside = _beside_matmuls(run, reps)
                ms = statistics.median(times)
                rested, rate_rested = _beside_matmuls(run, reps, rest_s) if rest_s > 0 else ([math.nan], math.nan)
                rested_ms = statistics.median(rested)
                kernels = kernel_trace(run)
                torch.cuda.synchronize()
                start = time.perf_counter()  # the host's time to issue the whole prefill (no sync inside)
                run()
                host_ms = (time.perf_counter() - start) * 1e3
                torch.cuda.synchronize()
            floor_beside = floor_ms(rate_beside)
            parts = kernel_parts(kernels)
            idle_ms, gaps = trace_gaps(kernels)
            print(f"prefill of {n} tokens, {mode}: costliest kernels\n{markdown_table(kernel_table(kernels))}\n"
                  f"GPU idle between kernels {idle_ms:.2f} ms; the longest gaps:\n{markdown_table(gaps)}", flush=True)
            rows.append(dict(shape=S.name, prompt=n, prefill=mode, ttft_ms=ms, ttft_min_ms=min(times),
                             ttft_max_ms=max(times), floor_ms=floor, pct_of_floor=100 * floor / ms,
                             matmul_beside_tflops=rate_beside / 1e12, floor_beside_ms=floor_beside,
                             pct_of_floor_beside=100 * floor_beside / ms,
                             ttft_rested_ms=rested_ms, ttft_rested_min_ms=min(rested), ttft_rested_max_ms=max(rested),
                             pct_of_floor_rested=100 * floor / rested_ms,
                             matmul_rested_tflops=rate_rested / 1e12,
                             pct_of_floor_rested_burst=100 * floor_ms(rate_rested) / rested_ms,
                             bound="compute" if flops / matmul_rate > weight_bytes / copy_rate else "memory",
                             host_issue_ms=host_ms, idle_ms=idle_ms, **clocks,
                             **{f"{k}_ms": v for k, v in parts.items()}))
            print(rows[-1], flush=True)
        cache = graphs = None  # freed before the next prompt's
        torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _keep_grouped_mm(hf):
    """transformers' generate() switches grouped_mm experts to batched_mm for decode; set that aside."""
    original = getattr(hf, "_optimize_model_for_decode", None)
    if original is not None:
        hf._optimize_model_for_decode = contextlib.nullcontext
    try:
        yield
    finally:
        if original is not None:
            del hf._optimize_model_for_decode


def part_peers(hf, batches, context: int, new: int, compile_: bool) -> list[dict]:
    set_experts_implementation(hf, "grouped_mm")
    rows = []
    gen = torch.Generator().manual_seed(2)
    for batch in batches:
        ids = torch.randint(3, hf.config.vocab_size, (batch, context), generator=gen).cuda()
        mask = torch.ones_like(ids)

        def wall(fn):
            return wall_ms(fn, reps=2, warmup=1)

        def gen_fn(n, **kw):
            return lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=0, **kw)
        with torch.inference_mode():
            one, full = wall(gen_fn(1)), wall(gen_fn(new))
            rows.append(dict(peer="transformers generate()", batch=batch, context=context,
                             ms_per_step=(full - one) / (new - 1)))
            print(rows[-1], flush=True)
            static_decode(hf, ids, 4, graph=True)
            _, ms = static_decode(hf, ids, new, graph=True)
            rows.append(dict(peer="transformers, moegps graphed loop", batch=batch, context=context, ms_per_step=ms))
            print(rows[-1], flush=True)
            if compile_:
                with _keep_grouped_mm(hf):
                    kw = dict(cache_implementation="static")
                    one, full = wall(gen_fn(1, **kw)), wall(gen_fn(new, **kw))
                rows.append(dict(peer="transformers static cache + compile (grouped_mm)", batch=batch,
                                 context=context, ms_per_step=(full - one) / (new - 1)))
                print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


# ---- where a step's time goes --------------------------------------------------------------------

def _kernel_ms_by_label(fn, labels) -> dict:
    """Device time (ms) of the kernels launched inside each ``record_function`` label during one
    eager ``fn()``: each kernel is charged to the nearest labelled range above its launch; kernels
    under no label go to "other kernels". Kernel durations, not the ranges' spans, so the eager
    launch gaps are not counted (the caller charges the step's remaining time to "gaps").
    Kernels launched by torch ops only: Triton's launches carry no op (see ``kernel_trace``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {label: 0.0 for label in labels}
    totals["other kernels"] = 0.0
    for event in prof.events():
        kernel_us = sum(k.duration for k in getattr(event, "kernels", []))
        if not kernel_us or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        owner = event
        while owner is not None and owner.name not in labels:
            owner = owner.cpu_parent
        totals[owner.name if owner is not None else "other kernels"] += kernel_us / 1e3
    return totals


def kernel_trace(fn) -> list[tuple[float, float, str]]:
    """``(start_us, duration_us, name)`` of every GPU kernel run by one ``fn()`` (a graph replay or
    eager code), in start order, from the profiler's trace (kernels in a graph are traced one by one)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    return sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("cat") == "kernel")


def trace_gaps(kernels: list[tuple[float, float, str]], top: int = 8) -> tuple[float, list[dict]]:
    """The GPU's idle time between the kernels of a ``kernel_trace`` in ms, and the ``top`` longest gaps
    (microseconds, the kernel's index in the trace, the kernels on either side)."""
    gaps, end, before = [], None, ""
    for index, (start, dur, name) in enumerate(kernels):
        if end is not None and start > end:
            gaps.append(dict(gap_us=start - end, index=index, before=before[:40], after=name[:40]))
        if end is None or start + dur > end:
            end, before = start + dur, name
    idle_ms = sum(g["gap_us"] for g in gaps) / 1e3
    return idle_ms, sorted(gaps, key=lambda g: -g["gap_us"])[:top]


# Kernel names of the engine's parts (its Triton kernels, the moegps MoE kernels, torch's flash
# attention); the GEMMs (cuBLAS, named by tile, not by purpose) are placed by their neighbours.
GEMM_NAMES = ("gemm", "gemv", "splitk", "nvjet", "cutlass", "xmma", "sm90", "cublas", "matmul",
              "skinny_linear")
KERNEL_PARTS = (("attention", ("attention", "rope_cache", "flash", "fmha")),
                ("moe", ("router", "gate_up_", "down_scan", "down_sorted", "fused_scan", "combine_kernel",
                         "_align_kernel", "_chunk_")),
                ("norms", ("rmsnorm",)))


def kernel_parts(kernels: list[tuple[float, float, str]]) -> dict:
    """Milliseconds per part from ``kernel_trace`` rows. A GEMM belongs to the attention when the
    next named kernel is the attention's (QKV projection before rotary) or the previous one is (output
    projection), to the MoE after an MoE kernel (a shared expert); the step's last GEMM is the lm_head."""
    def part(name):
        low = name.lower()
        return next((p for p, keys in KERNEL_PARTS if any(k in low for k in keys)), None)

    named = [part(name) for _, _, name in kernels]
    gemms = [i for i, (_, _, name) in enumerate(kernels) if named[i] is None and
             any(k in name.lower() for k in GEMM_NAMES)]
    totals = {p: 0.0 for p, _ in KERNEL_PARTS} | {"lm_head": 0.0, "other kernels": 0.0}
    for i, (_, dur, _) in enumerate(kernels):
        p = named[i]
        if p is None and i in gemms:
            before = next((named[j] for j in range(i - 1, -1, -1) if named[j]), None)
            after = next((named[j] for j in range(i + 1, len(kernels)) if named[j]), None)
            p = ("lm_head" if i == gemms[-1] and after is None else "attention" if "attention" in (before, after)
                 else before if before == "moe" else None)
        totals[p or "other kernels"] += dur / 1e3
    return totals


LABELS = ("attention", "norms", "moe", "lm_head")


def kernel_table(kernels: list[tuple[float, float, str]], top: int = 12) -> list[dict]:
    """The ``top`` kernels by total time: name, launches, total and mean microseconds."""
    by_name: dict = {}
    for _, dur, name in kernels:
        count, total = by_name.get(name, (0, 0.0))
        by_name[name] = (count + 1, total + dur)
    rows = [dict(kernel=name[:60], launches=c, total_us=t, mean_us=t / c) for name, (c, t) in by_name.items()]
    return sorted(rows, key=lambda r: -r["total_us"])[:top]


def engine_breakdown(engine: Engine, bucket: int, step_ms: float) -> tuple[dict, list[dict]]:
    """The graphed decode step's kernels by part (the rest of ``step_ms`` is gaps between kernels),
    and its costliest kernels."""
    with torch.inference_mode():
        kernels = kernel_trace(engine.step(bucket))
    parts = kernel_parts(kernels)
    parts["gaps"] = max(0.0, step_ms - sum(parts.values()))
    return parts, kernel_table(kernels)


def hf_breakdown(hf, ids, step_ms: float) -> dict:
    """transformers' decode step (static cache, eager) with its modules labelled by forward hooks."""
    from torch.autograd.profiler import record_function
    from transformers import StaticCache

    handles, open_ranges = [], []

    def label(module, name):
        def pre(*_):
            open_ranges.append(record_function(name))
            open_ranges[-1].__enter__()

        def post(*_):
            open_ranges.pop().__exit__(None, None, None)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for layer in hf.model.layers:
        label(layer.self_attn, "attention")
        label(layer.input_layernorm, "norms")
        label(layer.post_attention_layernorm, "norms")
        label(layer.mlp, "moe")
    label(hf.model.norm, "norms")
    label(hf.lm_head, "lm_head")
    B, P = ids.shape
    cache = StaticCache(config=hf.config, max_cache_len=P + 8)
    with torch.inference_mode():
        name = cache_argument(hf)
        hf(input_ids=ids, cache_position=torch.arange(P, device=ids.device), **{name: cache})
        token = ids[:, -1:]
        position = torch.tensor([P], device=ids.device)
        parts = _kernel_ms_by_label(lambda: hf(input_ids=token, cache_position=position, **{name: cache}), LABELS)
    for h in handles:
        h.remove()
    parts["gaps"] = max(0.0, step_ms - sum(parts.values()))
    return parts


def plot_breakdown(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(LABELS) + ["other kernels", "gaps"]
    colors = ["#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#C44E52"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [f"{r['who']}\nbatch {r['batch']}" for r in rows]
    bottom = [0.0] * len(rows)
    for key, color in zip(keys, colors):
        values = [r["parts"].get(key, 0.0) for r in rows]
        ax.bar(names, values, bottom=bottom, color=color, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['step_ms']:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(bottom) * 1.1)  # room for the totals under the title
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"Where a decode step's time goes ({rows[0]['shape']}, context 128, {rows[0]['device']})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft(rows: list[dict], path: Path) -> None:
    """Time to first token of the graphed prefill (what the engine runs for one prompt) as a share
    of its floor (matmul time at the start-of-run rate, or weight reads where they take longer):
    from an idle GPU and back to back with full-power matmuls, beside the back-to-back share at the
    rate the GPU then sustains; one panel a shape, each bar labelled with its TTFT, the issue's 75%
    bar (set at 2048 tokens) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["prefill"] == "graph"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    bars = [("from an idle GPU", "pct_of_floor_rested", "ttft_rested_ms", "#4C72B0"),
            ("back to back", "pct_of_floor", "ttft_ms", "#DD8452"),
            ("back to back, floor at the rate then sustained", "pct_of_floor_beside", "ttft_ms", "#C9A27E")]
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(7.0, 5.5 * len(shapes)), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["prompt"])
        width = 0.8 / len(bars)
        for j, (label, pct, ms, color) in enumerate(bars):
            xs = [i + (j - 1) * width for i in range(len(mine))]
            heights = [r.get(pct, float("nan")) for r in mine]
            ax.bar(xs, heights, width, color=color, label=label)
            for x, r, h in zip(xs, mine, heights):
                if h == h:  # not NaN
                    ax.text(x, h, f"{r[ms]:.0f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(75, color="#C44E52", linestyle="--", linewidth=1, label="the issue's bar at 2048 tokens (75%)")
        ax.set_xticks(range(len(mine)), [f"{r['prompt']} tokens" for r in mine])
        middle, half = (len(mine) - 1) / 2, max(len(mine), 2) / 2  # one prompt: bars of the usual width
        ax.set_xlim(middle - half, middle + half)
        ax.set_ylim(0, 125)
        ax.set_ylabel("% of the floor (bar labels: TTFT in ms)")
        ax.set_title(f"{shape}, batch 1, graphed prefill")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = 4 if len(shapes) > 1 else 2
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    fig.suptitle(f"Time to first token against its floor ({rows[0].get('device', 'GPU')})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if columns == 4 else 0.12, 1, 1))  # the legend under the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command ---------------------------------------------------------------------------------

def _attempt(results: dict, key: str, fn):
    """Run one part; a failure is printed and recorded, and the other parts still run."""
    import traceback

    try:
        value = fn()
    except Exception as e:  # a benchmark reports what broke and goes on
        traceback.print_exc()
        results.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {e}")
        return
    if isinstance(value, list):
        results.setdefault(key, []).extend(value)
    else:
        results.setdefault(key, []).append(value)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "deepseek-v2-lite"])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 4096])
    ap.add_argument("--prompts", nargs="+", type=int, default=[128, 2048, 8192])
    ap.add_argument("--peer-batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--packs", nargs="+", type=int, default=[2, 4, 8], help="pack: prompts prefilled at once")
    ap.add_argument("--chunks", nargs="+", type=int, default=[64, 256, 1024], help="chunk: prompt tokens a step")
    ap.add_argument("--chunk-context", type=int, default=512, help="chunk: the decode rows' and the chunk's context")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-variants", nargs="+", default=["engine"], choices=list(DECODE_VARIANTS),
                    help="decode as the engine runs it, and/or with one of its choices changed")
    ap.add_argument("--rest-s", type=float, default=1.0,
                    help="ttft: also time each prompt after the GPU idled this long (0: only back to back)")
    ap.add_argument("--attention-sweep", action="store_true", help="time every ATTENTION_SWEEP setting too")
    ap.add_argument("--compile", action="store_true", help="also time transformers with static cache + compile")
    ap.add_argument("--shared-expert", choices=["folded", "beside"], default="folded",
                    help="a shared expert held as extra experts in the routed kernels (where its width is whole "
                    "experts'), or run beside them as its own GEMMs")
    ap.add_argument("--layers", type=int, help="build each shape's first N layers only (a shape too big for the GPU "
                    "at hand; every floor is the built model's)")
    ap.add_argument("--out", default="benchmarks/results/engine")
    ap.add_argument("--replot", metavar="ENGINE_BENCH_JSON",
                    help="no GPU run: draw the figures of a saved run's engine_bench.json into --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        draw_plots(json.loads(Path(args.replot).read_text()), out)
        return
    results: dict = {"ceilings": ceilings()}
    c = results["ceilings"]
    print(f"{c['device']}, torch {c['torch']}: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    for name in args.shapes:
        shape = from_name(name)
        if args.layers:
            shape = shape.replace(n_layers=min(args.layers, shape.n_layers))
        # Mixtral-architecture shapes are built as transformers models (peers and agreement share the
        # weights); others (shared experts, dense layers) as the engine's own shape-only model.
        hf = random_hf_mixtral(shape) if not (shape.shared_ffn or shape.dense_layers) else None
        model = (from_transformers(hf) if hf is not None
                 else random_model(shape, fold_shared=args.shared_expert == "folded"))
        model.source = f"random {name}"
        model.shape = model.shape.replace(name=name)
        if "checks" in args.parts:
            _attempt(results, "checks", lambda: part_checks(shape))
        if "agree" in args.parts and hf is not None:
            _attempt(results, "agree", lambda: dict(shape=name, **part_agree(hf, model, new=args.new_tokens)))
            print(results.get("agree", [None])[-1], flush=True)
        if "attention" in args.parts:
            _attempt(results, "attention", lambda: part_attention(shape, args.batches, args.contexts,
                                                                 c["copy_bytes_per_s"], sweep=args.attention_sweep))
        if "decode" in args.parts:
            _attempt(results, "decode", lambda: part_decode(model, args.batches, args.contexts, args.new_tokens,
                                                           args.reps, c["copy_bytes_per_s"],
                                                           args.decode_variants))
        if "ttft" in args.parts:
            _attempt(results, "ttft", lambda: part_ttft(model, args.prompts, c["matmul_flops_per_s"],
                                                       c["copy_bytes_per_s"], rest_s=args.rest_s))
        if "pack" in args.parts:
            _attempt(results, "pack", lambda: part_pack(model, args.packs, c["copy_bytes_per_s"],
                                                       c["matmul_flops_per_s"]))
        if "chunk" in args.parts:
            _attempt(results, "chunk", lambda: part_chunk(model, args.batches, args.chunks, args.chunk_context,
                                                         c["copy_bytes_per_s"], c["matmul_flops_per_s"]))
        if "breakdown" in args.parts:
            _attempt(results, "breakdown", lambda: _breakdowns(model, hf, shape, args.peer_batches, c["device"]))
        if "peers" in args.parts and hf is not None:
            _attempt(results, "peers", lambda: part_peers(hf, args.peer_batches, 128, args.new_tokens, args.compile))
        hf = model = None  # freed before the next shape's
        torch.cuda.empty_cache()
    draw_plots(results, out)
    breakdown_rows = results.get("breakdown", [])
    (out / "engine_bench.json").write_text(json.dumps(results, indent=1, default=str))
    report = [f"device: {c['device']}; torch {c['torch']}; copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s; "
              f"matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; host: {c['host']}"]
    for key in ("checks", "agree", "attention", "decode", "ttft", "pack", "chunk", "peers"):
        if results.get(key):
            report += ["", f"## {key}", markdown_table(results[key])]
    if breakdown_rows:
        flat = [dict(who=r["who"].replace("\n", " "), shape=r["shape"], batch=r["batch"], step_ms=r["step_ms"],
                     **r["parts"]) for r in breakdown_rows]
        report += ["", "## breakdown (ms per decode step)", markdown_table(flat)]
    report += [f"error: {e}" for e in results.get("errors", [])]
    text = "\n".join(report)
    (out / "report.md").write_text(text)
    print(text)


def draw_plots(results: dict, out: Path) -> None:
    """The figures of a run's results (engine_bench.json's content) into ``out``: ttft.png and one
    breakdown-<shape>.png a shape, where the run has those parts."""
    ttft_rows = [dict(r, device=results["ceilings"]["device"]) for r in results.get("ttft", [])]
    if any(r["prefill"] == "graph" for r in ttft_rows):
        plot_ttft(ttft_rows, out / "ttft.png")
    breakdown_rows = results.get("breakdown", [])
    for shape_name in {r["shape"] for r in breakdown_rows}:
        plot_breakdown([r for r in breakdown_rows if r["shape"] == shape_name], out / f"breakdown-{shape_name}.png")


def _breakdowns(model, hf, shape, batches, device) -> list[dict]:
    rows = []
    for batch in batches:
        engine = Engine(model, max_batch=batch, max_len=128 + 8)
        ids = torch.randint(3, shape.vocab_size, (batch, 128)).cuda()
        engine.generate(ids.tolist(), 4)
        step = engine.generate(ids.tolist(), 8).decode_ms_per_step
        parts, top = engine_breakdown(engine, bucket_for(batch), step)
        rows.append(dict(who="engine", shape=shape.name, batch=batch, step_ms=step, device=device, parts=parts,
                         kernels=top))
        print(rows[-1], flush=True)
        print(f"engine batch {batch}: costliest kernels of a step\n{markdown_table(top)}", flush=True)
        del engine
        if hf is not None:
            set_experts_implementation(hf, "grouped_mm")
            static_decode(hf, ids, 4, graph=True)
            _, hf_ms = static_decode(hf, ids, 8, graph=True)
            rows.append(dict(who="transformers\n(graphed)", shape=shape.name, batch=batch, step_ms=hf_ms,
                             device=device, parts=hf_breakdown(hf, ids, hf_ms)))
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
