"""Generation on the engine: batches of prompts of any lengths, greedy or sampled, stop tokens,
one CUDA graph per batch-size bucket for the decode step.

    python -m moegps.engine.generate --prompt "The capital of France is"            # bundled model, CPU or GPU
    python -m moegps.engine.generate --model mixtral-8x7b --prompt "..."            # shape-only, random bf16 (GPU)
    python -m moegps.engine.generate --model path/to/checkpoint --prompt a --prompt b --temperature 0.8

A shape name builds random weights on the device (its text is noise, its speed is real); the
bundled models (``mixtral-tiny``, ``mixtral-tiny-64e``) and checkpoint folders load real weights.

A batch of n prompts runs in the smallest bucket of ``BUCKETS`` that holds it: the decode step is
captured once per bucket (inputs, KV cache and outputs at fixed addresses) and replayed for every
token, so a step costs one graph launch instead of some three hundred kernel launches from Python.
Rows past n are padding: they decode a dummy token in cache slots no prompt uses. Prefill is a graph
too (PrefillGraphs): one per 128-token length class for one prompt of up to 8192 tokens, one per
128-token multiple for several prompts packed, up to 2048 tokens in all.

``--deterministic`` (``moegps.kernels.deterministic_algorithms()``) makes a run's logits the same bits every time:
the MoE kernels then never add with atomics, whose order varies from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..kernels import deterministic_algorithms
from ..models.tokenizer import mixtral_tokenizer
from ..paths import BUNDLED_MODELS
from ..shapes import SHAPES, from_name
from .model import (KVCache, Model, check_fits, decode_step, decode_step_with_chunk, gathered_slots, load_checkpoint,
                    prefill, prefill_block_diagonal, prefill_packed, random_model)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_ROUND_TO = 128     # a prefill graph's token counts are multiples of this (PrefillGraphs)
MAX_PACKED_TOKENS = 2048   # several prompts' prefill replays a graph up to this many tokens in all (PrefillGraphs)
STOP_CHECK_EVERY = 16  # decode steps between the host's looks at the stop tokens (each look syncs)


@dataclass
class Sampling:
    """``temperature`` 0 is greedy; otherwise sample from softmax(logits / temperature), restricted
    to the ``top_k`` most likely tokens when ``top_k`` > 0, then to the nucleus: the fewest most likely
    tokens whose probability adds up to ``top_p`` (Holtzman et al., 2020), when ``top_p`` < 1. A draw is a
    function of ``seed`` and the tokens generated so far (``counter_uniforms``): the same prompt, seed and
    settings give the same answer in any batch (``Engine.generate`` gives its row b the seed ``seed + b``)."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling field 'temperature' must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling field 'top_k' must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling field 'top_p' must be in (0, 1], got {self.top_p}")


def sampling_logits(logits: torch.Tensor, sampling: Sampling | list[Sampling]) -> torch.Tensor:
    """``logits [B, V]`` / temperature, with the tokens outside the top-k and outside the top-p nucleus
    (taken on the distribution left by top-k) set to -inf: what ``Sampling`` draws from (temperature > 0).
    ``sampling``: one for every row, or a list of one per row."""
    rows = sampling if isinstance(sampling, list) else [sampling] * logits.shape[0]
    device, V = logits.device, logits.shape[-1]
    temperature = torch.tensor([r.temperature or 1.0 for r in rows], dtype=logits.dtype, device=device)
    top_k = torch.tensor([min(r.top_k, V) or V for r in rows], device=device)
    top_p = torch.tensor([r.top_p for r in rows], dtype=logits.dtype, device=device)
    scaled = logits / temperature[:, None]
    if (top_k < V).any():
        kth = scaled.sort(-1, descending=True).values.gather(-1, top_k[:, None] - 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if (top_p < 1).any():
        probs, order = scaled.softmax(-1).sort(-1, descending=True)
        # the mass before each token, summed in 2^-52 fixed point: integer sums are exact in any order, so
        # the nucleus is the same from run to run (a float cumsum on the GPU is not; torch's deterministic
        # mode refuses it) and closer to exact than an fp32 cumsum
        fixed = (probs.double() * 2.0 ** 52).round().long()
        outside = fixed.cumsum(-1) - fixed >= (top_p.double() * 2.0 ** 52)[:, None]  # mass before reaches top_p
        scaled = scaled.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return scaled


def _int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)  # a logical shift of int64's bits (>> copies the sign bit)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` float64 uniforms in (0, 1), a pure function of (``seeds[b]``, ``counters[b]``, column): the
    SplitMix64 finaliser (Steele et al., OOPSLA 2014) of a combination of the three, in int64 arithmetic
    that wraps. So a request's draw depends on its seed and how many tokens it has generated, never on the
    rows beside it in the batch (vLLM gives seeded requests the same guarantee with a generator each)."""
    x = (seeds.long()[:, None] * _int64(0x9E3779B97F4A7C15) + counters.long()[:, None] * _int64(0xD1B54A32D192ED03)
         + torch.arange(n, device=seeds.device)[None, :] * _int64(0x8CB92BA72F3D8DD7))
    x = (x ^ _shift_right(x, 30)) * _int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _int64(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 11).double() + 0.5) * 2.0 ** -53


def choose_tokens(logits: torch.Tensor, sampling: Sampling | list[Sampling], counters) -> torch.Tensor:
    """The next token of each row of ``logits [B, V]``: ``[B]`` long. Greedy rows (temperature 0) take the
    argmax; the others draw from ``sampling_logits`` by the Gumbel-max trick, their noise keyed by the row's
    seed and ``counters[b]`` (the tokens the row has generated so far: an int for every row, or ``[B]``)."""
    rows = sampling if isinstance(sampling, list) else [sampling] * logits.shape[0]
    greedy = logits.argmax(-1)
    if all(r.temperature == 0 for r in rows):
        return greedy
    device = logits.device
    seeds = torch.tensor([r.seed for r in rows], device=device)
    counters = torch.as_tensor(counters, device=device).expand(len(rows))
    gumbel = -torch.log(-torch.log(counter_uniforms(seeds, counters, logits.shape[-1])))
    drawn = (sampling_logits(logits, rows).double() + gumbel).argmax(-1)
    return torch.where(torch.tensor([r.temperature == 0 for r in rows], device=device), greedy, drawn)


@dataclass
class Generation:
    tokens: list[list[int]]      # new tokens of each prompt, up to and including its first stop token
    prefill_ms: float            # time to first token: prefill of the whole batch and the first choice
    decode_ms_per_step: float    # device time per decode step (every row advances one token)
    steps: int                   # decode steps run


def bucket_for(n: int) -> int:
    for size in BUCKETS:
        if size >= n:
            return size
    raise ValueError(f"batch of {n} prompts exceeds the largest bucket {BUCKETS[-1]}")


def _timer(device):
    """``(mark, elapsed_ms)``: CUDA events on a GPU, the host clock (after a sync) elsewhere."""
    if device.type == "cuda":
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def elapsed(a, b):
            b.synchronize()
            return a.elapsed_time(b)
    else:
        def mark():
            return time.perf_counter()

        def elapsed(a, b):
            return (b - a) * 1e3
    return mark, elapsed


def capture(fn, pool=None) -> tuple:
    """``(graph, output)``: ``fn()`` captured as a CUDA graph on a side stream, after one eager warm-up run
    there (it compiles the kernels and fills the allocator outside the capture; a decode step's warm-up
    writes the same K/V the real step will). ``pool``: a memory pool shared with other graphs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, pool=pool):
            output = fn()
    torch.cuda.current_stream().wait_stream(side)
    return graph, output


class PrefillGraphs:
    """Prefill as CUDA graphs. Eager, the host issues a layer's ~15 launches in about 1 ms (Triton's Python
    launch path first; benchmarks/engine/host_probe.py), longer than the GPU runs a layer of a short prompt,
    so the GPU waited; a replay is one launch. Two kinds of graph:

    - one prompt, padded with token 0 to its length rounded up to ``round_to`` (at most the cache's length):
      a graph per length class, causal attention over the padded prompt (``prefill_packed``); the padding
      rows are computed and discarded, causal attention keeps them out of the prompt's rows, and the K/V
      they leave past the prompt are overwritten by decode before they are read;
    - several prompts packed one after another and padded to a multiple of ``round_to`` tokens: a graph per
      padded count T, whatever the prompts' number and lengths (``prefill_block_diagonal``: attention under
      a block-diagonal mask; padding writes no K/V), up to ``max_packed_tokens``, past which a pack stays
      eager (its GPU time hides the host's, and its attention's T^2 pairs would grow against the prompts').

    A new shape pays a warm-up prefill and the capture; at most ``max_graphs`` are kept (the oldest dropped),
    all in one memory pool (they never run at once). Without a GPU the same padded prefills run eagerly (how
    the tests check the padding). A graph reads ``model.routing_counts`` as it was at capture (set it before,
    as for decode graphs), and counts its padding's routing too."""

    def __init__(self, model: Model, cache: KVCache, round_to: int = PREFILL_ROUND_TO, max_graphs: int = 4,
                 max_tokens: int = 8192, max_packed_tokens: int = MAX_PACKED_TOKENS):
        self.model, self.cache, self.round_to, self.max_graphs = model, cache, round_to, max_graphs
        self.max_tokens, self.max_packed_tokens = max_tokens, max_packed_tokens
        self._graphs: dict[tuple, tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None

    def padded_length(self, n: int) -> int:
        return min(self.packed_length(n), self.cache.max_len)

    def packed_length(self, n: int) -> int:
        return -(-n // self.round_to) * self.round_to

    def pays(self, lengths: list[int]) -> bool:
        """Whether to graph the prefill of prompts of these lengths: one prompt of at most ``max_tokens`` padded
        tokens (a longer prefill keeps the GPU busier than the host, measured equal eager and graphed at 2048 and
        8192 tokens, and a capture holds a second set of its activations), or several of at most
        ``max_packed_tokens`` packed."""
        if len(lengths) == 1:
            return self.padded_length(lengths[0]) <= self.max_tokens
        return self.packed_length(sum(lengths)) <= self.max_packed_tokens

    def key(self, lengths: list[int], slots: list[int] | None = None) -> tuple:
        """The graph these prompts replay: ``("prompt", length class, gathered)`` or ``("pack", T)``."""
        if len(lengths) == 1:
            return "prompt", self.padded_length(lengths[0]), gathered_slots(slots, 1)
        return "pack", self.packed_length(sum(lengths))

    def _capture(self, key: tuple) -> tuple:
        device = self.model.device
        self.model.ensure_rope(self.cache.max_len)
        if key[0] == "prompt":
            _, length, gathered = key
            tokens = torch.zeros(length, dtype=torch.long, device=device)
            rows = torch.zeros(length, dtype=torch.long, device=device)
            positions = torch.arange(length, device=device)
            last = torch.zeros(1, dtype=torch.long, device=device)
            slots = torch.zeros(1, dtype=torch.long, device=device) if gathered else None
            inputs = (tokens, rows, positions, slots, last)

            def run():
                return prefill_packed(self.model, self.cache, tokens, rows, positions, last, [length],
                                      prompt_slots=slots)
        else:
            T = key[1]
            tokens, rows, positions, slots = (torch.zeros(T, dtype=torch.long, device=device) for _ in range(4))
            last = torch.zeros(self.cache.slots, dtype=torch.long, device=device)  # up to one prompt a slot
            inputs = (tokens, rows, positions, slots, last)

            def run():
                return prefill_block_diagonal(self.model, self.cache, *inputs)
        if self._pool is None:
            return run, inputs, None
        graph, logits = capture(run, self._pool)
        # every input the graph reads is kept with it: a freed one's memory would be handed to the next
        # allocation while the graph still reads it (rows and positions once were not: the replay
        # after a later allocation wrote the KV cache out of bounds)
        return graph, inputs, logits

    def __call__(self, prompts: list[torch.Tensor], slots: list[int] | None = None) -> torch.Tensor:
        """``prompts``: token ids, prompt b in cache slot ``slots[b]`` (default b) -> each one's last position's
        logits ``[B, V]`` float32. A lone prompt in another slot than 0 runs a graph of its own, whose attention
        gathers its slot's K/V (the serving loop's newcomers)."""
        lengths = [len(p) for p in prompts]
        check_fits(self.cache, lengths, slots)
        slots = list(range(len(prompts))) if slots is None else list(slots)
        key = self.key(lengths, slots)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = self._capture(key)
        graph, (tokens, rows, positions, slot_of, last), logits = self._graphs[key]
        tokens.zero_()
        tokens[:sum(lengths)].copy_(torch.cat(prompts))
        if key[0] == "prompt":
            last.fill_(lengths[0] - 1)
            if slot_of is not None:
                slot_of.fill_(slots[0])
        else:  # each token's prompt, position and slot; padding: row and slot -1, position 0
            pad = len(tokens) - sum(lengths)
            rows.copy_(torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)] + [-1] * pad))
            positions.copy_(torch.tensor([t for n in lengths for t in range(n)] + [0] * pad))
            slot_of.copy_(torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)] + [-1] * pad))
            last.zero_()
            last[:len(lengths)] = torch.tensor(lengths).cumsum(0) - 1
        if logits is None:  # no GPU: `graph` is the eager prefill
            return graph()[:len(prompts)]
        graph.replay()
        return logits[:len(prompts)].clone()  # the pool is shared: the next graph's replay may reuse this buffer


class Engine:
    """A model, its KV cache and its captured decode graphs. ``max_batch`` prompts of up to
    ``max_len`` tokens in all (prompt + new tokens)."""

    def __init__(self, model: Model, max_batch: int = 8, max_len: int = 2048, cuda_graph: bool = True,
                 alias_free_rows: bool = True):
        self.model = model
        self.max_len = max_len
        self.cache = KVCache(model.shape, bucket_for(max_batch), max_len, model.dtype, model.device)
        model.ensure_rope(max_len)
        # experts on several ranks (moegps.engine.parallel): every rank runs every step (no early stop),
        # eagerly (the dispatch reads message sizes on the host, which a captured graph cannot)
        self.lockstep = any(layer.experts is not None for layer in model.layers)
        self.cuda_graph = cuda_graph and model.device.type == "cuda" and not self.lockstep
        slots = self.cache.slots
        self.tokens = torch.zeros(slots, dtype=torch.long, device=model.device)     # this step's input
        self.positions = torch.zeros(slots, dtype=torch.long, device=model.device)  # = each row's length so far
        # alias_free_rows: a bucket's rows that hold no sequence (a batch's padding, serving's free slots) compute
        # the experts of the row route_as names instead of their own, so that they read no expert weights the
        # running rows do not (one index_select a MoE layer of buckets over 1 and of steps with a chunk, whose
        # padding rows route as its prompt rows: model.decode_step_with_chunk); route_as is the identity
        # elsewhere, written by generate and by the serving loop. On by default: serving on an H100 (64 experts,
        # benchmarks/engine/serve-free-rows-h100-2026-12-05-aa/) ran a 2-row step with one answer running in 2.79 ms
        # against 3.79 with the free row routing as token 0, time per output token 8-10% shorter at 10 requests/s
        self.alias_free_rows = alias_free_rows
        self.route_as = torch.arange(slots, device=model.device)
        self._graphs: dict[tuple[int, int], tuple] = {}  # (bucket, chunk tokens) -> captured step
        self._chunk_inputs: dict[int, tuple] = {}
        self.prefill_graphs = PrefillGraphs(model, self.cache) if self.cuda_graph else None

    # ---- one decode step, eager or replayed -----------------------------------------------------------

    def chunk_inputs(self, size: int) -> tuple:
        """The inputs of a decode step with a prompt chunk of ``size`` tokens beside it, at fixed addresses
        (the graphs of that size read them): chunk tokens ``[size]``, its cache slot, first position and last
        prompt row, ``[1]`` each (model.decode_step_with_chunk)."""
        if size not in self._chunk_inputs:
            device = self.model.device
            self._chunk_inputs[size] = (torch.zeros(size, dtype=torch.long, device=device),
                                        *(torch.zeros(1, dtype=torch.long, device=device) for _ in range(3)))
        return self._chunk_inputs[size]

    def load_chunk(self, size: int, piece, slot: int, start: int) -> None:
        """Write a prompt's ``piece`` (up to ``size`` token ids, padded with token 0) into the inputs of the steps with
        a chunk of ``size`` beside them (``chunk_inputs``), as the piece of ``slot``'s prompt from position ``start``."""
        tokens, chunk_slot, chunk_start, chunk_last = self.chunk_inputs(size)
        tokens.zero_()
        tokens[:len(piece)] = torch.as_tensor(piece)
        chunk_slot.fill_(slot), chunk_start.fill_(start), chunk_last.fill_(len(piece) - 1)

    def _step_fn(self, bucket: int, chunk: int = 0):
        tokens, positions = self.tokens[:bucket], self.positions[:bucket]
        inputs = self.chunk_inputs(chunk) if chunk else None

        route_as = self.route_as[:bucket] if self.alias_free_rows and (bucket > 1 or chunk) else None

        def step():
            if chunk:
                return decode_step_with_chunk(self.model, self.cache, tokens, positions, *inputs, route_as=route_as)
            return decode_step(self.model, self.cache, tokens, positions, route_as=route_as)
        return step

    def _graphed(self, bucket: int, chunk: int = 0):
        """The step as a graph replay returning its logits buffer; captured on first use."""
        if (bucket, chunk) not in self._graphs:
            self._graphs[bucket, chunk] = capture(self._step_fn(bucket, chunk))
        graph, logits = self._graphs[bucket, chunk]

        def replay():
            graph.replay()
            return logits
        return replay

    def step(self, bucket: int, chunk: int = 0):
        """The decode step of slots 0..bucket-1, with a prompt chunk of ``chunk`` tokens beside it when
        nonzero (its inputs in ``chunk_inputs(chunk)``): a function returning the logits."""
        return self._graphed(bucket, chunk) if self.cuda_graph else self._step_fn(bucket, chunk)

    # ---- generation ----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, sampling: Sampling | None = None,
                 stop_tokens=(), on_token=None) -> Generation:
        """New tokens for each prompt (token id lists). ``max_new_tokens`` counts the first token (the
        prefill's). ``on_token(step, tokens [n])`` is called after every token when given (a host sync
        per token; the timing then counts device time only, outside the callback)."""
        sampling = sampling or Sampling()
        n = len(prompts)
        if not n or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each of at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_len:
            raise ValueError(f"prompt + {max_new_tokens} new tokens = {longest} positions exceed the engine's "
                             f"max_len {self.max_len}")
        bucket = bucket_for(n)
        if bucket > self.cache.slots:
            raise ValueError(f"{n} prompts exceed the engine's max_batch ({self.cache.slots} slots)")
        device = self.model.device
        mark, elapsed = _timer(device)
        rows = [replace(sampling, seed=sampling.seed + b) for b in range(bucket)]  # row b's draws: seed + b
        history = torch.empty(bucket, max_new_tokens, dtype=torch.long, device=device)
        stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)

        with torch.inference_mode():
            t0 = mark()
            inputs = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
            graphed = self.prefill_graphs is not None and self.prefill_graphs.pays([len(p) for p in prompts])
            logits = self.prefill_graphs(inputs) if graphed else prefill(self.model, self.cache, inputs)
            first = choose_tokens(logits, rows[:n], 0)
            t1 = mark()
            prefill_ms = elapsed(t0, t1)
            self.tokens.zero_()
            self.positions.zero_()
            self.tokens[:n] = first
            self.positions[:n] = torch.tensor([len(p) for p in prompts], device=device)
            if self.alias_free_rows:  # the padding rows route as row 0
                index = torch.arange(self.cache.slots)
                self.route_as.copy_(index.where(index < n, 0))
            history[:, 0] = self.tokens[:bucket]
            if on_token:
                on_token(0, history[:n, 0].tolist())
            step = self.step(bucket)
            decode_ms, steps = 0.0, 0
            start = mark()
            for i in range(1, max_new_tokens):
                a = mark() if on_token else None
                nxt = choose_tokens(step(), rows, i)
                self.tokens[:bucket] = nxt
                self.positions[:bucket] += 1
                history[:, i] = nxt
                steps += 1
                if on_token:
                    decode_ms += elapsed(a, mark())
                    on_token(i, history[:n, i].tolist())
                if stop.numel() and not self.lockstep and (i % STOP_CHECK_EVERY == 0 or on_token) and \
                        bool(torch.isin(history[:n, :i + 1], stop).any(1).all()):
                    break
            if not on_token:
                decode_ms = elapsed(start, mark())
        rows = history[:n, :steps + 1].tolist()
        stops = set(stop.tolist())
        cut = [next((row[:j + 1] for j, t in enumerate(row) if t in stops), row) for row in rows]
        return Generation(tokens=cut, prefill_ms=prefill_ms, decode_ms_per_step=decode_ms / max(steps, 1),
                          steps=steps)


# ---- building an engine's model by name -------------------------------------------------------------

def build_model(name: str = "mixtral-tiny", device: str | None = None, dtype: str = "auto") -> Model:
    """A bundled model's name, a checkpoint folder, or a shape name (random weights, built on the device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or torch_dtype not in (torch.bfloat16, torch.float16,
                                                                          torch.float32):
            raise ValueError(f"dtype must be one of auto, bfloat16, float16, float32; got {dtype!r}")
    if (BUNDLED_MODELS / name / "config.json").exists():
        return load_checkpoint(BUNDLED_MODELS / name, device, torch_dtype)
    if Path(name).is_dir():
        return load_checkpoint(name, device, torch_dtype)
    if name in SHAPES:
        return random_model(from_name(name), device, torch_dtype)
    bundled = sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / "config.json").exists())
    raise ValueError(f"--model {name!r}: not a bundled model {bundled}, a checkpoint folder, or a shape "
                     f"name {sorted(SHAPES)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mixtral-tiny", help="bundled model, checkpoint folder, or shape name")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: one example")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the most likely tokens up to this mass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--deterministic", action="store_true",
                    help="the same logits, bit for bit, on every run (MoE kernels without atomics)")
    args = ap.parse_args(argv)
    with deterministic_algorithms() if args.deterministic else contextlib.nullcontext():
        return _run(ap, args)


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    try:  # a bad model name, dtype or sampling field is a usage error, not a traceback
        sampling = Sampling(args.temperature, args.top_k, args.seed, args.top_p)
        model = build_model(args.model, args.device, args.dtype)
    except (ValueError, FileNotFoundError, KeyError) as e:
        ap.error(str(e))
    tok = mixtral_tokenizer()
    if model.shape.vocab_size != tok.vocab_size:
        print(f"note: {args.model} has a vocabulary of {model.shape.vocab_size}, not the Mixtral tokenizer's "
              f"{tok.vocab_size}: ids are decoded modulo the tokenizer's vocabulary", file=sys.stderr)
    prompts = args.prompt or ["Question: What is the capital of France?\nAnswer:"]
    ids = [tok.encode(p) for p in prompts]
    engine = Engine(model, max_batch=len(ids), max_len=max(len(i) for i in ids) + args.max_new_tokens,
                    cuda_graph=not args.no_cuda_graph)
    warm = model.device.type == "cuda"
    if warm:  # compiles the kernels and captures this shape's graphs, so that the times below are the engine's
        engine.generate(ids, min(2, args.max_new_tokens), sampling)
    out = engine.generate(ids, args.max_new_tokens, sampling, stop_tokens=[tok.eos_id])
    random_note = " [random weights: the text is noise]" if model.source.startswith("random") else ""
    for prompt, new in zip(prompts, out.tokens):
        print(f"{prompt!r} -> {tok.decode([t % tok.vocab_size for t in new])!r}{random_note}")
    print(f"{model.source} on {model.device}: time to first token {out.prefill_ms:.1f} ms, "
          f"{out.decode_ms_per_step:.2f} ms per decode step ({len(ids) * 1e3 / out.decode_ms_per_step:.1f} "
          f"tokens/s over {out.steps} steps){' after a warm-up run' if warm else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
