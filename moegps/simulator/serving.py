"""Serving in simulated time: the engine's scheduler over requests that arrive, every model call costed by the cost model.

``moegps.engine.serve`` measures time to first token and latency at a request rate on a GPU; this predicts them
without one. :func:`serve_times` runs the engine's loop (``engine.serve.serve``: its admission, slots, decode
buckets, whole or chunked prefill, static or continuous batching) on a clock that each model call moves on by
:func:`call_seconds`, the cost model's time for that call on one GPU (``cost.other_time`` for the attention block
with its context, ``cost.expert_time`` for the experts the call's tokens pick, the profile's per-layer overhead,
the vocabulary projection). The requests are the engine command's own (``mmlu_requests``, same seed: the same
prompts, answer lengths and arrivals), so a simulated run and a measured one can be laid side by side
(``benchmarks/engine/plot_serve.py``).

Routing: a call's ``n`` tokens are taken to pick each expert with probability ``k / E`` independently, as a
random-weight router spreads its picks; an expert's time is averaged over its binomial count (the number of
distinct experts read is what sets a decode step's weight traffic). A decode step's free rows add no token while a
row runs (the engine routes them as a running row: ``Engine.alias_free_rows``), or one with ``--free-rows token0``
(the engine's way before session aa: all of them decode token 0); a measured run's calls (``--calls``) are costed
with the mode its record names (:func:`run_free_rows`). A random-weight model's decode rows over MMLU
prompts pick far fewer distinct experts than that (session z, one H100: 40 of 64 at 32 rows against uniform
routing's 61); given those counts as measured (:func:`active_expert_seconds`, ``--active-experts``) the steps are
costed on them. A trained model's routing comes from a trace of it (:func:`trace_expert_seconds`, ``--routing-trace``).

The calls of a measured run (``engine.serve``'s ``calls``, the command's OUT-calls.csv) can be costed one by one
against their measured times (:func:`compare_calls`, ``--calls``), a profile's weight rate and per-layer fixed cost
fitted to them (:func:`fit_calls`, ``--fit-rates``), out of sample by rate, and the loop run on their measured
times instead of the cost model's (:func:`measured_call_seconds`, ``--call-times``).

    python -m moegps.simulator.serving --shape mixtral-8x7b --system h200_8gpu --requests 128 --rate 5 10 20 40 \\
        --max-batch 32 --max-new-tokens 128 --chunk 256 --out sim-serve.csv
    python -m moegps.simulator.serving --shape deepseek-v2-lite --system h100_8gpu --calls RUN-calls.csv \\
        --fit-rates 40 --fitted-system fitted.yaml
"""

from __future__ import annotations

import argparse
import csv
import gzip
import heapq
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import binom

from ..shapes import ModelShape, from_name, names
from ..trace import RoutingTrace
from . import cost
from .system import SystemSpec, load_system

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # the engine's decode graph sizes (engine.generate.BUCKETS; a test ties them)


@dataclass(frozen=True)
class Call:
    """One model call of the serving loop: whole prompts prefilled together, or a decode step over ``bucket``
    cache slots (a free slot's dummy row included, as the engine's graph computes it) with ``chunk`` tokens of one
    prompt beside it, from position ``chunk_start``."""

    prompts: tuple[int, ...] = ()           # prompt lengths of a whole-prompt prefill
    decode_positions: tuple[int, ...] = ()  # the bucket's rows: each row's position (it attends to position + 1)
    chunk: int = 0                          # the chunk's rows (the graph's size: a last piece is padded)
    chunk_start: int = 0

    @property
    def bucket(self) -> int:
        return len(self.decode_positions)


def bucket_for(n: int) -> int:
    """The smallest decode bucket holding ``n`` slots (engine.generate.bucket_for)."""
    for size in BUCKETS:
        if size >= n:
            return size
    raise ValueError(f"{n} slots exceed the largest decode bucket {BUCKETS[-1]}")


def expected_expert_seconds(n_tokens: float, shape: ModelShape, system: SystemSpec) -> float:
    """Seconds one GPU holding all of ``shape``'s experts spends on one MoE layer's experts for ``n_tokens`` tokens
    routed uniformly: each expert's count is Binomial(n, k / E), its time ``cost.expert_time`` of that count,
    averaged over the distribution (0 tokens: not read)."""
    n = int(round(n_tokens))
    if n <= 0:
        return 0.0
    counts = np.arange(n + 1)
    p = binom.pmf(counts, n, shape.top_k / shape.n_experts)
    return float(shape.n_experts * (p * cost.expert_time(counts, shape, system)).sum())


def uniform_active_experts(n_tokens: float, n_experts: int, top_k: int) -> float:
    """Distinct experts ``n_tokens`` tokens pick in a layer when each picks ``top_k`` of ``n_experts`` uniformly (each
    expert missed by a token with probability 1 - k / E): the mean of the routing expected_expert_seconds costs."""
    return n_experts * (1 - (1 - top_k / n_experts) ** n_tokens)


def active_expert_seconds(points: dict[int, float], shape: ModelShape, system: SystemSpec):
    """A function ``n -> seconds`` one GPU holding all of ``shape``'s experts spends on the experts of ``n`` tokens at all
    its MoE layers, where ``n`` tokens pick a(n) distinct experts a layer as measured and share them evenly:
    ``points`` {tokens: mean distinct experts a MoE layer}, e.g. the decode steps' rows of
    ``benchmarks/engine/routing_context_probe.py`` (an engine's random-weight rows over MMLU prompts pick far fewer
    than uniform routing: 40 of 64 at 32 rows against 61). Between the points (and from a(1) = k) a(n) is
    interpolated in log n; past the last point the routing is uniform (expected_expert_seconds), since what was
    measured were decode steps and calls with more tokens carry prompts."""
    E, k = shape.n_experts, shape.top_k
    for n, active in points.items():
        if not (n >= 1 and k <= active <= min(E, n * k)):
            raise ValueError(f"active experts {n}={active}: expected at least top_k = {k} and at most min(E, n * k) = "
                             f"{min(E, n * k)} distinct experts for {n} tokens of {shape.name}")
    tokens = np.array([1.0, *sorted(points)])
    active = np.array([float(k), *(points[n] for n in sorted(points))])

    def seconds(n_tokens: float) -> float:
        n = int(round(n_tokens))
        if n <= 0:
            return 0.0
        if n > tokens[-1]:
            return shape.n_moe_layers * expected_expert_seconds(n, shape, system)
        a = float(np.interp(np.log(n), np.log(tokens), active))
        return shape.n_moe_layers * a * float(cost.expert_time(np.array([n * k / a]), shape, system)[0])

    return seconds


def trace_expert_seconds(trace, shape: ModelShape, system: SystemSpec, samples: int = 16, seed: int = 0):
    """A function ``n -> seconds`` that one GPU holding all of ``shape``'s experts spends on the experts ``n``
    tokens pick at all its MoE layers, the tokens drawn at random (with replacement) from ``trace``'s, each with
    the experts it chose at every layer, averaged over ``samples`` draws and cached by ``n``: routing as a real
    router skews it (a trained model's tokens pick fewer distinct experts than uniform ones). ``trace``: a
    :class:`moegps.trace.RoutingTrace` of ``shape``'s experts, top-k and MoE layers."""
    meta = trace.meta
    for field, want in (("n_experts", shape.n_experts), ("top_k", shape.top_k), ("n_layers", shape.n_moe_layers)):
        if getattr(meta, field) != want:
            raise ValueError(f"routing trace of {meta.model!r}: metadata field {field} is {getattr(meta, field)}, "
                             f"expected {want} for shape {shape.name} (a trace of the model whose calls are costed)")
    routing = trace.by_token().experts.astype(np.int64)  # [tokens, layers, k]
    offsets = np.arange(meta.n_layers)[:, None] * shape.n_experts
    rng = np.random.default_rng(seed)
    cache: dict[int, float] = {}

    def seconds(n_tokens: float) -> float:
        n = int(round(n_tokens))
        if n <= 0:
            return 0.0
        if n not in cache:
            total = 0.0
            for _ in range(samples):
                picks = routing[rng.integers(0, len(routing), size=n)] + offsets  # [n, layers, k]
                counts = np.bincount(picks.ravel(), minlength=meta.n_layers * shape.n_experts)
                total += float(cost.expert_time(counts, shape, system).sum())
            cache[n] = total / samples
        return cache[n]
    return seconds


# the engine's packed prefill graphs (engine.generate.PrefillGraphs; a test ties them): their token counts are
# multiples of PREFILL_ROUND_TO, up to MAX_PACKED_TOKENS
PREFILL_ROUND_TO = 128
MAX_PACKED_TOKENS = 2048


def eager_pack(call: Call, packed_graph_tokens: int = MAX_PACKED_TOKENS) -> bool:
    """Whether the engine prefills this call's prompts eagerly: several of more than ``packed_graph_tokens`` in
    all, rounded up to PREFILL_ROUND_TO (one prompt, smaller packs, decode steps and chunks replay graphs)."""
    return len(call.prompts) > 1 and -(-sum(call.prompts) // PREFILL_ROUND_TO) * PREFILL_ROUND_TO > packed_graph_tokens


def call_seconds(call: Call, shape: ModelShape, system: SystemSpec, eager_layer_s: float = 0.0,
                 packed_graph_tokens: int = MAX_PACKED_TOKENS, expert_seconds=None, free_rows: str = "alias") -> float:
    """The cost model's seconds for one serving call on one GPU: every layer's attention block over its tokens'
    contexts (a whole prompt's token at position p attends to p + 1 positions in the prompt, a decode row reads its
    K/V up to its position, a chunk's rows attend from ``chunk_start``), its experts (or its dense MLP, in the
    non-expert weights), the profile's per-layer overhead; the vocabulary projection (its weights once, two
    FLOPs a weight for each row that yields a token: a prompt's last, a decode row, the chunk's last); and the
    profile's ``block_overhead`` for every layer (calibrated on the engine's decode steps, or fitted to a measured
    run's calls by :func:`fit_calls`).

    The experts see the call's tokens routed uniformly at random, or ``expert_seconds(n)`` where given (all MoE
    layers' expert seconds for ``n`` tokens, e.g. :func:`trace_expert_seconds`); a decode step's free rows (position
    0) count as none (``"alias"``: ``Engine.alias_free_rows``, the default, they compute a running row's; with no row
    running, all of them row 0's: one token), or as one token (``free_rows="token0"``: they all decode token 0 at
    position 0 and pick the same experts).

    ``eager_layer_s``: the host's seconds to issue one layer of a prefill the engine runs eagerly: several prompts
    at once of more than ``packed_graph_tokens`` tokens rounded up to 128 (one prompt, smaller packs, decode steps
    and chunks replay CUDA graphs); such a call takes at least ``n_layers`` times that, however little the GPU
    has to do."""
    prompts = np.asarray(call.prompts, dtype=np.float64)
    positions = np.asarray(call.decode_positions, dtype=np.float64)
    chunk_context = call.chunk * call.chunk_start + call.chunk * (call.chunk + 1) / 2
    tokens = prompts.sum() + len(positions) + call.chunk
    if tokens == 0:
        return 0.0
    context = (prompts * (prompts + 1) / 2).sum() + (positions + 1).sum() + chunk_context
    other = float(cost.other_time(np.array([[tokens]]), shape, system, "dp", np.array([[context]]),
                                  np.array([[(positions + 1).sum()]]))[0])
    # free slots' rows (position 0: a running row is past its prompt): as token 0 they all route alike, one token's
    # experts between them; aliased they add nothing while a row runs, and with none running route as row 0, one token
    if free_rows not in ("token0", "alias"):
        raise ValueError(f"free_rows must be 'token0' or 'alias', got {free_rows!r}")
    free = (positions == 0).sum()
    routed = tokens - free + ((free > 0) if free_rows == "token0" else (free == len(positions) > 0))
    dense_mlp = 3.0 * shape.hidden * shape.dense_ffn  # a leading dense layer's MLP weights (DeepSeek's first)
    layers = (shape.n_layers * (other + system.layer_overhead)
              + (expert_seconds(routed) if expert_seconds is not None
                 else shape.n_moe_layers * expected_expert_seconds(routed, shape, system))
              + shape.dense_layers * max(dense_mlp * shape.dtype_bytes / system.hbm_bandwidth,
                                         2.0 * dense_mlp * tokens / system.matmul_flops))
    rows_out = len(prompts) + len(positions) + (1 if call.chunk else 0)
    vocab = max(shape.vocab_size * shape.hidden * shape.dtype_bytes / system.hbm_bandwidth,
                2.0 * rows_out * shape.vocab_size * shape.hidden / system.matmul_flops)
    host = shape.n_layers * eager_layer_s if eager_pack(call, packed_graph_tokens) else 0.0
    return max(layers + shape.n_layers * system.block_overhead + vocab, host)


def call_of(record: dict) -> Call:
    """The :class:`Call` that a record of the engine's serving loop describes (``engine.serve.serve``'s ``calls``, or
    a row of the serve command's OUT-calls.csv, as read: strings)."""
    def ints(text) -> tuple[int, ...]:
        return tuple(int(v) for v in str(text).split())
    return Call(prompts=ints(record["prompts"]), decode_positions=ints(record["positions"]),
                chunk=int(record["chunk"]), chunk_start=int(record["chunk_start"]))


def timed_call(record: dict) -> tuple[Call, float]:
    """A call record's :class:`Call` and its measured seconds."""
    return call_of(record), float(record["end_s"]) - float(record["start_s"])


def loop_seconds(records: list[dict]) -> list[float | None]:
    """For each call record, the serving loop's own host time before it: from the previous call's end to its start,
    less the loop's sleeps for arrivals (``slept_s``); None for the first call of a run (records of several runs
    may be mixed, told apart by their ``rate`` and ``policy`` fields where given)."""
    out, previous = [], None
    for r in records:
        run = (r.get("rate"), r.get("policy"))
        out.append(float(r["start_s"]) - previous[1] - float(r["slept_s"])
                   if previous is not None and previous[0] == run else None)
        previous = (run, float(r["end_s"]))
    return out


def call_class(call: Call, packed_graph_tokens: int = MAX_PACKED_TOKENS) -> str:
    """What kind of engine call this is, for tables: a prompt's prefill, a pack of several (graphed or eager, as
    :func:`call_seconds` has it), or a decode step of its bucket (with a prompt chunk)."""
    if call.prompts:
        if len(call.prompts) == 1:
            return "prefill, one prompt"
        return f"prefill, pack {'eager' if eager_pack(call, packed_graph_tokens) else 'graph'}"
    return f"step, bucket {call.bucket:>3}" + (f" + chunk {call.chunk}" if call.chunk else "")


def compare_calls(records: list[dict], seconds, packed_graph_tokens: int = MAX_PACKED_TOKENS) -> list[dict]:
    """The classes of a measured serving run's calls (``records``: the engine's call records, with ``start_s``,
    ``end_s`` and ``slept_s``) against ``seconds(call)``, the model's time for the same calls: per class the count
    of calls, median and summed seconds measured and modelled. A last row, ``between calls``, is the loop's own
    host time from one call's end to the next's start, less its sleeps for arrivals, which the model does not
    charge (modelled 0). Records of several runs may be mixed: gaps are taken within a run (the ``rate`` and
    ``policy`` fields, where given)."""
    by_class: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        call, measured = timed_call(r)
        by_class.setdefault(call_class(call, packed_graph_tokens), []).append((measured, seconds(call)))
    by_class["between calls"] = [(gap, 0.0) for gap in loop_seconds(records) if gap is not None] or [(0.0, 0.0)]
    rows = []
    for name, pairs in by_class.items():
        measured, modelled = np.array(pairs).T
        rows.append({"class": name, "calls": len(pairs), "measured_median_s": float(np.median(measured)),
                     "modelled_median_s": float(np.median(modelled)), "measured_s": float(measured.sum()),
                     "modelled_s": float(modelled.sum())})
    return sorted(rows[:-1], key=lambda row: row["class"]) + rows[-1:]


def measured_call_seconds(records: list[dict], fallback, packed_graph_tokens: int = MAX_PACKED_TOKENS):
    """A function ``call -> seconds`` that costs a call by the median measured time of the recorded calls
    (``records``, the engine's call records) of its class (:func:`call_class`) with as many rows running (a decode
    step's rows past position 0), else of its class, else by ``fallback(call)``: the serving loop replayed on
    measured call times, which separates what the loop predicts from what the cost model does."""
    def key(call: Call) -> tuple:
        return call_class(call, packed_graph_tokens), sum(p > 0 for p in call.decode_positions)

    times: dict[tuple, list[float]] = {}
    for r in records:
        call, seconds = timed_call(r)
        times.setdefault(key(call), []).append(seconds)
        times.setdefault((key(call)[0],), []).append(seconds)
    median = {k: float(np.median(v)) for k, v in times.items()}

    def seconds(call: Call) -> float:
        k = key(call)
        if k in median:
            return median[k]
        return median[k[:1]] if k[:1] in median else fallback(call)
    return seconds


SERVING_FREE = ("hbm_bandwidth", "block_overhead")


def fit_calls(records: list[dict], shape: ModelShape, system: SystemSpec, free=SERVING_FREE,
              eager_layer_s: float = 0.0, packed_graph_tokens: int = MAX_PACKED_TOKENS,
              per_class: int = 200, seed: int = 0, free_rows: str = "alias") -> SystemSpec:
    """``system`` with its ``free`` fields fitted to a measured run's calls (``records``, the engine's call records):
    least squares on each class's summed time (:func:`call_class`), measured against :func:`call_seconds`, as a
    relative error, over at most ``per_class`` calls a class drawn at random; the fields in log space, within 100x
    of their start (a zero start from 10 us). With the defaults, the rate whole-model calls stream weights at and the
    fixed cost of each layer of a call (the launches and tails of its small kernels, which no roofline holds)."""
    from scipy.optimize import least_squares

    rng = np.random.default_rng(seed)
    by_class: dict[str, list[tuple[Call, float]]] = {}
    for r in records:
        call, seconds = timed_call(r)
        by_class.setdefault(call_class(call, packed_graph_tokens), []).append((call, seconds))
    sample = [[pairs[i] for i in rng.permutation(len(pairs))[:per_class]] for pairs in by_class.values()]
    measured = np.array([sum(t for _, t in pairs) for pairs in sample])
    start = np.log([getattr(system, name) or 1e-5 for name in free])

    def fitted(log_values) -> SystemSpec:
        return system.replace(**{name: float(v) for name, v in zip(free, np.exp(log_values))})

    def residuals(log_values) -> np.ndarray:
        spec = fitted(log_values)
        modelled = np.array([sum(call_seconds(c, shape, spec, eager_layer_s, packed_graph_tokens, free_rows=free_rows)
                                 for c, _ in pairs) for pairs in sample])
        return modelled / measured - 1.0

    span = np.log(100.0)
    result = least_squares(residuals, start, bounds=(start - span, start + span))
    spec = fitted(result.x)
    spec.provenance = {**system.provenance, **{name: "fitted to a measured serving run's calls (fit_calls)"
                                               for name in free}}
    return spec


@dataclass
class Timed:
    """One request's times in a simulated run (seconds after serving starts), as ``engine.serve.Served``'s."""

    arrival_s: float
    first_token_s: float
    finish_s: float
    new_tokens: int


def serve_times(prompt_tokens, new_tokens, arrival_s, slots: int, seconds, continuous: bool = True, chunk: int = 0,
                max_prefill_tokens: int = 8192, chunk_sizes=None) -> list[Timed]:
    """The engine's serving loop (``engine.serve.serve``, the same admissions, slots and buckets) over requests of
    ``prompt_tokens [R]`` tokens asking for ``new_tokens [R]`` (no stop token: every answer runs to its length),
    arriving at ``arrival_s [R]``, on ``slots`` cache slots; each model call (a :class:`Call`) takes
    ``seconds(call)``. A prompt's piece runs as the smallest of ``chunk_sizes`` that holds it (default ``chunk``
    alone; ``engine.serve.chunk_sizes``). Returns each request's times in the requests' order."""
    prompt_tokens, new_tokens = [int(p) for p in prompt_tokens], [int(n) for n in new_tokens]
    arrival_s = [float(a) for a in arrival_s]
    if chunk < 0 or (chunk and not continuous):
        raise ValueError(f"chunk must be 0 (whole prompts) or > 0 with continuous batching, got {chunk} "
                         f"with continuous={continuous}")
    if min(new_tokens, default=1) < 1:
        raise ValueError(f"every request asks for at least one new token, got {min(new_tokens)}")
    sizes = list(chunk_sizes or [chunk])
    R = len(prompt_tokens)
    order = sorted(range(R), key=lambda i: (arrival_s[i], i))
    waiting = list(reversed(order))   # a stack: the next to arrive last
    free = list(range(slots))         # a heap: the lowest free slot first
    prefilling: list[list[int]] = []  # [request, slot, prompt tokens done]
    running: dict[int, int] = {}      # slot -> request
    made = [0] * R
    first = [0.0] * R
    done: dict[int, Timed] = {}
    position = [0] * slots            # the position a slot's next decode row writes (0: a free slot's dummy row)
    now = 0.0

    def take(slot: int) -> None:
        i = running[slot]
        made[i] += 1
        if made[i] == new_tokens[i]:
            done[i] = Timed(arrival_s[i], first[i], now, made[i])
            del running[slot]
            heapq.heappush(free, slot)
            position[slot] = 0

    def begin(into: list[int], newcomers: list[int]) -> None:
        for slot, i in zip(into, newcomers):
            running[slot], first[i], position[slot] = i, now, prompt_tokens[i]
            take(slot)

    def admit() -> tuple[list[int], list[int]]:
        newcomers: list[int] = []
        budget = max_prefill_tokens
        while waiting and len(newcomers) < len(free) and arrival_s[waiting[-1]] <= now:
            n = prompt_tokens[waiting[-1]]
            if newcomers and n > budget and not chunk:
                break
            newcomers.append(waiting.pop())
            budget -= n
        into = [heapq.heappop(free) for _ in newcomers]
        if chunk:
            prefilling.extend([i, slot, 0] for i, slot in zip(newcomers, into))
            return [], []
        return newcomers, into

    while True:
        newcomers, into = admit() if continuous or not running else ([], [])
        if newcomers:
            now += seconds(Call(prompts=tuple(prompt_tokens[i] for i in newcomers)))
            begin(into, newcomers)
        if running or prefilling:
            bucket = bucket_for(max(running, default=0) + 1)
            size = chunk if prefilling else 0
            if size:
                i, slot, start = prefilling[0]
                piece = min(chunk, prompt_tokens[i] - start)
                size = min(s for s in sizes if s >= piece)
                position[slot] = start + piece  # the slot's decode row (if in the bucket) parks there
            now += seconds(Call(decode_positions=tuple(position[:bucket]), chunk=size,
                                chunk_start=start if size else 0))
            for row in range(bucket):
                position[row] += row in running
            for row in list(running):
                take(row)
            if size:
                prefilling[0][2] += piece
                if prefilling[0][2] == prompt_tokens[i]:
                    prefilling.pop(0)
                    begin([slot], [i])
        elif waiting:
            now = max(now, arrival_s[waiting[-1]])
        else:
            break
    return [done[i] for i in range(R)]


def main(argv=None) -> int:
    from ..engine.serve import (POLICIES, add_workload_arguments, check_workload_arguments, chunk_sizes,
                                mmlu_questions, mmlu_requests, summarize, write_runs)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b", choices=names(), help="the model whose calls are costed")
    ap.add_argument("--system", default="h200_8gpu", help="system profile (name or YAML); one of its GPUs serves")
    add_workload_arguments(ap)  # the engine command's: the same requests
    ap.add_argument("--eager-layer-s", type=float, default=1e-3,
                    help="host seconds to issue a layer of an eager prefill of several prompts (0.9-1.2 ms on the "
                    "H200 machine, benchmarks/engine/host_probe.py; docs/engine.md); 0: the GPU's time alone")
    ap.add_argument("--packed-graph-tokens", type=int, default=MAX_PACKED_TOKENS,
                    help="several prompts' prefill replays a graph up to this many tokens, as the engine's (0: eager)")
    ap.add_argument("--out", default=None, help="CSV of every request's times, the engine command's columns")
    ap.add_argument("--routing-trace", default=None, help="a RoutingTrace (parquet) of the shape's model: each call's "
                    "tokens pick experts as tokens drawn from it did, not uniformly (trace_expert_seconds); not with "
                    "--calls, whose runs are the engine's random-weight ones")
    ap.add_argument("--active-experts", nargs="+", default=None, metavar="TOKENS=EXPERTS",
                    help="distinct experts a MoE layer that many tokens pick, as measured (e.g. 8=24.7 16=32.7 32=40.1, "
                    "benchmarks/engine/routing_context_probe.py): calls of up to the last count route so "
                    "(active_expert_seconds), larger ones uniformly; with --calls too")
    ap.add_argument("--free-rows", choices=["token0", "alias"], default=None,
                    help="the engine's free decode rows pick token 0's experts, or none (its serve --free-rows; "
                    "default alias); with --calls, default: the mode that run was made with (run_free_rows)")
    ap.add_argument("--call-times", default=None, help="cost each call by the median measured time of the calls of "
                    "its kind in this RUN-calls.csv (measured_call_seconds; the cost model where it has none): the "
                    "loop on measured call times")
    ap.add_argument("--call-times-rates", type=float, nargs="+", default=None,
                    help="with --call-times: only these rates' calls (so that other rates are out of sample)")
    ap.add_argument("--calls", default=None, help="instead of simulating: the calls of a measured run "
                    "(`python -m moegps.engine.serve --out RUN.csv` writes RUN-calls.csv) against the model's times "
                    "for the same calls, by class (--shape and --system as the run's)")
    ap.add_argument("--fit-rates", type=float, nargs="+", default=None,
                    help="with --calls: fit the profile's weight rate and per-layer fixed cost (fit_calls) to these rates' "
                    "calls, and compare on the other rates' (held out)")
    ap.add_argument("--fitted-system", default=None, help="with --fit-rates: write the fitted profile (YAML) here, "
                    "for --system")
    args = ap.parse_args(argv)
    check_workload_arguments(ap, args)
    if args.eager_layer_s < 0:
        ap.error(f"--eager-layer-s must be >= 0, got {args.eager_layer_s}")
    try:
        shape = from_name(args.shape)
        system = replace(load_system(args.system), n_gpus=1, gpus_per_node=1)
        if args.calls and args.routing_trace:
            raise ValueError("--routing-trace costs a trained model's routing; --calls compares runs of the engine's "
                             "random-weight models: give one of them")
        if args.active_experts and (args.routing_trace or args.fit_rates):
            raise ValueError("--active-experts sets the routing, as --routing-trace does, and the fit of --fit-rates "
                             "assumes uniform routing: give --active-experts without them")
        if args.free_rows is None:
            args.free_rows = run_free_rows(Path(args.calls)) if args.calls else "alias"
            if args.calls:
                print(f"{args.calls}: free rows costed as the run made them, --free-rows {args.free_rows}")
        experts = (trace_expert_seconds(RoutingTrace.read(args.routing_trace), shape, system) if args.routing_trace
                   else active_expert_seconds(parse_active_experts(args.active_experts), shape, system)
                   if args.active_experts else None)
        seconds = lambda call: call_seconds(call, shape, system, args.eager_layer_s, args.packed_graph_tokens,  # noqa: E731
                                            experts, args.free_rows)
        if args.call_times:
            records = [r for r in read_call_records(Path(args.call_times))
                       if not args.call_times_rates or float(r["rate"]) in args.call_times_rates]
            if not records:
                raise ValueError(f"--call-times {args.call_times}: no calls at rates {args.call_times_rates}")
            seconds = measured_call_seconds(records, seconds, args.packed_graph_tokens)
        if args.calls:
            compare_or_fit(args, shape, system, experts)
            return 0
        questions = mmlu_questions(args.mmlu)
        workloads = {rate: mmlu_requests(args.requests, rate, args.max_new_tokens, args.seed, questions=questions)
                     for rate in args.rate}
    except (ValueError, FileNotFoundError, KeyError) as e:
        ap.error(str(e))
    slots = bucket_for(args.max_batch)  # the engine rounds its slots up to a decode bucket
    shortest = min(len(r.prompt) for r in workloads[args.rate[0]])
    ceiling = slots / seconds(Call(decode_positions=(shortest,) * slots))
    routing = (f"routing drawn from {args.routing_trace}" if args.routing_trace
               else f"distinct experts as measured: {' '.join(args.active_experts)} tokens=experts"
               if args.active_experts else "uniform routing")
    if args.call_times:
        routing = f"calls timed as measured in {args.call_times}"
    print(f"{shape.name} on one GPU of {system.name} (cost model, {routing}): {args.requests} MMLU requests, "
          f"{slots} slots; decode ceiling {ceiling:.1f} new tokens/s; simulated clock, ms")
    print(f"{'rate/s':>7} {'policy':<11} {'tokens/s':>9} {'ceiling':>8} {'span s':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
          f"{'TPOT p50':>9} {'latency p50':>12} {'latency p90':>12}")
    rows = []
    for rate, requests in workloads.items():
        for policy in (p for p in POLICIES if p in args.policy):
            timed = serve_times([len(r.prompt) for r in requests], [r.max_new_tokens for r in requests],
                                [r.arrival_s for r in requests], slots, seconds, continuous=policy != "static",
                                chunk=args.chunk if policy == "chunked" else 0,
                                chunk_sizes=chunk_sizes(args.chunk, args.chunk_graphs))
            rows += [{"rate": rate, "policy": policy, "decode_ceiling": ceiling, "request": i,
                      "prompt_tokens": len(r.prompt), "new_tokens": t.new_tokens, "arrival_s": t.arrival_s,
                      "first_token_s": t.first_token_s, "finish_s": t.finish_s}
                     for i, (r, t) in enumerate(zip(requests, timed))]
            s = summarize(_as_served(timed))
            print(f"{rate:>7g} {policy:<11} {s['tokens_per_s']:>9.1f} {s['tokens_per_s'] / ceiling:>8.0%} "
                  f"{s['span_s']:>8.2f} {s['ttft_p50_ms']:>9.1f} {s['ttft_p90_ms']:>9.1f} {s['tpot_p50_ms']:>9.2f} "
                  f"{s['latency_p50_ms']:>12.1f} {s['latency_p90_ms']:>12.1f}", flush=True)
    if args.out:
        write_runs(Path(args.out), rows, {**{k: v for k, v in vars(args).items() if k not in ("rate", "policy", "out")},
                                          "simulated": True})
        print(f"wrote {args.out}")
    return 0


CALL_FIELDS = ("prompts", "positions", "chunk", "chunk_start", "start_s", "end_s", "slept_s")


def read_call_records(path: Path) -> list[dict]:
    """The rows of a serve command's OUT-calls.csv (or .csv.gz); an error naming the file and the columns it lacks."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in CALL_FIELDS if rows and k not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected the calls CSV of `python -m moegps.engine.serve --out RUN.csv` "
                         f"(RUN-calls.csv) with columns {', '.join(CALL_FIELDS)}; "
                         f"{'no rows' if not rows else f'missing {missing}'}")
    return rows


def run_free_rows(calls_path: Path) -> str:
    """How the serve run whose calls are ``calls_path`` (``RUN-calls.csv``, or gzipped) ran its free decode rows: the
    ``free_rows`` of its ``RUN.csv.json``; a run whose record has none predates the choice (session aa) and ran them
    as token 0. An error naming the file where the record is missing: the mode changes every decode step's cost."""
    from ..engine.serve import runs_of_calls, settings_path

    out = runs_of_calls(calls_path)
    record = settings_path(out) if out else None
    if record is None or not record.exists():
        where = f"the run's record {record.name} is not beside it" if record else "not named RUN-calls.csv"
        raise ValueError(f"{calls_path}: {where}, so how its free rows ran is unknown; give --free-rows token0 or "
                         "alias")
    return json.loads(record.read_text()).get("free_rows", "token0")


def parse_active_experts(items: list[str]) -> dict[int, float]:
    """``["8=24.7", "16=32.7"]`` -> {8: 24.7, 16: 32.7}; an error naming the item and the form expected."""
    points = {}
    for item in items:
        try:
            n, active = item.split("=")
            points[int(n)] = float(active)
        except ValueError:
            raise ValueError(f"--active-experts {item!r}: expected TOKENS=EXPERTS, e.g. 32=40.1") from None
    return points


def compare_or_fit(args, shape: ModelShape, system: SystemSpec, expert_seconds=None) -> None:
    """The ``--calls`` command: the run's calls against the profile, or with ``--fit-rates`` the profile fitted
    to some rates' calls and both profiles against the other rates' (and the fitted one written).
    ``expert_seconds``: the routing (call_seconds'), uniform when None, as it must be with a fit (the fit's is)."""
    records = read_call_records(Path(args.calls))
    where = f"{shape.name} on one GPU of {system.name}"

    def costed(spec: SystemSpec):
        return lambda c: call_seconds(c, shape, spec, args.eager_layer_s, args.packed_graph_tokens, expert_seconds,
                                      args.free_rows)

    if not args.fit_rates:
        print_call_comparison(records, costed(system), args.packed_graph_tokens, f"{args.calls} against {where}")
        return
    fit_on = [r for r in records if float(r["rate"]) in args.fit_rates]
    held = [r for r in records if float(r["rate"]) not in args.fit_rates]
    if not fit_on or not held:
        raise ValueError(f"{args.calls}: --fit-rates {args.fit_rates} leaves no calls to fit on or none held out "
                         f"(rates in the file: {sorted({float(r['rate']) for r in records})})")
    fitted = fit_calls(fit_on, shape, system, eager_layer_s=args.eager_layer_s,
                       packed_graph_tokens=args.packed_graph_tokens, free_rows=args.free_rows)
    print(f"fitted to the calls at {args.fit_rates} requests/s: " + ", ".join(
        f"{name} {getattr(system, name):.4g} -> {getattr(fitted, name):.4g}" for name in SERVING_FREE) + " (SI units)")
    for label, spec in (("the profile as it was", system), ("fitted", fitted)):
        print_call_comparison(held, costed(spec), args.packed_graph_tokens, f"held-out calls against {label}")
    if args.fitted_system:
        import yaml

        from .system import system_to_dict

        fitted.name = Path(args.fitted_system).stem
        fitted.notes = f"{system.name} with {', '.join(SERVING_FREE)} fitted to {args.calls} at {args.fit_rates}/s"
        Path(args.fitted_system).write_text(yaml.safe_dump(system_to_dict(fitted), sort_keys=False))
        print(f"wrote {args.fitted_system}")


def print_call_comparison(records: list[dict], seconds, packed_graph_tokens: int, title: str) -> None:
    rows = compare_calls(records, seconds, packed_graph_tokens)
    total = sum(r["measured_s"] for r in rows)
    print(f"{title}: {len(records)} calls, {total:.2f} s measured (calls and the loop between them)")
    print(f"{'class':<28} {'calls':>6} {'measured p50 ms':>16} {'modelled p50 ms':>16} {'measured s':>11} "
          f"{'modelled s':>11} {'measured / modelled':>20} {'share':>6}")
    for r in rows:
        ratio = f"{r['measured_s'] / r['modelled_s']:.2f}x" if r["modelled_s"] else "-"
        print(f"{r['class']:<28} {r['calls']:>6} {1e3 * r['measured_median_s']:>16.2f} "
              f"{1e3 * r['modelled_median_s']:>16.2f} {r['measured_s']:>11.3f} {r['modelled_s']:>11.3f} {ratio:>20} "
              f"{r['measured_s'] / total:>6.1%}")


def _as_served(timed: list[Timed]):
    from ..engine.serve import Served

    return [Served([0] * t.new_tokens, t.arrival_s, t.first_token_s, t.finish_s) for t in timed]


if __name__ == "__main__":
    raise SystemExit(main())
