"""Trace replay: batch a trace like a server, apply a placement plan, and time every step and layer.

The pipeline, all vectorised over tokens (one Python loop over layers, none over tokens):

1. :func:`make_batches` groups requests into batches of ``batch_size`` requests (static batching:
   one prefill step with all their prompts, then one decode step per generated token; or continuous
   batching, a request joining whenever an answer ends, its prompt whole, in chunks, or packed into a
   token budget a step), and gives
   each token the GPU its attention runs on (``source``: round-robin over the batch's tokens, or
   by request, as data-parallel attention does).
2. A :class:`Plan` says, for every step, which placement holds (``share [placement, layer, expert,
   gpu]`` plus ``placement_of_step [step]``), optionally where each token's attention runs at each
   layer (``home [token, layer]``: token-to-expert prediction moves tokens to the GPU of their
   predicted experts before attention), and the predictor's work per step.
3. :func:`simulate` returns a :class:`SimResult` with per-step, per-layer components in seconds.

Plans come from :func:`static_plan`, :func:`oracle_plan`, :func:`distribution_plan` (a
``DistributionPredictor`` re-placing every ``interval`` batches) and :func:`token_plan`
(a ``TokenPredictor``): the last two are the thin adapters to ``moegps.predictors``.

How token-to-expert prediction saves communication (MoE-GPS's distinction, modelled explicitly):
with a distribution-only predictor a token's attention runs where the scheduler put it, and every
top-k selection whose expert lives elsewhere is dispatched and combined. With a token-to-expert
predictor that runs before attention, the previous layer's combine delivers the token straight to
the GPU holding most of its predicted experts (``home``), its attention runs there, and a selection
whose true expert sits on ``home`` needs no dispatch; a mispredicted selection pays the ordinary
dispatch from ``home`` (the correction transfer). The price: the predictor's time, and, with
data-parallel attention, uneven attention work when many tokens pick the same home, plus moving the
token's residual when its home changes between layers. With tensor-parallel attention
(``attention="tp"``) the reduce-scatter after attention can hand each token to any GPU for free.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from ..configs import checked, nonnegative, one_of, positive, unit_interval
from ..placement.algorithms import canonical, check_fields, place
from ..placement.packing import balance_rows
from ..predictors.base import BatchContext
from ..predictors.batching import token_batch
from ..results import make_row
from ..shapes import ModelShape
from ..trace import RoutingTrace, TokenRouting
from . import cost
from .system import SystemSpec, SystemSpecError


@dataclass
class ReplayOptions:
    """Where tokens live and what is replayed (the ``replay:`` section of the sweep's config)."""

    source: str = checked("token", one_of("token", "request"))  # "token": round-robin over a batch's tokens; "request": a request's tokens on one GPU
    attention: str = checked("dp", one_of("dp", "tp"))  # "dp" (data-parallel attention) | "tp" (tensor-parallel, MoE-GPS's setting)
    local_first: bool = True  # a selection whose expert has a replica on the token's GPU stays local
    phase: str = checked("all", one_of("prefill", "decode", "all"))  # replay "prefill", "decode" or "all" steps
    migration_exposed: float = checked(1.0, unit_interval)  # fraction of a re-placement's weight transfer that stalls serving


@dataclass
class ReplayConfig(ReplayOptions):
    """How the server batches and where tokens live."""

    batch_size: int = checked(64, positive)  # requests per batch (static) or cache slots (continuous, chunked)
    # static: batch_size requests from their prefill to their longest answer, then the next batch_size;
    # continuous: a request joins as soon as an answer ends and frees a slot (iteration-level batching,
    # moegps.engine.serve's continuous policy), every request queued from the start; chunked: the same with
    # the prompts prefilled `chunk` tokens a step beside the decode (the engine's chunked policy); packed: a
    # step of at most `chunk` tokens, the running requests' decode first, then as many prompts' tokens as fit
    # (vLLM's token budget; Sarathi-Serve's stall-free batching)
    batching: str = checked("static", one_of("static", "continuous", "chunked", "packed"))
    chunk: int = checked(256, positive)  # prompt tokens a step (chunked), or tokens a step (packed)
    # trace: every request decodes the steps its trace holds; uniform: each answer cut after a number of decode
    # steps drawn uniformly from 0 to those (per request id, the same in every replay), so that answers end at
    # different steps, as served ones do, on a trace collected at a fixed length (the kept tokens' routing is
    # the trace's)
    answers: str = checked("trace", one_of("trace", "uniform"))
    # charge attention over each token's context besides its weights: a decode token reads its request's K and V
    # up to its position (a step at batch 32 and context 4096 reads 17 GB of Mixtral-8x7B's cache), every token's
    # QK and PV FLOPs grow with it (cost.other_time). Off: the non-MoE part costs the same at every position, as
    # the figures in docs/simulator.md were made
    attention_context: bool = False
    # with attention_context: tokens of context every request holds before its trace's first token (a conversation's
    # history or a shared system prompt, cached earlier, its routing not in the trace): its prompt attends to them,
    # its decode steps read their K/V
    history_tokens: int = checked(0, nonnegative)


# ---- 1. batching -------------------------------------------------------------------------------


@dataclass
class Batches:
    """A trace cut into server steps. ``T`` tokens, ``S`` steps, ``L`` layers, ``E`` experts, ``G`` GPUs."""

    step: np.ndarray  # [T] step index of each token
    source: np.ndarray  # [T] GPU each token's attention runs on by default
    experts: np.ndarray  # [T, L, k] true experts
    token_id: np.ndarray  # [T]
    position: np.ndarray  # [T] position in its request's sequence (0-based): it attends to position + 1 tokens
    request_id: np.ndarray  # [T]
    phase: np.ndarray  # [S] 0 prefill / 1 decode
    n_tokens: np.ndarray  # [S]
    loads: np.ndarray  # [S, L, E] true selection counts
    n_gpus: int
    n_experts: int
    routing: TokenRouting | None = None  # the full token-major trace these tokens came from
    keep: np.ndarray | None = None  # [tokens of routing] bool: which were replayed

    @property
    def n_steps(self) -> int:
        return len(self.phase)

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def token_phase(self) -> np.ndarray:
        """``[T]`` 0 prompt / 1 decode: each token's own phase (a chunked step holds both); its step's when the
        batches do not keep the trace they came from."""
        if self.routing is not None and self.keep is not None:
            return self.routing.phase[self.keep]
        return self.phase[self.step]


def continuous_schedule(decode_steps: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Iteration-level batching of requests all queued at the start, served in order: each takes the slot
    that frees first (the lowest of those freeing together), is prefilled at that iteration and runs its
    ``decode_steps[r]`` decode steps in the iterations from there, one each; its slot frees for the next
    iteration after its last (after the prefill's own, with none). ``decode_steps [R]`` ->
    ``(admitted [R], slot [R])``: each request's admission iteration and cache slot."""
    free = [(0, s) for s in range(slots)]  # (iteration the slot is free from, slot): a heap
    admitted = np.empty(len(decode_steps), dtype=np.int64)
    slot = np.empty(len(decode_steps), dtype=np.int64)
    for r, d in enumerate(np.asarray(decode_steps).tolist()):
        admitted[r], slot[r] = heapq.heappop(free)
        heapq.heappush(free, (int(admitted[r]) + max(d, 1), int(slot[r])))
    return admitted, slot


def chunked_schedule(prompt_tokens: np.ndarray, decode_steps: np.ndarray, slots: int,
                     chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous batching with chunked prefill (``moegps.engine.serve``'s chunked policy), every request queued
    from the start and served in order: a request takes the slot that frees first; its prompt is prefilled
    ``chunk`` tokens an iteration, in the same step as the running requests' decode, one prompt at a time in
    admission order; its first token comes with its last chunk, and its decode steps follow in the next
    iterations, one each; its slot frees for the iteration after its last. ``prompt_tokens``,
    ``decode_steps [R]`` -> ``(first_chunk [R], decode_from [R], slot [R])``: the iteration of each request's
    first chunk, the iteration of its first decode step (its last chunk's + 1), and its cache slot."""
    free = [(0, s) for s in range(slots)]  # (iteration the slot is free from, slot): a heap
    R = len(decode_steps)
    first_chunk, decode_from, slot = (np.empty(R, dtype=np.int64) for _ in range(3))
    prefilled_until = 0  # the iteration after the previous prompt's last chunk
    for r, (p, d) in enumerate(zip(np.asarray(prompt_tokens).tolist(), np.asarray(decode_steps).tolist())):
        admitted, slot[r] = heapq.heappop(free)
        first_chunk[r] = max(admitted, prefilled_until)
        decode_from[r] = prefilled_until = int(first_chunk[r]) + -(-p // chunk)
        heapq.heappush(free, (int(decode_from[r]) + d, int(slot[r])))
    return first_chunk, decode_from, slot


def packed_schedule(prompt_tokens: np.ndarray, decode_steps: np.ndarray, slots: int,
                    budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous batching with a token budget a step (vLLM's scheduler; Sarathi-Serve's stall-free batching),
    every request queued from the start and admitted in order into the slot that frees first: each step runs
    one decode step of every running request, then fills what is left of ``budget`` with prompt tokens of the
    admitted requests in admission order, several prompts a step and a prompt over several steps; a request's
    first token comes with its prompt's last token and its decode steps follow, one a step.
    ``prompt_tokens``, ``decode_steps [R]`` -> ``(prompt_step [sum of prompt_tokens], decode_from [R], slot [R])``:
    the step of every prompt token (request by request, in order), each request's first decode step, its slot."""
    prompt_tokens, decode_steps = np.asarray(prompt_tokens), np.asarray(decode_steps)
    offsets = np.concatenate([[0], np.cumsum(prompt_tokens)])
    prompt_step = np.empty(offsets[-1], dtype=np.int64)
    decode_from = np.empty(len(prompt_tokens), dtype=np.int64)
    slot = np.empty(len(prompt_tokens), dtype=np.int64)
    free = list(range(slots))        # a heap
    waiting = deque(range(len(prompt_tokens)))
    prefilling: deque = deque()      # [request, prompt tokens done]
    running: dict[int, int] = {}     # request -> decode steps left
    t = 0
    while waiting or prefilling or running:
        while waiting and free:
            r = waiting.popleft()
            slot[r] = heapq.heappop(free)
            prefilling.append([r, 0])
        room = budget - len(running)
        for r in list(running):
            running[r] -= 1
            if not running[r]:
                del running[r]
                heapq.heappush(free, int(slot[r]))  # for the next step's admissions
        while room > 0 and prefilling:
            r, done = prefilling[0]
            take = min(room, int(prompt_tokens[r]) - done)
            prompt_step[offsets[r] + done:offsets[r] + done + take] = t
            prefilling[0][1] += take
            room -= take
            if prefilling[0][1] == prompt_tokens[r]:
                prefilling.popleft()
                decode_from[r] = t + 1
                if decode_steps[r]:
                    running[r] = int(decode_steps[r])
                else:
                    heapq.heappush(free, int(slot[r]))
        t += 1
    return prompt_step, decode_from, slot


def request_decode_steps(routing: TokenRouting) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [R], rank [tokens], decode_steps [R])``: the trace's request ids in order, each token's index
    among them, and each request's last decode step (0: prefill only)."""
    ids, rank = np.unique(routing.request_id, return_inverse=True)
    last = np.zeros(len(ids), dtype=np.int64)
    np.maximum.at(last, rank, routing.step.astype(np.int64))
    return ids, rank, last


def cut_answers(routing: TokenRouting) -> TokenRouting:
    """``routing`` with each request's decode steps cut after a number drawn uniformly from 0 to its last
    (inclusive), by a generator seeded with the request id: the same requests, answers of drawn lengths."""
    ids, rank, last = request_decode_steps(routing)
    kept_steps = np.array([np.random.default_rng(int(i)).integers(0, m + 1) for i, m in zip(ids.tolist(), last)])
    keep = routing.step <= kept_steps[rank]
    return TokenRouting(**{f.name: (None if getattr(routing, f.name) is None else getattr(routing, f.name)[keep])
                           for f in fields(TokenRouting)})


def make_batches(routing: TokenRouting | RoutingTrace, n_gpus: int, n_experts: int | None = None,
                 cfg: ReplayConfig | None = None) -> Batches:
    """Group a trace's tokens into server steps: static batching of ``cfg.batch_size`` requests, or
    continuous batching over ``cfg.batch_size`` slots (``cfg.batching``): prompts whole
    (:func:`continuous_schedule`), in chunks of one prompt beside the decode (:func:`chunked_schedule`), or
    packed into a token budget a step (:func:`packed_schedule`)."""
    cfg = cfg or ReplayConfig()
    if isinstance(routing, RoutingTrace):
        n_experts = routing.meta.n_experts if n_experts is None else n_experts
        routing = routing.by_token()
    if n_experts is None:
        n_experts = int(routing.experts.max()) + 1
    if cfg.answers == "uniform":
        routing = cut_answers(routing)
    elif cfg.answers != "trace":
        raise ValueError(f"ReplayConfig.answers must be 'trace' or 'uniform', got {cfg.answers!r}")
    keep = np.ones(len(routing.step), dtype=bool)
    if cfg.phase != "all":
        if cfg.phase not in ("prefill", "decode"):
            raise ValueError(f"ReplayConfig.phase must be 'prefill', 'decode' or 'all', got {cfg.phase!r}")
        keep = routing.phase == (0 if cfg.phase == "prefill" else 1)
    req, stp = routing.request_id[keep], routing.step[keep].astype(np.int64)
    if len(req) == 0:
        raise ValueError(f"no tokens to replay (phase={cfg.phase!r})")
    if cfg.batching == "static":
        rank = np.unique(req, return_inverse=True)[1]  # request order = sorted id
        slot = rank % cfg.batch_size
        key = rank // cfg.batch_size * (int(stp.max()) + 1) + stp
    elif cfg.batching in ("continuous", "chunked", "packed"):
        # the schedule of every request of the trace, whatever phase is replayed: a request's decode steps
        # hold its slot whether or not they are replayed
        ids, rank_all, decode_steps = request_decode_steps(routing)
        rank = rank_all[keep]
        if cfg.batching == "continuous":
            admitted, slot_of = continuous_schedule(decode_steps, cfg.batch_size)
            # iteration t: the prefill of the requests admitted at t, then the decode step of those running;
            # decode step j of a request admitted at t falls in iteration t + j - 1
            key = 2 * (admitted[rank] + np.maximum(stp - 1, 0)) + (stp > 0)
        else:
            prompt_tokens = np.bincount(rank_all[routing.step == 0], minlength=len(ids))
            position = routing.position[keep].astype(np.int64)  # a prompt token's index in its prompt
            if cfg.batching == "chunked":
                first_chunk, decode_from, slot_of = chunked_schedule(prompt_tokens, decode_steps, cfg.batch_size,
                                                                     cfg.chunk)
                prompt_key = first_chunk[rank] + position // cfg.chunk
            else:
                prompt_step, decode_from, slot_of = packed_schedule(prompt_tokens, decode_steps, cfg.batch_size,
                                                                    cfg.chunk)
                offsets = np.concatenate([[0], np.cumsum(prompt_tokens)])
                # (clipped: np.where below reads only the prompt rows', a decode row's index may run past the end)
                prompt_key = prompt_step[np.minimum(offsets[rank] + position, len(prompt_step) - 1)]
            # one step an iteration; decode step j in iteration decode_from + j - 1
            key = np.where(stp == 0, prompt_key, decode_from[rank] + stp - 1)
        slot = slot_of[rank]
    else:
        raise ValueError(f"ReplayConfig.batching must be 'static', 'continuous', 'chunked' or 'packed', "
                         f"got {cfg.batching!r}")
    uniq, step = np.unique(key, return_inverse=True)
    S, T = len(uniq), len(step)
    order = np.argsort(step, kind="stable")
    if cfg.source == "token":
        first = np.searchsorted(step[order], np.arange(S))
        within = np.empty(T, dtype=np.int64)
        within[order] = np.arange(T) - first[step[order]]
        source = within % n_gpus
    elif cfg.source == "request":
        source = slot % n_gpus
    else:
        raise ValueError(f"ReplayConfig.source must be 'token' or 'request', got {cfg.source!r}")
    experts = routing.experts[keep]
    L = experts.shape[1]
    n_tokens = np.bincount(step, minlength=S)
    # a step's phase: its tokens' (a chunked step of prompt and decode tokens: the phase of most of them)
    phase = (2 * np.bincount(step, weights=routing.phase[keep] == 1, minlength=S) > n_tokens).astype(np.int8)
    loads = np.zeros((S, L, n_experts), dtype=np.int64)
    for layer in range(L):
        idx = step[:, None] * n_experts + experts[:, layer, :]
        loads[:, layer] = np.bincount(idx.ravel(), minlength=S * n_experts).reshape(S, n_experts)
    return Batches(
        step=step, source=source.astype(np.int64), experts=experts, token_id=routing.token_id[keep],
        position=routing.position[keep], request_id=req, phase=phase,
        n_tokens=n_tokens, loads=loads, n_gpus=n_gpus, n_experts=n_experts,
        routing=routing, keep=keep,
    )


# ---- 2. plans ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a policy decides: placements over time, token homes, predictor work."""

    name: str
    family: str  # "baseline" | "distribution" | "token" | "oracle"
    share: np.ndarray  # [P, L, E, G] share of each expert's tokens on each GPU
    placement_of_step: np.ndarray  # [S] index into share
    home: np.ndarray | None = None  # [T, L] GPU each token's attention runs on (None: batches.source)
    predictor_s: np.ndarray | None = None  # [S] seconds of predictor work per step (all layers)
    on_critical_path: bool = False
    charge_migration: bool = True
    accuracy: float = float("nan")
    error: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)


def placement_share(placement) -> np.ndarray:
    """A :class:`moegps.placement.Placement` -> ``share [layer, expert, gpu]`` (its own :meth:`share`)."""
    return placement.share()


def contiguous_share(n_layers: int, n_experts: int, n_gpus: int) -> np.ndarray:
    """``[layer, expert, gpu]`` of the static contiguous placement (expert e on GPU e // ceil(E / G))."""
    share = np.zeros((n_layers, n_experts, n_gpus))
    share[:, np.arange(n_experts), np.arange(n_experts) // -(-n_experts // n_gpus)] = 1.0
    return share


def shares_from_slots(slot_expert: np.ndarray, n_experts: int) -> np.ndarray:
    """``slot_expert [..., L, G, slots]`` -> ``share [..., L, E, G]``, replicas splitting evenly."""
    se = np.asarray(slot_expert)
    *lead, L, G, _ = se.shape
    flat = se.reshape(-1, G, se.shape[-1])
    held = np.zeros((flat.shape[0], n_experts, G))
    row = np.broadcast_to(np.arange(flat.shape[0])[:, None, None], flat.shape)
    gpu = np.broadcast_to(np.arange(G)[None, :, None], flat.shape)
    ok = flat >= 0
    np.add.at(held, (row[ok], flat[ok], gpu[ok]), 1.0)
    share = held / np.maximum(held.sum(-1, keepdims=True), 1)
    return share.reshape(*lead, L, n_experts, G)


class PlaceFn:
    """A placement algorithm (:mod:`moegps.placement.algorithms`) as ``loads [L, E] -> share [L, E, G]``,
    and ``.many(loads [N, L, E]) -> [N, L, E, G]`` in one vectorised call (identical rows placed once).

    ``name``: an algorithm of :func:`moegps.placement.algorithms.place` that places from one load
    matrix quickly enough to re-place per batch (``contiguous``/``static``, ``round_robin``, ``balanced``,
    ``balanced_lp``, ``hierarchical``), with its config ``fields`` (e.g. ``refine``, ``restarts``: checked, an unknown one is
    an error), or ``auto``: per layer, whichever of static and balanced the cost model expects to give
    the shorter expert phase for the given loads (a replica costs a second weight read, so when the
    experts are memory-bound, duplicating can make a layer slower; ``auto`` needs ``shape``).
    """

    REPLAYABLE = ("contiguous", "round_robin", "balanced", "balanced_lp", "hierarchical")

    def __init__(self, name: str, system: SystemSpec, n_experts: int, refine: bool | None = None,
                 shape: ModelShape | None = None, **fields):
        self.name, self.system, self.n_experts, self.shape = name, system, n_experts, shape
        if refine is not None:
            fields["refine"] = refine
        self.slots = system.slots_per_gpu(n_experts)
        if name == "auto":
            self.fields = check_fields("balanced", fields)
            if shape is None:
                raise ValueError("placement 'auto' needs the model shape (PlaceFn(..., shape=...))")
        else:
            if canonical(name) not in self.REPLAYABLE:
                raise ValueError(f"placement {name!r} is not re-placed per batch in a replay (it takes {self.REPLAYABLE} "
                                 "and auto): prefill_aware places from per-phase loads (the guide's study=placement "
                                 "compares it), optimal solves a MILP per layer (python -m moegps.placement)")
            self.fields = check_fields(name, fields)

    def __call__(self, loads: np.ndarray) -> np.ndarray:
        return self.many(np.asarray(loads)[None])[0]

    def many(self, loads: np.ndarray) -> np.ndarray:
        loads = np.asarray(loads, dtype=np.float64)
        N, L, E = loads.shape
        G = self.system.n_gpus
        if self.name == "auto":
            static = contiguous_share(L, E, G)[None]
            balanced = PlaceFn("balanced", self.system, E, **self.fields).many(loads)
            def expert_phase(share):  # [N, L] expected slowest-GPU expert time
                per_gpu = np.swapaxes(loads[..., None] * share, -1, -2)  # [N, L, G, E]
                return cost.gpu_expert_time(per_gpu, self.shape, self.system).max(-1)
            better = expert_phase(balanced) < expert_phase(static)
            return np.where(better[..., None, None], balanced, static)
        name = canonical(self.name)
        if name in ("contiguous", "round_robin"):  # load-blind: one placement
            share = place(name, loads[0], G, self.slots, self.system.gpus_per_node).share()
            return np.broadcast_to(share, (N, L, E, G)).copy()
        frac = loads / np.maximum(loads.sum(-1, keepdims=True), 1e-300)
        uniq, inverse = np.unique(np.round(frac, 9).reshape(N, -1), axis=0, return_inverse=True)
        uniq = uniq.reshape(-1, L, E)
        if name == "balanced" and not self.fields.get("restarts"):
            # every unique row in one vectorised call (the same algorithm as place("balanced"))
            slots = balance_rows(uniq.reshape(1, -1, E), G, self.slots,
                                 refine=self.fields.get("refine", True)).reshape(-1, L, G, self.slots)
            shares = shares_from_slots(slots, E)
        else:
            shares = np.stack([place(name, u, G, self.slots, self.system.gpus_per_node, **self.fields).share()
                               for u in uniq])
        return shares[np.asarray(inverse).reshape(-1)]


def _place_many(place, loads: np.ndarray) -> np.ndarray:
    """Apply any placement callable to ``loads [N, L, E]`` -> ``[N, L, E, G]``."""
    if hasattr(place, "many"):
        return place.many(loads)
    return np.stack([_as_share(place(l)) for l in loads])




def _as_share(placed) -> np.ndarray:
    return np.asarray(placed, dtype=np.float64) if isinstance(placed, np.ndarray) else placement_share(placed)


def expected_expert_time(loads: np.ndarray, share: np.ndarray, place: PlaceFn) -> np.ndarray:
    """``loads [..., L, E]`` under ``share [..., L, E, G]`` -> ``[...]`` seconds of the expert phases
    (slowest GPU per layer, summed over layers), as the cost model predicts them."""
    per_gpu = np.swapaxes(np.asarray(loads)[..., None] * share, -1, -2)
    return cost.gpu_expert_time(per_gpu, place.shape, place.system).max(-1).sum(-1)


def keep_unless_worth_it(predicted: np.ndarray, shares: np.ndarray, held_steps: np.ndarray, place) -> np.ndarray:
    """Hysteresis for re-placement: at each re-placement point adopt the new placement only if the
    expert time it is expected to save over the steps it will hold (``held_steps [R]``, with
    ``predicted [R, L, E]`` loads per step) exceeds the time to migrate the weights; else keep the
    current one. ``shares [R, L, E, G]`` -> the adopted ``[R, L, E, G]``. Needs ``place.shape``."""
    if getattr(place, "shape", None) is None:
        return shares
    out = shares.copy()
    current = shares[0]
    for r in range(1, len(shares)):
        t_cur = expected_expert_time(predicted[r], current, place)
        t_new = expected_expert_time(predicted[r], shares[r], place)
        moved = cost.migration_bytes(current, shares[r], place.shape.expert_weight_bytes)
        if (t_cur - t_new) * held_steps[r] > float(cost.migration_time(moved, place.system)):
            current = shares[r]
        out[r] = current
    return out


def static_plan(batches: Batches, share: np.ndarray | None = None, name: str = "static") -> Plan:
    """The baseline: one placement for the whole replay (contiguous unless given), no predictor."""
    if share is None:
        share = contiguous_share(batches.n_layers, batches.n_experts, batches.n_gpus)
    return Plan(name, "baseline", share[None], np.zeros(batches.n_steps, dtype=np.int64), charge_migration=False)


def oracle_plan(batches: Batches, place: PlaceFn, route_tokens: bool = True, home_slack: float = 1.25) -> Plan:
    """Placement from each step's true loads, token homes from true top-1 experts; no cost at all."""
    shares = _place_many(place, batches.loads.astype(np.float64))
    plan = Plan("oracle", "oracle", shares, np.arange(batches.n_steps), charge_migration=False, accuracy=1.0, error=0.0)
    if route_tokens:
        plan.home = _homes(batches, plan, batches.experts, home_slack)
    return plan


def _homes(batches: Batches, plan: Plan, predicted: np.ndarray, slack: float = 1.25) -> np.ndarray:
    """``[T, L]`` home GPU of each token at each layer, from its predicted experts ``[T, L, k]``.

    A token prefers the GPU holding most of its predicted experts (an expert counts at the GPU with
    its largest share; ties broken at random, so no GPU is favoured by expert numbering). Homes are
    capacity-limited to ``slack`` x an even share of the step's tokens per GPU: unlimited, hot
    experts would pull most tokens (their attention and their traffic) onto a few GPUs. Tokens that
    do not fit take their next preference, in rounds.
    """
    main_gpu = plan.share.argmax(axis=-1)  # [P, L, E]
    P, L, E = main_gpu.shape
    flat_gpu = main_gpu.reshape(-1)
    p = plan.placement_of_step[batches.step]  # [T]
    T, _, k = predicted.shape
    G = batches.n_gpus
    step = batches.step
    S = len(batches.n_tokens)
    cap = np.ceil(slack * batches.n_tokens / G).astype(np.int64)  # [S]
    jitter = np.random.default_rng(0).random((T, G)) * 0.5
    rows = np.arange(T)
    home = np.empty((T, L), dtype=np.int64)
    for layer in range(L):
        score = jitter.copy()
        base = (p * L + layer) * E
        for j in range(k):  # distinct experts may share a GPU: add one column at a time
            score[rows, flat_gpu[base + predicted[:, layer, j]]] += 1.0
        want = score.argmax(axis=1)
        todo = rows
        out = np.full(T, -1, dtype=np.int64)
        taken = np.zeros(S * G, dtype=np.int64)
        for _ in range(G):
            key = step[todo] * G + want
            order = np.argsort(key, kind="stable")  # within a (step, GPU), earlier tokens first
            sorted_key = key[order]
            rank = np.empty(todo.size, dtype=np.int64)
            rank[order] = np.arange(todo.size) - np.searchsorted(sorted_key, sorted_key)
            ok = rank < cap[step[todo]] - taken[key]
            out[todo[ok]] = want[ok]
            taken += np.bincount(key[ok], minlength=S * G)
            todo = todo[~ok]
            if todo.size == 0:
                break
            full = taken.reshape(S, G)[step[todo]] >= cap[step[todo], None]
            want = np.where(full, -np.inf, score[todo]).argmax(axis=1)
        home[:, layer] = out
    return home


def _replan_steps(n_steps: int, interval: int) -> np.ndarray:
    if interval < 1:
        raise ValueError(f"interval must be >= 1 batch, got {interval}")
    return np.arange(0, n_steps, interval)


def predictor_seconds(pcost, n_tokens: np.ndarray, system: SystemSpec) -> np.ndarray:
    """Seconds of one predictor call per step from a ``PredictorCost`` (its measured GPU latency when
    it has one, interpolated by batch size; else its FLOPs and bytes on the GPU roofline)."""
    n = np.asarray(n_tokens, dtype=np.float64)
    measured = getattr(pcost, "gpu_latency_s", None)
    if measured:
        sizes = np.array(sorted(measured), dtype=np.float64)
        return np.interp(n, sizes, [measured[int(s)] for s in sizes])
    flops = pcost.flops_per_batch + n * pcost.flops_per_token
    nbytes = pcost.bytes_per_batch + n * pcost.bytes_per_token
    return cost.predictor_time(flops, nbytes, system)


def _typical_selections(batches: Batches, s: int) -> float:
    """Selections per layer of a typical batch: the mean over the replay (the server knows its own
    batch-size profile; it does not know the routing). Placements are chosen for this typical batch,
    because one placement serves many batches of both phases, and moving Mixtral-sized experts
    costs seconds."""
    return float(batches.n_tokens.mean()) * batches.experts.shape[2]


def distribution_plan(batches: Batches, predictor, place: PlaceFn, system: SystemSpec, interval: int = 1,
                      name: str | None = None) -> Plan:
    """Re-place every ``interval`` batches from a ``DistributionPredictor``'s forecast of the next batch.

    The predictor sees only past batches' loads (``past_loads [t, L, E]``) and the next batch's
    context (phase, size, token ids); its forecast fractions x the batch's selections are the loads
    the placement balances.
    """

    S, L, E = batches.n_steps, batches.n_layers, batches.n_experts
    replan = _replan_steps(S, interval)
    order = np.argsort(batches.step, kind="stable")
    bounds = np.searchsorted(batches.step[order], np.arange(S + 1))
    requests, token_request = np.unique(batches.request_id, return_inverse=True)
    prefill = batches.token_phase == 0
    flat = (token_request[prefill, None, None] * L + np.arange(L)[None, :, None]) * E + batches.experts[prefill]
    prefill_loads = np.bincount(flat.ravel(), minlength=len(requests) * L * E).reshape(len(requests), L, E)
    # each token's generation step (0 prefill, s the s-th decode step), for step-aware predictors
    gen_step = (batches.routing.step[batches.keep] if batches.routing is not None and batches.keep is not None
                else None)
    predicted, errors = [], []
    for s in replan:
        members = np.unique(token_request[order[bounds[s]:bounds[s + 1]]])
        ctx = BatchContext(phase=int(batches.phase[s]), n_tokens=int(batches.n_tokens[s]), n_requests=len(members),
                           token_ids=batches.token_id[order[bounds[s]:bounds[s + 1]]], past_phase=batches.phase[:s],
                           request_prefill_loads=prefill_loads[members] if batches.phase[s] else None,
                           steps=None if gen_step is None else gen_step[order[bounds[s]:bounds[s + 1]]])
        frac = np.asarray(predictor.predict_next(batches.loads[:s], ctx), dtype=np.float64)
        predicted.append(frac * _typical_selections(batches, s))
        true = batches.loads[s] / np.maximum(batches.loads[s].sum(-1, keepdims=True), 1)
        errors.append(0.5 * np.abs(frac - true).sum(-1).mean())
    pcost = predictor.cost()
    work = np.zeros(S)
    work[replan] = predictor_seconds(pcost, batches.n_tokens[replan], system)
    err = float(np.mean(errors))
    predicted = np.stack(predicted)
    shares = keep_unless_worth_it(predicted, _place_many(place, predicted), np.diff(np.append(replan, S)), place)
    return Plan(name or getattr(predictor, "name", "distribution"), "distribution", shares,
                np.searchsorted(replan, np.arange(S), side="right") - 1, predictor_s=work,
                on_critical_path=bool(pcost.on_critical_path), accuracy=1 - err, error=err)


def predict_tokens(batches: Batches, predictor, window: int = 8) -> np.ndarray:
    """``[T, L, k]`` a TokenPredictor's forecasts for the replayed tokens (one call, whole trace;
    cross-layer predictors see the true routing of earlier layers only, as their protocol says)."""

    tb = token_batch(batches.routing, window=window)
    if batches.keep is not None and not batches.keep.all():
        tb = tb.select(np.flatnonzero(batches.keep))
    return np.asarray(predictor.predict(tb))


def token_plan(batches: Batches, predictor, place: PlaceFn, system: SystemSpec, interval: int = 1,
               name: str | None = None, predicted: np.ndarray | None = None, home_slack: float = 1.25,
               placement_from: Plan | None = None) -> Plan:
    """A ``TokenPredictor``: its per-token forecasts give the batch's loads (placed every
    ``interval`` batches) and, if it runs before attention, each token's home GPU per layer.

    ``predicted [T, L, k]`` may be passed to reuse predictions made once. ``home_slack``: a GPU
    hosts at most that many times an even share of a step's tokens (see :func:`_homes`).
    ``placement_from``: take the placements of another plan (e.g. the global profile's) instead of
    placing from the aggregated token predictions; the token predictor then only routes tokens.
    """
    S, L = batches.n_steps, batches.n_layers
    E = batches.n_experts
    if predicted is None:
        predicted = predict_tokens(batches, predictor)
    predicted = predicted.astype(np.int64)
    pred_loads = np.zeros((S, L, E))
    for layer in range(L):
        idx = batches.step[:, None] * E + predicted[:, layer, :]
        pred_loads[:, layer] = np.bincount(idx.ravel(), minlength=S * E).reshape(S, E)
    replan = _replan_steps(S, interval)
    if placement_from is not None:
        shares, of_step = placement_from.share, placement_from.placement_of_step
    else:
        # only the batch at hand is known when it is placed; it is placed for a typical batch of that mix
        frac = pred_loads[replan] / np.maximum(pred_loads[replan].sum(-1, keepdims=True), 1)
        typical = np.array([_typical_selections(batches, s) for s in replan])[:, None, None]
        shares = keep_unless_worth_it(frac * typical, _place_many(place, frac * typical),
                                      np.diff(np.append(replan, S)), place)
        of_step = np.searchsorted(replan, np.arange(S), side="right") - 1
    pcost = predictor.cost()
    hits = (predicted[:, :, :, None] == batches.experts[:, :, None, :]).any(-1).mean()
    true_f = batches.loads / np.maximum(batches.loads.sum(-1, keepdims=True), 1)
    pred_f = pred_loads / np.maximum(pred_loads.sum(-1, keepdims=True), 1)
    plan = Plan(name or getattr(predictor, "name", "token"), "token", shares, of_step,
                charge_migration=placement_from.charge_migration if placement_from is not None else True,
                predictor_s=predictor_seconds(pcost, batches.n_tokens, system),
                on_critical_path=bool(pcost.on_critical_path), accuracy=float(hits),
                error=float(0.5 * np.abs(pred_f - true_f).sum(-1).mean()))
    if pcost.runs_before_attention:
        plan.home = _homes(batches, plan, predicted, home_slack)
    return plan


# ---- 3. simulate ------------------------------------------------------------------------------

COMPONENTS = ("predictor", "dispatch", "expert", "combine", "other", "overhead")


@dataclass
class SimResult:
    """Per-step, per-layer seconds of each component (``[S, L]`` arrays) and per-step migration."""

    plan: str
    family: str
    parts: dict[str, np.ndarray]  # component -> [S, L] seconds
    migration: np.ndarray  # [S] seconds
    imbalance: np.ndarray  # [S, L] max/mean expert tokens per GPU
    bytes_all_to_all: np.ndarray  # [S, L]
    bytes_migrated: float
    tokens: int
    accuracy: float = float("nan")
    error: float = float("nan")

    @property
    def layer_time(self) -> np.ndarray:
        """``[S, L]`` seconds of each layer at each step."""
        return sum(self.parts[c] for c in COMPONENTS)

    @property
    def step_time(self) -> np.ndarray:
        """``[S]`` seconds of each step (all layers plus any re-placement stall)."""
        return self.layer_time.sum(axis=1) + self.migration

    @property
    def total(self) -> float:
        return float(self.step_time.sum())

    def totals_ms(self) -> dict[str, float]:
        ms = {f"{c}_ms": float(self.parts[c].sum() * 1e3) for c in COMPONENTS if c != "overhead"}
        ms["predictor_ms"] = float(self.parts["predictor"].sum() * 1e3)
        ms["migration_ms"] = float(self.migration.sum() * 1e3)
        moe = self.parts["dispatch"] + self.parts["expert"] + self.parts["combine"] + self.parts["overhead"]
        ms["moe_ms"] = float(moe.sum() * 1e3)
        ms["total_ms"] = self.total * 1e3
        return ms

    def row(self, config: dict[str, Any], system: SystemSpec) -> dict[str, Any]:
        """One results row (``moegps.results``) for this run."""

        return make_row(
            {**config, "plan": self.plan, "family": self.family}, backend="sim", device=f"sim:{system.name}",
            imbalance=float(self.imbalance.mean()), tokens=self.tokens,
            bytes_all_to_all=float(self.bytes_all_to_all.sum()), bytes_migrated=self.bytes_migrated,
            predictor_accuracy=self.accuracy, predictor_error=self.error, **self.totals_ms(),
        )

    def per_layer(self, run_id: str = "") -> pd.DataFrame:
        """The side table: one row per (step, layer) with each component in ms."""
        S, L = self.parts["expert"].shape
        frame = pd.DataFrame({"run_id": run_id, "step": np.repeat(np.arange(S), L), "layer": np.tile(np.arange(L), S)})
        for c in COMPONENTS:
            frame[f"{c}_ms"] = self.parts[c].ravel() * 1e3
        frame["imbalance"] = self.imbalance.ravel()
        return frame


def _source_counts(step, src, experts_l, S, G, E) -> np.ndarray:
    """``[S, G, E]`` selections by (step, source GPU, expert) for one layer."""
    idx = ((step * G + src)[:, None] * E) + experts_l
    return np.bincount(idx.ravel(), minlength=S * G * E).reshape(S, G, E).astype(np.float64)


def check_kv_memory(batches: Batches, history_tokens: int, shape: ModelShape, system: SystemSpec,
                    attention: str = "dp") -> None:
    """Raise when some step's requests hold more K/V (each its cache up to its furthest token in the step, after
    ``history_tokens`` cached ones) than the GPUs have left beside the weights: such a batch cannot be served."""
    req = np.unique(batches.request_id, return_inverse=True)[1].astype(np.int64)
    n_req = int(req.max()) + 1
    pair, where = np.unique(batches.step.astype(np.int64) * n_req + req, return_inverse=True)
    furthest = np.zeros(len(pair))
    np.maximum.at(furthest, where, batches.position + 1.0 + history_tokens)
    held = np.bincount(pair // n_req, weights=furthest, minlength=batches.n_steps)  # [S] cached positions
    per_position = shape.kv_bytes_per_token * shape.n_layers
    routed = shape.n_moe_layers * shape.n_experts * shape.expert_weight_bytes
    rest = shape.total_params * shape.dtype_bytes - routed  # attention, dense layers, embeddings: on every GPU (dp)
    weights = system.slots_per_gpu(shape.n_experts) * shape.n_moe_layers * shape.expert_weight_bytes + (
        rest / system.n_gpus if attention == "tp" else rest)
    room = system.n_gpus * (system.memory_bytes - weights)
    worst = int(held.argmax())
    if held[worst] * per_position > room:
        raise SystemSpecError(
            f"{system.name}: step {worst} holds {held[worst]:.0f} positions of K/V ({held[worst] * per_position / 1e9:.1f} "
            f"GB at {per_position / 1e6:.2f} MB a position, history_tokens={history_tokens}), where {system.n_gpus} "
            f"GPUs of memory_gb={system.memory_bytes / 1e9:g} keep {room / 1e9:.1f} GB beside the weights: lower "
            f"replay.batch_size or replay.history_tokens")


def simulate(batches: Batches, plan: Plan, shape: ModelShape, system: SystemSpec, cfg: ReplayConfig | None = None,
             table: cost.ExpertTimeTable | None = None) -> SimResult:
    """Time every step and layer of ``batches`` under ``plan`` (see the module docstring)."""
    cfg = cfg or ReplayConfig()
    S, L, E, G = batches.n_steps, batches.n_layers, batches.n_experts, batches.n_gpus
    if G != system.n_gpus:
        raise ValueError(f"batches were made for {G} GPUs, system {system.name} has {system.n_gpus}")
    if plan.share.shape[1:] != (L, E, G):
        raise ValueError(f"plan {plan.name}: share has shape {plan.share.shape}, expected [P, {L}, {E}, {G}]")
    # the expert weights a GPU holds (every slot of the model's MoE layers) must fit in its memory
    system.check_memory(system.slots_per_gpu(E), shape.n_moe_layers, shape.expert_weight_bytes)
    parts = {c: np.zeros((S, L)) for c in COMPONENTS}
    imbalance = np.ones((S, L))
    a2a_bytes = np.zeros((S, L))
    step = batches.step
    pidx = plan.placement_of_step
    moves_home = plan.home is not None and cfg.attention == "dp"
    if cfg.history_tokens and not cfg.attention_context:
        raise ValueError(f"ReplayConfig.history_tokens={cfg.history_tokens} needs attention_context=True "
                         "(without it the non-MoE part does not depend on the context)")
    per_gpu_context = per_gpu_kv = None
    if cfg.attention_context:
        check_kv_memory(batches, cfg.history_tokens, shape, system, cfg.attention)
        # the attention over the context runs where the request's K/V cache is: the token's own GPU, also under a
        # plan that moves tokens to their experts' GPUs (which moves its projections, not its request's cache)
        context = batches.position.astype(np.float64) + 1.0 + cfg.history_tokens  # [T] positions a token attends to
        at = step * G + batches.source
        per_gpu_context = np.bincount(at, weights=context, minlength=S * G).reshape(S, G)
        decode = batches.token_phase == 1
        per_gpu_kv = np.bincount(at, weights=np.where(decode, context, 0.0), minlength=S * G).reshape(S, G)
    for layer in range(L):
        src = batches.source if plan.home is None else plan.home[:, layer]
        share = plan.share[pidx, layer]  # [S, E, G]
        counts = _source_counts(step, src, batches.experts[:, layer].astype(np.int64), S, G, E)
        pair, per_gpu = cost.route_tokens(counts, share, cfg.local_first)
        dispatch_bytes = pair * shape.token_bytes
        if moves_home:
            # the combine delivers expert outputs to the token's next home, and its residual moves there too
            nxt = plan.home[:, layer + 1] if layer + 1 < L else batches.source
            back, _ = cost.route_tokens(_source_counts(step, nxt, batches.experts[:, layer].astype(np.int64), S, G, E),
                                        share, cfg.local_first)
            residual = np.bincount((step * G + src) * G + nxt, minlength=S * G * G).reshape(S, G, G)
            combine_bytes = (np.swapaxes(back, -1, -2) + residual) * shape.token_bytes
        else:
            combine_bytes = np.swapaxes(dispatch_bytes, -1, -2)
        parts["dispatch"][:, layer] = cost.all_to_all_time(dispatch_bytes, system)
        parts["combine"][:, layer] = cost.all_to_all_time(combine_bytes, system)
        eye = ~np.eye(G, dtype=bool)
        a2a_bytes[:, layer] = (dispatch_bytes * eye).sum((-1, -2)) + (combine_bytes * eye).sum((-1, -2))
        gpu_time = cost.gpu_expert_time(per_gpu, shape, system, table)  # [S, G]
        parts["expert"][:, layer] = gpu_time.max(axis=-1)
        tokens_gpu = per_gpu.sum(axis=-1)
        imbalance[:, layer] = tokens_gpu.max(-1) / np.maximum(tokens_gpu.mean(-1), 1e-12)
        attn_tokens = np.bincount(step * G + src, minlength=S * G).reshape(S, G)
        parts["other"][:, layer] = cost.other_time(attn_tokens, shape, system, cfg.attention, per_gpu_context,
                                                   per_gpu_kv)
    # a timed GPU call holds the layer's fixed cost already
    parts["overhead"][:] = 0.0 if cost.times_whole_calls(table) else system.layer_overhead
    if plan.predictor_s is not None:
        # spread over layers; off the critical path it hides behind the previous layer's expert GEMMs
        work = np.repeat(plan.predictor_s[:, None] / L, L, axis=1)
        previous = np.roll(parts["expert"].ravel(), 1).reshape(S, L)
        previous[0, 0] = 0.0
        parts["predictor"] = cost.exposed_time(work, previous, plan.on_critical_path)
    migration = np.zeros(S)
    moved = 0.0
    if plan.charge_migration and S > 1:
        changes = np.flatnonzero(pidx[1:] != pidx[:-1]) + 1
        for s in changes:
            b = cost.migration_bytes(plan.share[pidx[s - 1]], plan.share[pidx[s]], shape.expert_weight_bytes)
            moved += float(b.sum())
            migration[s] = cfg.migration_exposed * cost.migration_time(b, system)
    return SimResult(plan.name, plan.family, parts, migration, imbalance, a2a_bytes, moved,
                     tokens=len(step), accuracy=plan.accuracy, error=plan.error)


def oracle_bound(results: list[SimResult]) -> SimResult:
    """The oracle of a comparison: per step and layer, the cheapest dispatch + expert + combine +
    other any of ``results`` achieved, with no predictor and no migration; never beaten by construction
    (pass the oracle plan's own result among ``results`` so it is at least as good as that)."""
    keys = ("dispatch", "expert", "combine", "other", "overhead")
    stack = np.stack([sum(r.parts[c] for c in keys) for r in results])  # [R, S, L]
    best = stack.argmin(axis=0)
    parts = {c: np.take_along_axis(np.stack([r.parts[c] for r in results]), best[None], 0)[0] for c in keys}
    parts["predictor"] = np.zeros_like(parts["expert"])
    first = results[0]
    pick = lambda name: np.take_along_axis(np.stack([getattr(r, name) for r in results]), best[None], 0)[0]  # noqa: E731
    return SimResult("oracle", "oracle", parts, np.zeros_like(first.migration), pick("imbalance"),
                     pick("bytes_all_to_all"), 0.0, first.tokens, 1.0, 0.0)


def config_dict(cfg: ReplayConfig) -> dict[str, Any]:
    return asdict(cfg)
