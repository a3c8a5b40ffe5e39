"""Serving on the engine: requests that arrive over time, on the engine's cache slots, three ways.

- ``static`` (request-level batching): the waiting requests are admitted when every slot is free and run
  until the longest answer ends; a slot whose answer ended idles, a request arriving meanwhile waits.
- ``continuous`` (iteration-level: Orca, Yu et al., OSDI 2022; vLLM's and SGLang's schedulers): before
  every decode step the waiting requests are prefilled into the slots that ended answers freed, and
  decode on beside the others from the next step. The running answers wait during that prefill.
- ``chunked`` (Sarathi-Serve's chunked prefill, Agrawal et al., OSDI 2024; vLLM's default): as continuous,
  but a prompt is prefilled ``chunk`` tokens a step in the same GEMMs and MoE calls as the decode rows, so
  that a long prompt does not stall the running answers; the MoE layers then see mixed batches of prompt
  and decode tokens, as a served model's do.

    python -m moegps.engine.serve                                   # bundled model, MMLU prompts, all policies
    python -m moegps.engine.serve --requests 64 --rate 2 4 8 --max-batch 8 --max-new-tokens 64 --out serve.csv
    python -m moegps.engine.serve --model mixtral-8x7b --requests 256 --rate 20 --max-batch 32 --chunk 256  # GPU
    torchrun --nproc-per-node 8 -m moegps.engine.serve --model mixtral-8x7b --placement balanced ...  # 8 GPUs, EP

All three run through one loop (``serve``), so a comparison differs only in when requests are admitted
and how prompts are prefilled. The decode step is the engine's: a CUDA graph per batch-size bucket over
cache slots 0..bucket-1 (and per bucket and chunk size with a chunk beside it). A newcomer takes the
lowest free slot, so the bucket follows the number of running requests; free slots inside the bucket
decode token 0 parked at position 0 of their own slot, which the next newcomer there overwrites, and by
default (``Engine.alias_free_rows``) route as a running row, so that they read no experts of their own.
Each step reads its tokens back to the host to see which answers ended (one synchronisation a step, as
in vLLM: a step without it cannot admit into a slot freed by it). Whole prompts: a lone newcomer through
the engine's prefill graphs (``PrefillGraphs``, with their slots): one graph per length class for a lone
newcomer, one per 128-token multiple for several packed (up to 2048 tokens; an eager packed prefill
beyond, of at most ``max_prefill_tokens`` prompt tokens).

On expert-parallel ranks (``engine.parallel.expert_parallel``: data-parallel attention) each rank serves
requests of its own (``rank_order``) on its own slots and clock, and the ranks agree before every prefill
and every step (two small all-reduces): when one rank prefills, the others join its MoE layers' dispatches
with no tokens; while any rank has a running answer, every rank steps (a rank with none decodes a dummy
row); when none has, all wait for the earliest next arrival on any rank.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..executor import dist as xdist
from ..files import atomic_path
from ..kernels.launch import get_config
from ..kernels.routing import align_variant
from ..models.tokenizer import mixtral_tokenizer
from ..paths import shared_data
from ..placement.algorithms import canonical, place
from ..prompts import Prompt, load_mmlu
from .generate import BUCKETS, MAX_PACKED_TOKENS, Engine, Sampling, bucket_for, build_model, choose_tokens
from .model import KVCache, Model, prefill
from .parallel import expert_parallel, idle_moe_calls, serving_comm


POLICIES = ("continuous", "chunked", "static")
MAX_PREFILL_TOKENS = 8192  # prompt tokens of one packed eager prefill at most
# chunk sizes captured (a chunk and its halvings, chunk_sizes): on an H100, the 64-expert shape's chunked serving
# ran time to first token 2-6% shorter with 4 than with 1 (benchmarks/engine/serve-chunk-graphs-h100-2026-12-05-ab/)
CHUNK_GRAPHS = 4


@dataclass(frozen=True)
class Request:
    prompt: list[int]                # token ids
    max_new_tokens: int = 32         # counts the first token (the prefill's)
    arrival_s: float = 0.0           # seconds after serving starts
    sampling: Sampling | None = None  # None: serve's, with seed + the request's index


@dataclass
class Served:
    tokens: list[int]          # new tokens, up to and including the first stop token
    arrival_s: float           # seconds after serving started, as the others
    first_token_s: float       # when its first token was on the host
    finish_s: float            # when its last token was on the host
    first_step: int = -1       # the engine step (0, 1, ...: decode steps run) its first token came with or before
    finish_step: int = -1      # the step of its last token (replay.continuous_schedule / chunked_schedule's)


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


def request_draws(requests: list[Request], sampling: Sampling) -> list[Sampling]:
    """Each request's sampling: its own, else ``sampling`` with the seed + the request's index."""
    return [r.sampling or replace(sampling, seed=sampling.seed + i) for i, r in enumerate(requests)]


def chunk_sizes(chunk: int, graphs: int = 1) -> list[int]:
    """The chunk sizes a chunked run's steps are captured at: ``chunk`` and up to ``graphs - 1`` halvings of it
    (while even), largest first. A prompt's piece (its last is often short) is padded up to the smallest that
    holds it, as vLLM pads a mixed batch to its nearest captured size: the padding rows are computed too."""
    sizes = [chunk]
    while len(sizes) < graphs and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def serve(engine: Engine, requests: list[Request], sampling: Sampling | None = None, stop_tokens=(),
          continuous: bool = True, chunk: int = 0, max_prefill_tokens: int = MAX_PREFILL_TOKENS, clock=time.perf_counter,
          sleep=time.sleep, calls: list[dict] | None = None, chunk_graphs: int = CHUNK_GRAPHS) -> list[Served]:
    """Serve ``requests`` (in the order of their arrival, ties by index) on ``engine``'s cache slots; returns
    each request's answer and times (host clock, seconds since the call began), in the requests' order.
    On expert-parallel ranks, every rank calls this with its own requests at the same time (module docstring).

    ``continuous``: admit waiting requests before every decode step (iteration-level); otherwise only when
    every slot is free (request-level). Admitted prompts are prefilled whole, the decode of the others
    waiting meanwhile, or with ``chunk`` > 0 (continuous only) ``chunk`` tokens of one prompt a step in the
    same GEMMs and MoE calls as the decode rows (``Engine.step(bucket, chunk)``), so that a long prompt
    does not stall the running answers for its whole prefill; a piece of it replays the smallest of
    ``chunk_sizes(chunk, chunk_graphs)`` that holds it. ``clock``/``sleep`` are injectable so tests
    can run on a fake clock. A request's answer equals ``engine.generate`` of it alone with its sampling
    (up to rounding in the batch's GEMMs), sampled ones too: each draw is keyed by the request's seed and
    its count of tokens (``generate.counter_uniforms``), not by the batch.

    ``calls``: a list that gets one record per model call, in order, what the serving simulator costs
    (``simulator.serving.Call``): ``prompts`` (a whole-prompt prefill's prompt lengths, space-separated),
    ``positions`` (a decode step's bucket rows' positions), ``chunk`` and ``chunk_start`` (the prompt chunk
    beside them), ``graph`` (a CUDA graph replay), and the call's ``start_s`` and ``end_s`` on the run's clock:
    from the loop's turn to the call until its tokens are on the host (the step's one synchronisation); and
    ``slept_s``, what the loop slept waiting for arrivals since the call before, so that the rest of the time
    between two calls is the loop's own host work."""
    comm = serving_comm(engine.model)  # None: one process
    if chunk < 0 or (chunk and not continuous):
        raise ValueError(f"chunk must be 0 (whole prompts) or > 0 with continuous batching, got {chunk} "
                         f"with continuous={continuous}")
    check_requests(engine, requests)
    sizes = chunk_sizes(chunk, chunk_graphs)
    sampling = sampling or Sampling()
    model, device, slots = engine.model, engine.model.device, engine.cache.slots
    draws = request_draws(requests, sampling)
    idle = Sampling()  # a free slot's dummy row: greedy
    stops = set(int(t) for t in stop_tokens)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    waiting = list(reversed(order))   # a stack: the next to arrive last
    free = list(range(slots))         # a heap: the lowest free slot first
    prefilling: list[list[int]] = []  # [request, slot, prompt tokens done], in admission order (chunked)
    running: dict[int, int] = {}      # slot -> request index
    answers: dict[int, list[int]] = {}
    first_s: dict[int, tuple[float, int]] = {}  # request -> (time, step) of its first token
    served: dict[int, Served] = {}
    steps = 0  # decode steps run: the index of the next
    position = [0] * slots  # engine.positions as the host knows it without a synchronisation (the calls' records)
    slept = 0.0  # waits for arrivals since the last call (the calls' records)
    live = torch.zeros(slots, dtype=torch.long, device=device)  # 1 where a slot holds a running request
    # Every free slot's dummy row decodes token 0 at position 0, every step (its output is dropped): rows of one
    # token at one position route alike, so the free rows of a step add at most one token's experts to the weights
    # it reads. Left to decode their own outputs, free rows freed at different steps carry different tokens and
    # each reads experts of its own: a 32-row step with 8 answers running took 11.3 ms that way on the H100, 8.1
    # with the free rows pinned, with one running 11.3 against 4.0 (benchmarks/engine/free_rows_probe.py).
    engine.tokens.zero_()
    engine.positions.zero_()
    # With engine.alias_free_rows (the default), the free rows (and a prefilling slot's parked row) route as the
    # lowest running row and read no expert of their own: route_as is rewritten when the running slots change.
    routed_as: list[int] = []
    start = clock()

    def now() -> float:
        return clock() - start

    def take(slot: int, token: int, at: float) -> None:
        """Append a token to the answer in ``slot``; end the answer (and free the slot) if it is done."""
        i = running[slot]
        answers[i].append(token)
        if token in stops or len(answers[i]) == requests[i].max_new_tokens:
            first_at, first_step = first_s.pop(i)
            served[i] = Served(answers.pop(i), requests[i].arrival_s, first_at, at, first_step, steps)
            del running[slot]
            heapq.heappush(free, slot)
            live[slot] = 0
            engine.tokens[slot] = 0
            engine.positions[slot] = position[slot] = 0

    def begin(into: list[int], newcomers: list[int], first: torch.Tensor) -> float:
        """Newcomers whose prompts are in the cache start decoding from their first tokens ``first``; returns
        when those were on the host."""
        index = torch.tensor(into, device=device)
        lengths = [len(requests[i].prompt) for i in newcomers]
        engine.tokens[index] = first
        engine.positions[index] = torch.tensor(lengths, device=device)
        live[index] = 1
        tokens = first.tolist()  # waits for the prefill
        at = now()
        for slot, i, token, length in zip(into, newcomers, tokens, lengths):
            running[slot], answers[i], first_s[i], position[slot] = i, [], (at, steps), length
            take(slot, token, at)
        return at

    def record(start_s: float, end_s: float, graph: bool, prompts=(), positions=(), chunk_size=0,
               chunk_start=0) -> None:
        nonlocal slept
        if calls is not None:
            calls.append({"prompts": " ".join(map(str, prompts)), "positions": " ".join(map(str, positions)),
                          "chunk": chunk_size, "chunk_start": chunk_start, "graph": graph, "start_s": start_s,
                          "end_s": end_s, "slept_s": slept})
        slept = 0.0

    def agree(flags: list[float]) -> list[float]:
        """The largest of every rank's ``flags`` (expert-parallel ranks decide together), else ``flags``."""
        if comm is None:
            return flags
        combined = torch.tensor(flags, dtype=torch.float64, device=comm.device)
        dist.all_reduce(combined, op=dist.ReduceOp.MAX, group=comm.group)
        return combined.tolist()

    def admit() -> tuple[list[int], list[int]]:
        """The arrived requests that fit, and their slots; with chunks they join the prefilling queue."""
        newcomers: list[int] = []
        budget = max_prefill_tokens
        while waiting and len(newcomers) < len(free) and requests[waiting[-1]].arrival_s <= now():
            n = len(requests[waiting[-1]].prompt)
            if newcomers and n > budget and not chunk:
                break
            newcomers.append(waiting.pop())
            budget -= n
        into = [heapq.heappop(free) for _ in newcomers]
        if chunk:  # prefilled a chunk a step by decode()
            prefilling.extend([i, slot, 0] for i, slot in zip(newcomers, into))
            return [], []
        return newcomers, into

    def prefill_whole(newcomers: list[int], into: list[int]) -> None:
        if not newcomers:  # another rank prefills: join its MoE layers' dispatches
            idle_moe_calls(model)
            return
        start_s = now()
        prompts = [torch.as_tensor(requests[i].prompt, dtype=torch.long) for i in newcomers]
        graphs = engine.prefill_graphs
        graphed = graphs is not None and graphs.pays([len(p) for p in prompts])
        if graphed:
            logits = graphs(prompts, slots=into)
        else:
            logits = prefill(model, engine.cache, prompts, slots=into)
        end_s = begin(into, newcomers, choose_tokens(logits, [draws[i] for i in newcomers], 0))
        record(start_s, end_s, graphed, prompts=[len(p) for p in prompts])

    def decode() -> None:
        """One step of the running requests' decode, and of the next prompt chunk when there is one."""
        nonlocal steps
        start_s = now()
        bucket = bucket_for(max(running, default=0) + 1)
        size = chunk if prefilling else 0
        if size:
            i, slot, done = prefilling[0]
            piece = requests[i].prompt[done:done + chunk]
            size = min(s for s in sizes if s >= len(piece))
            engine.load_chunk(size, piece, slot, done)
            # the slot's decode row (if in the bucket) parks there
            engine.positions[slot] = position[slot] = done + len(piece)
        positions = position[:bucket]
        rows = [draws[running[b]] if b in running else idle for b in range(bucket)]
        counts = [len(answers[running[b]]) if b in running else 0 for b in range(bucket)]
        if size:  # the chunk's row: its request's first token
            rows, counts = rows + [draws[i]], counts + [0]
        if engine.alias_free_rows:
            anchor = min(running, default=0)
            route = [b if b in running else anchor for b in range(bucket)]
            if route != routed_as[:bucket]:
                engine.route_as[:bucket] = torch.tensor(route, device=device)
                routed_as[:bucket] = route
        nxt = choose_tokens(engine.step(bucket, size)(), rows, counts)
        engine.tokens[:bucket] = nxt[:bucket] * live[:bucket]  # free rows back to token 0
        engine.positions[:bucket] += live[:bucket]
        for row in running:  # every running slot is in the bucket
            position[row] += 1
        host = nxt.tolist()
        at = now()
        record(start_s, at, engine.cuda_graph, positions=positions, chunk_size=size, chunk_start=done if size else 0)
        for row in list(running):
            take(row, host[row], at)
        if size:
            prefilling[0][2] += len(piece)
            if prefilling[0][2] == len(requests[i].prompt):
                prefilling.pop(0)
                begin([slot], [i], nxt[bucket:])
        steps += 1

    with torch.inference_mode():
        while True:
            newcomers, into = admit() if continuous or not running else ([], [])
            if agree([bool(newcomers)])[0]:
                prefill_whole(newcomers, into)
            # the wait for this rank's next arrival, negated: the largest over the ranks is the shortest wait
            wait = requests[waiting[-1]].arrival_s - now() if waiting else float("inf")
            busy, queued, less_wait = agree([bool(running or prefilling), bool(waiting), -wait])
            if busy:
                decode()
            elif queued:  # nothing to run anywhere: wait for the next arrival on any rank
                before = now()
                sleep(max(0.0, -less_wait))
                slept += now() - before
            else:
                break
    return [served[i] for i in range(len(requests))]


def rank_order(requests: list[Request], rank: int, world: int) -> list[int]:
    """The indices of this rank's share of ``requests`` under data-parallel attention: every ``world``-th in
    order of arrival (ties by index), from the ``rank``-th, as a round-robin front end hands them out."""
    return sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))[rank::world]


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


def mmlu_questions(mmlu: str | Path | None = None) -> list[Prompt]:
    """The MMLU questions in ``mmlu`` (a folder of per-subject files; default ``../shared/data/mmlu/test``)."""
    return load_mmlu(mmlu or shared_data("mmlu", "test"))


def mmlu_requests(n: int, rate: float, max_new_tokens: int, seed: int = 0, tokenizer=None,
                  questions: list[Prompt] | None = None) -> list[Request]:
    """``n`` MMLU questions drawn at random (without replacement, all subjects) from ``questions`` (default
    :func:`mmlu_questions`'s), tokenised; arrivals a Poisson process of
    ``rate`` requests a second (0: all at once; other rates of one seed scale the same gaps); answer lengths
    uniform in [1, max_new_tokens] (a random model's stop token rarely comes, so the lengths are drawn)."""
    tokenizer = tokenizer or mixtral_tokenizer()
    prompts = questions if questions is not None else mmlu_questions()
    if n > len(prompts):
        raise ValueError(f"{n} requests asked for, {len(prompts)} MMLU questions available")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(prompts), size=n, replace=False)
    draws = rng.standard_exponential(size=n)  # at any rate, 0 too: every rate of a seed, the same answer lengths
    gaps = draws / rate if rate > 0 else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    lengths = rng.integers(1, max_new_tokens + 1, size=n)
    return [Request(tokenizer.encode(prompts[p].text), int(m), float(a)) for p, m, a in zip(picked, lengths, arrivals)]


def held_out_prompts(requests: list[Request], n: int, seed: int = 0, tokenizer=None,
                     questions: list[Prompt] | None = None) -> list[list[int]]:
    """``n`` tokenised MMLU questions drawn at random (seed + 1) among those that are not ``requests``' prompts:
    what a placement is fitted on, so that the served requests are out of its sample."""
    tokenizer = tokenizer or mixtral_tokenizer()
    prompts = questions if questions is not None else mmlu_questions()
    served = {tuple(r.prompt) for r in requests}
    out = []
    for p in np.random.default_rng(seed + 1).permutation(len(prompts)):
        tokens = tokenizer.encode(prompts[p].text)
        if tuple(tokens) not in served:
            out.append(tokens)
        if len(out) == n:
            return out
    raise ValueError(f"{n} held-out MMLU questions asked for, {len(out)} left beside the {len(requests)} served")


def expert_loads(model: Model, prompts: list[list[int]]) -> np.ndarray:
    """``[MoE layers, experts]``: how many of ``prompts``' tokens chose each expert, counted while prefilling
    them one at a time on a one-process ``model`` (its router's top-k, the shared expert left out)."""
    cache = KVCache(model.shape, 1, max(len(p) for p in prompts), model.dtype, model.device)
    model.ensure_rope(cache.max_len)
    counts = model.count_routes()
    try:
        with torch.inference_mode():
            for p in prompts:
                prefill(model, cache, [torch.as_tensor(p, dtype=torch.long)])
        return counts[model.moe_layers].cpu().numpy()
    finally:
        model.routing_counts = None


def decode_ceiling(engine: Engine, requests: list[Request], steps: int = 16) -> float:
    """New tokens a second if every step were a decode step of a full bucket: the engine's slots over the
    median of up to ``steps`` such steps (``Engine.generate`` on the shortest prompts, as many steps as the
    cache leaves them, measured now, after a warm-up run). No policy can pass it, since prefill only adds
    work; how near one comes is what its schedule loses."""
    shortest = sorted((r.prompt for r in requests), key=len)
    prompts = (shortest * engine.cache.slots)[:engine.cache.slots]
    steps = max(1, min(steps, engine.max_len - max(len(p) for p in prompts) - 1))
    engine.generate(prompts, 2)
    return engine.cache.slots * 1e3 / engine.generate(prompts, steps + 1).decode_ms_per_step


def warm_up(engine: Engine, requests: list[Request], chunk: int = 0,
            max_prefill_tokens: int = MAX_PREFILL_TOKENS, chunk_graphs: int = CHUNK_GRAPHS) -> None:
    """Compile the kernels and capture what serving these requests replays (GPU), so that no capture or
    compile falls inside a timed run: the decode graph of every bucket up to the engine's slots (with a
    prompt chunk of each of ``chunk_sizes(chunk, chunk_graphs)`` beside it too, when chunked), each prompt
    length class's prefill graph in slot 0 and in another slot, the packed prefill graph of every token count
    several newcomers can make, and an eager prefill of each size in ``packed_prefill_sizes`` (packs past the
    graphs). Without the last, the first static run on an H200 stalled on the MoE kernels' compiles (session v: a
    17 s median time to first token at 5 requests a second, 3.8 s at 10)."""
    if engine.prefill_graphs is None:
        return
    graphs, slots = engine.prefill_graphs, engine.cache.slots
    one_of_each = {graphs.padded_length(len(r.prompt)): r.prompt for r in requests}  # a prompt a length class
    lengths = sorted(len(r.prompt) for r in requests)
    pack_sizes = []
    if slots > 1 and len(lengths) > 1:
        most = min(largest_pack(engine, lengths, max_prefill_tokens), graphs.max_packed_tokens)
        pack_sizes = range(graphs.packed_length(lengths[0] + lengths[1]), graphs.packed_length(most) + 1,
                           graphs.round_to)
    graphs.max_graphs = max(graphs.max_graphs, 2 * len(one_of_each) + len(pack_sizes))
    for prompt in one_of_each.values():
        for slot in range(min(2, slots)):
            graphs([torch.as_tensor(prompt)], slots=[slot])
    stream = torch.as_tensor([t for r in requests for t in r.prompt])
    piece = engine.max_len - 1

    def first_tokens(size: int) -> torch.Tensor:  # the requests' prompt tokens, in a row, as many as size
        return stream.repeat(-(-size // len(stream)))[:size]
    for size in pack_sizes:  # at least two prompts, each within the cache
        parts = list(first_tokens(size).tensor_split(max(2, -(-size // piece))))
        graphs(parts, slots=list(range(len(parts))))
    for size in packed_prefill_sizes(engine, lengths, max_prefill_tokens):
        with torch.inference_mode():
            prefill(engine.model, engine.cache, list(first_tokens(size).split(piece)))
    for bucket in (b for b in BUCKETS if b <= engine.cache.slots):
        for size in [0] + (chunk_sizes(chunk, chunk_graphs) if chunk else []):
            engine.step(bucket, size)()
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()


def largest_pack(engine: Engine, lengths: list[int], max_prefill_tokens: int = MAX_PREFILL_TOKENS) -> int:
    """The most prompt tokens newcomers of these prompt ``lengths`` (sorted) can be prefilled with at once: the
    longest prompts, as many as the slots, within the prefill budget and the cache."""
    slots = engine.cache.slots
    return min(max_prefill_tokens, sum(lengths[-slots:]), slots * (engine.max_len - 1))


def packed_prefill_sizes(engine: Engine, prompt_tokens: list[int],
                         max_prefill_tokens: int = MAX_PREFILL_TOKENS) -> list[int]:
    """Token counts of eager prefills that, between them, compile every MoE kernel a packed prefill of these
    prompts can run: from two of the shortest prompts to as many of the longest as the slots and
    ``max_prefill_tokens`` take, the smallest count of each kernel config (``get_config``), of each of Triton's
    specialisation classes of the token and selection counts (an integer argument divisible by 16 compiles a
    kernel of its own) and of each compiled variant of the routing's sort (``routing.align_variant``: its chunk
    count's power of two is a constexpr). Without the last, the first eager pack of 2,449 tokens after the
    warm-up took 2.2-4.1 s on an H100 with a fresh Triton cache against 32-46 ms for the next: a compile
    (benchmarks/engine/first_call_probe.py). None without MoE kernels of this process's own (no MoE layers, or
    expert-parallel ranks, which run eagerly and compile as they go)."""
    lengths = sorted(prompt_tokens)
    slots = engine.cache.slots
    if slots < 2 or len(lengths) < 2:
        return []
    low, high = lengths[0] + lengths[1], largest_pack(engine, lengths, max_prefill_tokens)
    layer = next((x for x in engine.model.layers if x.w_gate_up is not None), None)
    if layer is None or layer.experts is not None:
        return []
    experts, two_ffn, hidden = layer.w_gate_up.shape
    top_k = engine.model.shape.top_k + layer.n_shared
    first_of_kind: dict[tuple, int] = {}
    for tokens in range(low, high + 1):
        config = get_config(tokens, experts, hidden, two_ffn // 2, top_k, engine.model.device)
        kind = (json.dumps(config, sort_keys=True), tokens % 16 == 0, tokens * top_k % 16 == 0,
                align_variant(tokens * top_k))
        first_of_kind.setdefault(kind, tokens)
    return sorted(first_of_kind.values())


# ---- the command's file: every request's times, rewritten after each run, so that a restart resumes ----------

def served_by_run(rows: list[dict]) -> dict[tuple[str, float], list[Served]]:
    """{(policy, rate): each request's times} from the rows of the command's CSV (as read: strings); the
    answers' token counts stand for their tokens, which the file does not keep."""
    runs: dict[tuple[str, float], list[Served]] = {}
    for r in sorted(rows, key=lambda r: int(r["request"])):
        runs.setdefault((r["policy"], float(r["rate"])), []).append(
            Served([0] * int(r["new_tokens"]), float(r["arrival_s"]), float(r["first_token_s"]), float(r["finish_s"])))
    return runs


def read_runs(out: Path, settings: dict) -> list[dict]:
    """The rows an earlier call with these ``settings`` left in ``out`` (none if there is no file); an error
    naming both files if it was written with other settings (its ``.json`` beside it says which)."""
    if not out.exists():
        return []
    sidecar = settings_path(out)
    written = json.loads(sidecar.read_text()) if sidecar.exists() else None
    if written != settings:
        raise ValueError(f"--out {out} holds runs of other settings ({sidecar}: {written}; now: {settings}): remove "
                         "it or choose another --out")
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def write_runs(out: Path, rows: list[dict], settings: dict) -> None:
    with atomic_path(settings_path(out)) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))
    write_rows(out, rows)


def write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def settings_path(out: Path) -> Path:
    """The settings the runs in ``out`` were made with (``OUT.json``, beside it)."""
    return out.with_name(out.name + ".json")


def calls_path(out: Path) -> Path:
    """Where the command keeps every model call of the runs whose requests' times are in ``out``."""
    return out.with_name(f"{out.stem}-calls.csv")


def runs_of_calls(calls: Path) -> Path | None:
    """The ``out`` whose ``calls_path`` is ``calls`` (or that file gzipped), None for a name no run's calls have."""
    stem = calls.name.removesuffix(".gz").removesuffix(".csv")
    return calls.with_name(stem.removesuffix("-calls") + ".csv") if stem.endswith("-calls") else None


def read_call_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The call records in ``path`` of the runs (policy, rate) that ``rows`` (the requests' file) holds: those
    written after each run, before its requests' rows (an interrupted run's are dropped)."""
    if not path.exists():
        return []
    finished = {(r["policy"], float(r["rate"])) for r in rows}
    with open(path, newline="") as f:
        return [c for c in csv.DictReader(f) if (c["policy"], float(c["rate"])) in finished]


def add_workload_arguments(ap: argparse.ArgumentParser) -> None:
    """The requests, slots and policies of a serving run: this command's and the serving simulator's
    (``moegps.simulator.serving``), which replays the same requests; ``check_workload_arguments`` checks them."""
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, nargs="+", default=[0.0],
                    help="Poisson arrivals, requests a second (0: all at once); several: one run each")
    ap.add_argument("--max-batch", type=int, default=8, help="cache slots: requests decoded together at most")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer lengths are drawn in [1, this]")
    ap.add_argument("--policy", nargs="+", choices=POLICIES, default=list(POLICIES),
                    help="continuous: admit before every step, prompts prefilled whole; chunked: the same with "
                    "prompts prefilled --chunk tokens a step beside the decode; static: admit when all slots are free")
    ap.add_argument("--chunk", type=int, default=128, help="prompt tokens a step of the chunked policy")
    ap.add_argument("--chunk-graphs", type=int, default=CHUNK_GRAPHS,
                    help="chunk sizes captured: --chunk and its halvings, this many in all; a prompt's piece is padded "
                    "up to the smallest that holds it (1: every piece to --chunk)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mmlu", default=None, help="folder of MMLU files (default ../shared/data/mmlu/test)")


def check_workload_arguments(ap: argparse.ArgumentParser, args) -> None:
    for name in ("requests", "max_batch", "max_new_tokens", "chunk", "chunk_graphs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.rate) < 0:
        ap.error(f"--rate must be >= 0, got {min(args.rate)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mixtral-tiny", help="bundled model, checkpoint folder, or shape name")
    add_workload_arguments(ap)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--free-rows", choices=["token0", "alias"], default="alias",
                    help="a decode bucket's free rows decode token 0 and pick its experts (token0), or compute the "
                    "experts of a running row and read none of their own (alias: Engine.alias_free_rows)")
    ap.add_argument("--packed-graph-tokens", type=int, default=MAX_PACKED_TOKENS,
                    help="several newcomers' prefill replays a CUDA graph up to this many tokens (0: always eager)")
    ap.add_argument("--out", default=None, help="CSV of every request's times, a row per rate, policy and request; "
                    "rewritten after each run, and a call with the same settings resumes from it; beside it "
                    "OUT-calls.csv, every model call of each run (serve's calls records; the first rank's)")
    ap.add_argument("--placement", default=None,
                    help="under torchrun (several ranks): expert parallel, each rank serving every world-th request "
                    "with its own cache slots, the experts placed by this moegps.placement algorithm (static, "
                    "balanced, ...) on the loads counted on --calibration held-out MMLU questions")
    ap.add_argument("--extra-slots", type=int, default=1, help="expert slots a rank holds beyond experts / ranks")
    ap.add_argument("--calibration", type=int, default=32, help="held-out questions the placement is fitted on")
    args = ap.parse_args(argv)
    check_workload_arguments(ap, args)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    joined = dist.is_available() and dist.is_initialized()  # a caller's process group: left for it to end
    comm = xdist.init(device=args.device)  # one rank unless started by torchrun
    if args.placement:
        try:
            canonical(args.placement)  # on every rank, before they wait for the first to place
        except ValueError as e:
            ap.error(f"--placement: {e}")
    if comm.distributed != bool(args.placement):
        ap.error(f"--placement places the experts over several ranks (torchrun --nproc-per-node N -m "
                 f"moegps.engine.serve --placement balanced ...); here {comm.world} rank(s) and --placement "
                 f"{args.placement}")
    out = Path(args.out) if args.out else None
    settings = {k: v for k, v in vars(args).items() if k not in ("rate", "policy", "out")}  # what a resume must share
    settings["ranks"] = comm.world
    try:
        rows = read_runs(out, settings) if out else []
        call_rows = read_call_rows(calls_path(out), rows) if out else []
        sampling = Sampling(args.temperature, args.top_k, args.seed, args.top_p)
        questions = mmlu_questions(args.mmlu)  # read once: every rate's requests and the held-out ones
        workloads = {rate: mmlu_requests(args.requests, rate, args.max_new_tokens, args.seed, questions=questions)
                     for rate in args.rate}
        model = build_model(args.model, str(comm.device) if comm.distributed else args.device, args.dtype)
        if comm.distributed:
            model = placed_over_ranks(model, comm, args, workloads[args.rate[0]], questions)
    except (ValueError, FileNotFoundError, KeyError) as e:
        ap.error(str(e))
    say = print if comm.rank == 0 else (lambda *a, **k: None)  # the first rank speaks for all
    requests = workloads[args.rate[0]]
    max_len = max(len(r.prompt) + r.max_new_tokens for run in workloads.values() for r in run)  # every rate's
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, cuda_graph=not args.no_cuda_graph,
                    alias_free_rows=args.free_rows == "alias")
    if engine.prefill_graphs is not None:
        engine.prefill_graphs.max_packed_tokens = args.packed_graph_tokens
    warm_up(engine, requests, args.chunk if "chunked" in args.policy else 0, chunk_graphs=args.chunk_graphs)
    policies = [p for p in POLICIES if p in args.policy]
    ceiling = decode_ceiling(engine, requests) * comm.world  # the ranks' slots decode in the same step
    say(f"{model.source} on {model.device}: {args.requests} MMLU requests, prompts of "
        f"{min(len(r.prompt) for r in requests)}-{max(len(r.prompt) for r in requests)} tokens, answers of "
        f"1-{args.max_new_tokens} tokens, {engine.cache.slots} slots"
        f"{f' on each of {comm.world} expert-parallel ranks ({args.placement} placement)' if comm.distributed else ''}"
        f"{f', chunks of {args.chunk} tokens' if 'chunked' in policies else ''}; host clock, ms")
    say(f"decode ceiling: {ceiling:.1f} new tokens/s ({comm.world * engine.cache.slots} slots over a full bucket's "
        f"decode step, measured now); 'ceiling' below: tokens/s over it")
    say(f"{'rate/s':>7} {'policy':<11} {'tokens/s':>9} {'ceiling':>8} {'span s':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
        f"{'TPOT p50':>9} {'latency p50':>12} {'latency p90':>12}")
    earlier = served_by_run(rows)
    for rate, requests in workloads.items():  # a row a run: its progress
        results = {}
        for policy in policies:
            if (policy, rate) in earlier:  # finished by an earlier, interrupted call with these settings
                served, note = earlier[policy, rate], "  (from the earlier run's file)"
            else:
                calls: list[dict] = []
                served, note = serve_on_ranks(comm, engine, requests, sampling, continuous=policy != "static",
                                              chunk=args.chunk if policy == "chunked" else 0, calls=calls,
                                              chunk_graphs=args.chunk_graphs), ""
                call_rows += [{"rate": rate, "policy": policy, "call": j, **c} for j, c in enumerate(calls)]
                rows += [{"rate": rate, "policy": policy, "decode_ceiling": ceiling, "request": i,
                          "prompt_tokens": len(r.prompt), "new_tokens": len(a.tokens),
                          **{k: v for k, v in asdict(a).items() if k != "tokens"}}
                         for i, (r, a) in enumerate(zip(requests, served))]
                if out and comm.rank == 0:
                    write_rows(calls_path(out), call_rows)
                    write_runs(out, rows, settings)
            s = results[policy] = summarize(served)
            say(f"{rate:>7g} {policy:<11} {s['tokens_per_s']:>9.1f} {s['tokens_per_s'] / ceiling:>8.0%} "
                f"{s['span_s']:>8.2f} {s['ttft_p50_ms']:>9.1f} {s['ttft_p90_ms']:>9.1f} {s['tpot_p50_ms']:>9.2f} "
                f"{s['latency_p50_ms']:>12.1f} {s['latency_p90_ms']:>12.1f}{note}", flush=True)
        if "static" in results:
            base = results["static"]
            for policy in (p for p in results if p != "static"):
                c = results[policy]
                say(f"{'':>7} {policy} / static: {c['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                    f"{base['latency_p50_ms'] / c['latency_p50_ms']:.2f}x shorter median latency", flush=True)
    if out:
        say(f"wrote {out}")
    if not joined:
        xdist.shutdown(comm)
    return 0


def placed_over_ranks(model: Model, comm, args, requests: list[Request], questions: list[Prompt]) -> Model:
    """``model`` expert-parallel over ``comm``'s ranks, placed by ``args.placement`` on the expert loads of
    ``args.calibration`` held-out MMLU questions (counted on the first rank, the same placement on all)."""
    box = [None]
    if comm.rank == 0:
        loads = expert_loads(model, held_out_prompts(requests, args.calibration, args.seed, questions=questions))
        E = model.shape.n_experts
        box[0] = place(args.placement, loads, comm.world, -(-E // comm.world) + args.extra_slots)
    dist.broadcast_object_list(box, src=0, group=comm.group)
    return expert_parallel(model, comm, box[0])


def serve_on_ranks(comm, engine: Engine, requests: list[Request], sampling: Sampling, **policy) -> list[Served]:
    """``serve`` on one process, or on every expert-parallel rank with its share of ``requests``: every
    request's answer and times, in ``requests``' order (each rank's times on its own clock, started together)."""
    if not comm.distributed:
        return serve(engine, requests, sampling, **policy)
    mine = rank_order(requests, comm.rank, comm.world)
    draws = request_draws(requests, sampling or Sampling())  # each request's seed as on one process
    own = [replace(requests[i], sampling=draws[i]) for i in mine]
    dist.barrier(group=comm.group)
    served = serve(engine, own, sampling, **policy)
    everyone = [None] * comm.world
    dist.all_gather_object(everyone, (mine, served), group=comm.group)
    by_index = {i: s for indices, answers in everyone for i, s in zip(indices, answers)}
    return [by_index[i] for i in range(len(requests))]


if __name__ == "__main__":
    sys.exit(main())
