"""Serving on the engine: requests that arrive over time, batched at every decode step.

Request-level ("static") batching admits the requests that are waiting, runs them until the longest
answer ends, then admits the next: a slot whose answer ended idles while the others run, and a request
that arrives meanwhile waits for the whole batch. Iteration-level scheduling (Orca, Yu et al., OSDI 2022;
vLLM's and SGLang's schedulers) looks at the queue before every decode step: waiting requests are
prefilled into the cache slots that ended answers freed, beside the sequences still running, and
decode on with them from the next step.

    python -m moegps.engine.serve                                   # bundled model, MMLU prompts, both policies
    python -m moegps.engine.serve --requests 64 --rate 2 4 8 --max-batch 8 --max-new-tokens 64 --out serve.csv
    python -m moegps.engine.serve --model mixtral-8x7b --requests 256 --rate 20 --max-batch 32    # GPU

Both policies run through the same loop (``serve``), so a comparison differs only in when requests
are admitted. The decode step is the engine's: one CUDA graph per batch-size bucket over cache slots
0..bucket-1. A newcomer takes the lowest free slot, so the bucket follows the number of running
requests; free slots inside the bucket decode a dummy token at position 0 of their own slot, which the
next newcomer there overwrites. Each step reads its tokens back to the host to see which answers ended
(one synchronisation a step, as in vLLM: a step without it cannot admit into a slot freed by it).
A lone newcomer is prefilled through the engine's prefill graphs (``PrefillGraphs`` with its slot);
several in one packed eager prefill, at most ``max_prefill_tokens`` prompt tokens at a time.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.tokenizer import mixtral_tokenizer
from ..paths import shared_data
from ..prompts import load_mmlu
from .generate import Engine, Sampling, bucket_for, build_model, choose_tokens
from .model import prefill


@dataclass(frozen=True)
class Request:
    prompt: list[int]          # token ids
    max_new_tokens: int = 32   # counts the first token (the prefill's)
    arrival_s: float = 0.0     # seconds after serving starts


@dataclass
class Served:
    tokens: list[int]          # new tokens, up to and including the first stop token
    arrival_s: float           # seconds after serving started, as the others
    first_token_s: float       # when its first token was on the host
    finish_s: float            # when its last token was on the host


def check_requests(engine: Engine, requests: list[Request]) -> None:
    """A clear error naming the first request that cannot be served by ``engine``."""
    for i, r in enumerate(requests):
        if not r.prompt:
            raise ValueError(f"request {i}: empty prompt (needs at least one token)")
        if r.max_new_tokens < 1:
            raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        if len(r.prompt) + r.max_new_tokens > engine.max_len:
            raise ValueError(f"request {i}: {len(r.prompt)} prompt + {r.max_new_tokens} new tokens exceed the "
                             f"engine's max_len {engine.max_len}")
        if r.arrival_s < 0:
            raise ValueError(f"request {i}: arrival_s must be >= 0, got {r.arrival_s}")


def serve(engine: Engine, requests: list[Request], sampling: Sampling | None = None, stop_tokens=(),
          continuous: bool = True, max_prefill_tokens: int = 8192, clock=time.perf_counter,
          sleep=time.sleep) -> list[Served]:
    """Serve ``requests`` (in the order of their arrival, ties by index) on ``engine``'s cache slots; returns
    each request's answer and times (host clock, seconds since the call began), in the requests' order.
    ``continuous``: admit waiting requests before every decode step (iteration-level); otherwise only when
    every slot is free (request-level). ``clock``/``sleep`` are injectable so tests can run on a fake
    clock. Greedy answers equal ``engine.generate`` of each request alone (up to rounding in the batch's
    GEMMs); sampled ones draw from one generator shared by the batch."""
    if engine.lockstep:
        raise ValueError("serve needs a one-process engine: expert-parallel ranks step in lockstep and would "
                         "admit different requests")
    check_requests(engine, requests)
    sampling = sampling or Sampling()
    model, device, slots = engine.model, engine.model.device, engine.cache.slots
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stops = set(int(t) for t in stop_tokens)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    waiting = list(reversed(order))   # a stack: the next to arrive last
    free = list(range(slots))         # a heap: the lowest free slot first
    running: dict[int, int] = {}      # slot -> request index
    answers: dict[int, list[int]] = {}
    first_s: dict[int, float] = {}
    served: dict[int, Served] = {}
    live = torch.zeros(slots, dtype=torch.long, device=device)  # 1 where a slot holds a running request
    engine.tokens.zero_()
    engine.positions.zero_()
    start = clock()

    def now() -> float:
        return clock() - start

    def take(slot: int, token: int, at: float) -> None:
        """Append a token to the answer in ``slot``; end the answer (and free the slot) if it is done."""
        i = running[slot]
        answers[i].append(token)
        if token in stops or len(answers[i]) == requests[i].max_new_tokens:
            served[i] = Served(answers.pop(i), requests[i].arrival_s, first_s.pop(i), at)
            del running[slot]
            heapq.heappush(free, slot)
            live[slot] = 0
            engine.tokens[slot] = 0
            engine.positions[slot] = 0

    def admit() -> None:
        newcomers: list[int] = []
        budget = max_prefill_tokens
        while waiting and len(newcomers) < len(free) and requests[waiting[-1]].arrival_s <= now():
            n = len(requests[waiting[-1]].prompt)
            if newcomers and n > budget:
                break
            newcomers.append(waiting.pop())
            budget -= n
        if not newcomers:
            return
        into = [heapq.heappop(free) for _ in newcomers]
        prompts = [torch.as_tensor(requests[i].prompt, dtype=torch.long) for i in newcomers]
        graphs = engine.prefill_graphs
        if graphs is not None and len(prompts) == 1 and graphs.pays([len(prompts[0])]):
            logits = graphs(prompts, slots=into)
        else:
            logits = prefill(model, engine.cache, prompts, slots=into)
        first = choose_tokens(logits, sampling, generator)
        index = torch.tensor(into, device=device)
        engine.tokens[index] = first
        engine.positions[index] = torch.tensor([len(p) for p in prompts], device=device)
        live[index] = 1
        tokens = first.tolist()  # waits for the prefill
        at = now()
        for slot, i, token in zip(into, newcomers, tokens):
            running[slot], answers[i], first_s[i] = i, [], at
            take(slot, token, at)

    with torch.inference_mode():
        while waiting or running:
            if continuous or not running:
                admit()
            if not running:  # nothing to decode: wait for the next arrival
                if waiting:
                    sleep(max(0.0, requests[waiting[-1]].arrival_s - now()))
                continue
            bucket = bucket_for(max(running) + 1)
            nxt = choose_tokens(engine.step(bucket)(), sampling, generator)
            engine.tokens[:bucket] = nxt
            engine.positions[:bucket] += live[:bucket]
            host = nxt.tolist()
            at = now()
            for slot in list(running):
                take(slot, host[slot], at)
    return [served[i] for i in range(len(requests))]


def summarize(served: list[Served]) -> dict[str, float]:
    """Throughput and latency figures of one serving run: ``tokens_per_s`` (new tokens over the span from the
    first arrival to the last answer), time to first token and end-to-end latency (median and 90th
    percentile, ms), time per output token after the first (median over answers of 2+ tokens, ms)."""
    ttft = np.array([s.first_token_s - s.arrival_s for s in served]) * 1e3
    latency = np.array([s.finish_s - s.arrival_s for s in served]) * 1e3
    tpot = [(s.finish_s - s.first_token_s) * 1e3 / (len(s.tokens) - 1) for s in served if len(s.tokens) > 1]
    span = max(s.finish_s for s in served) - min(s.arrival_s for s in served)
    tokens = sum(len(s.tokens) for s in served)
    return {"requests": len(served), "new_tokens": tokens, "span_s": span, "tokens_per_s": tokens / span,
            "ttft_p50_ms": float(np.median(ttft)), "ttft_p90_ms": float(np.percentile(ttft, 90)),
            "tpot_p50_ms": float(np.median(tpot)) if tpot else float("nan"),
            "latency_p50_ms": float(np.median(latency)), "latency_p90_ms": float(np.percentile(latency, 90))}


def mmlu_requests(n: int, rate: float, max_new_tokens: int, seed: int = 0, tokenizer=None,
                  mmlu=None) -> list[Request]:
    """``n`` MMLU questions drawn at random (without replacement, all subjects) from ``mmlu`` (a folder of
    per-subject files; default ``../shared/data/mmlu/test``), tokenised; arrivals a Poisson process of
    ``rate`` requests a second (0: all at once; other rates of one seed scale the same gaps); answer lengths
    uniform in [1, max_new_tokens] (a random model's stop token rarely comes, so the lengths are drawn)."""
    tokenizer = tokenizer or mixtral_tokenizer()
    prompts = load_mmlu(mmlu or shared_data("mmlu", "test"))
    if n > len(prompts):
        raise ValueError(f"{n} requests asked for, {len(prompts)} MMLU questions available")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(prompts), size=n, replace=False)
    gaps = rng.standard_exponential(size=n) / rate if rate > 0 else np.zeros(n)  # drawn at any rate: the same
    arrivals = np.cumsum(gaps) - gaps[0]                                          # seed, the same prompts
    lengths = rng.integers(1, max_new_tokens + 1, size=n)
    return [Request(tokenizer.encode(prompts[p].text), int(m), float(a)) for p, m, a in zip(picked, lengths, arrivals)]


def warm_up(engine: Engine, requests: list[Request]) -> None:
    """Compile the kernels and capture what serving these requests replays (GPU): the decode graph of every
    bucket up to the engine's slots, and each prompt length class's prefill graph in slot 0 and in another
    slot, so that no capture falls inside a timed run."""
    if engine.prefill_graphs is None:
        return
    engine.prefill_graphs.max_graphs = max(engine.prefill_graphs.max_graphs, 2 * len(requests))
    for r in requests:
        for slot in range(min(2, engine.cache.slots)):
            engine.prefill_graphs([torch.as_tensor(r.prompt)], slots=[slot])
    for bucket in (b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= engine.cache.slots):
        engine.step(bucket)()
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mixtral-tiny", help="bundled model, checkpoint folder, or shape name")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, nargs="+", default=[0.0],
                    help="Poisson arrivals, requests a second (0: all at once); several: one run each")
    ap.add_argument("--max-batch", type=int, default=8, help="cache slots: requests decoded together at most")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer lengths are drawn in [1, this]")
    ap.add_argument("--policy", choices=("continuous", "static", "both"), default="both")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mmlu", default=None, help="folder of MMLU files (default ../shared/data/mmlu/test)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--out", default=None, help="CSV of every request's times, a row per rate, policy and request")
    args = ap.parse_args(argv)
    for name in ("requests", "max_batch", "max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.rate) < 0:
        ap.error(f"--rate must be >= 0, got {min(args.rate)}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    try:
        sampling = Sampling(args.temperature, seed=args.seed)
        workloads = {rate: mmlu_requests(args.requests, rate, args.max_new_tokens, args.seed, mmlu=args.mmlu)
                     for rate in args.rate}
        model = build_model(args.model, args.device, args.dtype)
    except (ValueError, FileNotFoundError, KeyError) as e:
        ap.error(str(e))
    requests = workloads[args.rate[0]]
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, cuda_graph=not args.no_cuda_graph)
    warm_up(engine, requests)
    policies = ("continuous", "static") if args.policy == "both" else (args.policy,)
    print(f"{model.source} on {model.device}: {args.requests} MMLU requests, prompts of "
          f"{min(len(r.prompt) for r in requests)}-{max(len(r.prompt) for r in requests)} tokens, answers of "
          f"1-{args.max_new_tokens} tokens, {engine.cache.slots} slots; host clock, ms")
    print(f"{'rate/s':>7} {'policy':<11} {'tokens/s':>9} {'span s':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
          f"{'TPOT p50':>9} {'latency p50':>12} {'latency p90':>12}")
    rows = []
    for rate, requests in workloads.items():  # a row a run: its progress
        results = {}
        for policy in policies:
            served = serve(engine, requests, sampling, continuous=policy == "continuous")
            s = results[policy] = summarize(served)
            print(f"{rate:>7g} {policy:<11} {s['tokens_per_s']:>9.1f} {s['span_s']:>8.2f} "
                  f"{s['ttft_p50_ms']:>9.1f} {s['ttft_p90_ms']:>9.1f} {s['tpot_p50_ms']:>9.2f} "
                  f"{s['latency_p50_ms']:>12.1f} {s['latency_p90_ms']:>12.1f}", flush=True)
            rows += [{"rate": rate, "policy": policy, "request": i, "prompt_tokens": len(r.prompt),
                      "new_tokens": len(a.tokens), **{k: v for k, v in asdict(a).items() if k != "tokens"}}
                     for i, (r, a) in enumerate(zip(requests, served))]
        if len(results) == 2:
            c, s = results["continuous"], results["static"]
            print(f"{'':>7} continuous / static: {c['tokens_per_s'] / s['tokens_per_s']:.2f}x tokens/s, "
                  f"{s['latency_p50_ms'] / c['latency_p50_ms']:.2f}x shorter median latency", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
