"""Replay a RoutingTrace through a stack of live MoE layers under a placement policy and a predictor.

The recorded routing decides which tokens go to which experts; hidden states are random at the
model's shape (the executor measures the MoE layers, not the model's numerics). Each run writes one
results row (``moegps.results``, backend ``exec``) and a per-layer side table keyed by ``run_id``.

Out of sample: the initial placement and the predictor are fitted on training requests and the
test requests are replayed (``train=``/``test=`` traces, or ``trace=`` split by request in arrival
order; :func:`moegps.workloads.train_test`). Batches are formed like a static-batching server: ``batch_requests`` requests at a time, one
prefill batch of their prompts, then one decode batch per step. Expert parallelism splits each
batch's tokens evenly over the ranks (data-parallel attention); tensor parallelism gives every rank
the whole batch.

Predictor in the loop: every ``window`` batches the predictor's load forecast for the next window
goes to the placement policy, and the new placement is applied (``replace.migrate``, timed). With
``predictor_overlap`` the forecast is computed while the GPU still runs the previous batch's last
layers (host work overlapped with queued GEMMs; any GPU work of the predictor on a side stream),
and only the part that outlasts the GPU counts as ``predictor_ms``; otherwise all of it does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs import check_schema, checked, device as device_rule, fraction, nonnegative, one_of, positive
from ..paths import BUNDLED_MODELS
from ..placement import Placement
from ..placement.split import load_proportional
from ..placement.algorithms import place
from ..predictors.base import BatchContext, make
from ..results import make_row, write_rows
from ..shapes import from_name, names as shape_names
from ..trace import PREFILL, RoutingTrace
from ..workloads import TrainTest, fingerprint, random_trace, train_test
from . import dist as xdist
from .layer import (ExpertParallelMoE, LayerStats, PhaseTimer, TensorParallelMoE, choose_slots, expert_weights,
                    replica_tables, slot_weights, tp_shard)
from .replace import migrate

# besides the model shapes of moegps.shapes: a tiny layer for tests and CPU runs
TINY = dict(hidden=64, ffn=128, n_experts=8, top_k=2)


@dataclass
class ExecuteConfig:
    shape: str = "tiny"  # a moegps.shapes name (mixtral-8x7b, deepseek-v2-lite, ...) | bundled | tiny
    hidden: int = checked(0, nonnegative)  # 0 = from shape
    ffn: int = checked(0, nonnegative)
    n_experts: int = checked(0, nonnegative)
    top_k: int = checked(0, nonnegative)
    n_layers: int = checked(2, positive)  # MoE layers in the stack (trace layers are cycled)
    trace: str = ""  # RoutingTrace file or folder, split by request; "" = a random skewed trace
    train: str | None = None  # with test: fit the placement and predictor on this trace, replay that one
    test: str | None = None
    test_fraction: float = checked(0.5, fraction)  # one trace: share of requests replayed (the last ones by id)
    phase: str = checked("decode", one_of("decode", "prefill"))  # decode | prefill
    batch_requests: int = checked(8, positive)  # requests per batch
    max_batches: int = checked(8, positive)  # timed batches
    warmup: int = checked(2, nonnegative)  # untimed batches first
    warm_all: bool = True  # also run every timed batch once untimed first (compiles each kernel variant)
    parallel: str = checked("ep", one_of("ep", "tp"))  # ep (expert parallel) | tp (tensor parallel)
    placement: str = "static"  # static (contiguous) | round_robin | balanced | balanced_lp | prefill_aware
    extra_slots: int = checked(0, nonnegative)  # slots per GPU beyond ceil(E / GPUs), for replicas
    placement_fields: dict = dataclasses.field(default_factory=dict)  # the algorithm's config fields (refine, ...)
    split: str = checked("even", one_of("even", "load_proportional"))  # how a replicated expert's tokens split: even | load_proportional (needs loads)
    predictor: str = "none"  # none | oracle | previous | any moegps.predictors registry name
    window: int = checked(4, positive)  # batches per placement decision
    predictor_overlap: bool = False  # compute the forecast behind the previous batch's GEMMs
    dtype: str = checked("bfloat16", one_of("bfloat16", "float16", "float32"))  # bfloat16 | float16 | float32 (CPU runs use float32)
    device: str = checked("", device_rule)  # "" = cuda if available else cpu
    seed: int = checked(0, nonnegative)
    timeout_s: float = checked(300.0, positive)  # process-group timeout (every collective)
    out: str = "results/execute"  # rows/<run_id>.parquet, layers/<run_id>.parquet, config/<run_id>.json


def resolve_shape(cfg: ExecuteConfig) -> dict[str, int]:
    """H, F, E, k of the config: the named shape, overridden by any non-zero field."""
    if cfg.shape == "bundled":
        path = BUNDLED_MODELS / "mixtral-tiny" / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: bundled model not found (shape=bundled needs it)")
        c = json.loads(path.read_text())
        shape = dict(hidden=c["hidden_size"], ffn=c["intermediate_size"], n_experts=c["num_local_experts"],
                     top_k=c["num_experts_per_tok"])
    elif cfg.shape == "tiny":
        shape = dict(TINY)
    elif cfg.shape in shape_names():
        s = from_name(cfg.shape)
        shape = dict(hidden=s.hidden, ffn=s.expert_ffn, n_experts=s.n_experts, top_k=s.top_k)
    else:
        raise ValueError(f"config field 'shape' is {cfg.shape!r}, expected one of {shape_names() + ['bundled', 'tiny']}")
    for name in shape:
        if getattr(cfg, name):
            shape[name] = int(getattr(cfg, name))
    return shape


# ---- trace -> batches ------------------------------------------------------------------------------

@dataclass
class Batch:
    experts: np.ndarray  # [T, trace_layer, k] int64
    weights: np.ndarray  # [T, trace_layer, k] float32
    token_ids: np.ndarray  # [T]
    n_requests: int
    phase: int


def load_workload(cfg: ExecuteConfig, shape: dict[str, int]) -> TrainTest:
    """Training and test requests of the config's trace(s); a random skewed trace when none is named."""
    trace = cfg.trace
    if not trace and cfg.train is None:
        steps = cfg.max_batches + cfg.warmup
        trace = random_trace(np.random.default_rng(cfg.seed), n_requests=4 * cfg.batch_requests, prompt_len=(16, 64),
                             decode_steps=steps, n_layers=max(1, min(cfg.n_layers, 4)), n_experts=shape["n_experts"],
                             top_k=shape["top_k"], skew=1.0)
    data = train_test(trace=trace, train=cfg.train, test=cfg.test, test_fraction=cfg.test_fraction, seed=cfg.seed)
    m = data.meta
    if (m.n_experts, m.top_k) != (shape["n_experts"], shape["top_k"]):
        raise ValueError(
            f"trace {cfg.trace or cfg.test or '<random>'} has n_experts={m.n_experts}, top_k={m.top_k}; shape "
            f"{cfg.shape!r} needs n_experts={shape['n_experts']}, top_k={shape['top_k']} (pick a matching shape or trace)")
    return data


def make_batches(trace: RoutingTrace, phase: str, batch_requests: int, n: int) -> list[Batch]:
    """``n`` server batches of ``phase`` (cycled when the trace has fewer), group-major then step."""
    if phase not in ("decode", "prefill"):
        raise ValueError(f"config field 'phase' is {phase!r}, expected 'decode' or 'prefill'")
    tr = trace.by_token()
    requests, req_index = np.unique(tr.request_id, return_inverse=True)
    group = req_index // batch_requests
    want_prefill = phase == "prefill"
    is_prefill = tr.phase == PREFILL
    pick = is_prefill if want_prefill else ~is_prefill
    step = np.where(want_prefill, 0, tr.step)
    key = group.astype(np.int64) * (int(tr.step.max()) + 1) + step
    keys = np.unique(key[pick])
    if len(keys) == 0:
        raise ValueError(f"trace has no {phase} tokens")
    k = trace.meta.top_k
    weights = tr.weights if tr.weights is not None else np.full(tr.experts.shape, 1.0 / k, dtype=np.float32)
    batches = []
    for b in range(n):
        rows = np.flatnonzero(pick & (key == keys[b % len(keys)]))
        batches.append(Batch(tr.experts[rows].astype(np.int64), weights[rows].astype(np.float32),
                             tr.token_id[rows], len(np.unique(tr.request_id[rows])),
                             PREFILL if want_prefill else 1))
    return batches


def batch_loads(batch: Batch, n_experts: int) -> np.ndarray:
    """``[trace_layer, expert]`` counts of a batch's selections."""
    T, L, k = batch.experts.shape
    flat = (np.arange(L)[None, :, None] * n_experts + batch.experts).reshape(-1)
    return np.bincount(flat, minlength=L * n_experts).reshape(L, n_experts)


# ---- placement policies and predictors -------------------------------------------------------------

def make_placement(policy: str, loads: np.ndarray | None, n_layers: int, n_experts: int, n_gpus: int,
                   slots_per_gpu: int, fields: dict | None = None) -> Placement:
    """A Placement from the policy's name and config ``fields`` (:func:`moegps.placement.algorithms.place`)
    and ``loads [layer, expert]`` (None: no load information yet, so the contiguous placement)."""
    if loads is None:
        loads, policy, fields = np.ones((n_layers, n_experts)), "contiguous", {}
    loads = np.asarray(loads, dtype=np.float64)
    if policy == "prefill_aware" and loads.ndim == 2:
        loads = loads[None]
    try:
        return place(policy, loads, n_gpus, slots_per_gpu, **(fields or {}))
    except ValueError as e:
        raise ValueError(f"config field 'placement': {e}") from None


class Forecaster:
    """The predictor in the loop: ``forecast(past, next_batches) -> [layer, expert]`` fractions or None.

    ``none``: no forecast (the placement stays). ``oracle``: the true loads of the next window.
    ``previous``: the loads of the window just served (the maximum-likelihood distribution-only
    predictor of MoE-GPS). Other names: a ``moegps.predictors`` DistributionPredictor, fitted on the
    training requests (``train``), asked with ``predict_next(past_loads, BatchContext)``.
    """

    def __init__(self, name: str, train: RoutingTrace, window: int, model=None):
        self.name, self.window = name, window
        self.model = model.fit(train) if model is not None else None
        if name not in ("none", "oracle", "previous") and model is None:
            self.model = make(name).fit(train)

    def forecast(self, past: list[np.ndarray], past_phase: list[int], upcoming: list[Batch]) -> np.ndarray | None:
        if self.name == "none":
            return None
        if self.name == "oracle":
            loads = sum(batch_loads(b, self.n_experts(past, upcoming)) for b in upcoming)
            return _fractions(loads)
        if not past:
            return None
        if self.name == "previous":
            return _fractions(sum(past[-self.window:]))
        nxt = upcoming[0]
        ctx = BatchContext(phase=nxt.phase, n_tokens=len(nxt.token_ids), n_requests=nxt.n_requests,
                           token_ids=nxt.token_ids, past_phase=np.asarray(past_phase, dtype=np.int8))
        return np.asarray(self.model.predict_next(np.stack(past), ctx), dtype=np.float64)

    @staticmethod
    def n_experts(past, upcoming) -> int:
        return int(max(b.experts.max() for b in upcoming)) + 1 if not past else past[0].shape[-1]


def _fractions(loads: np.ndarray) -> np.ndarray:
    loads = np.asarray(loads, dtype=np.float64)
    return loads / np.maximum(loads.sum(-1, keepdims=True), 1)


# ---- the run ---------------------------------------------------------------------------------------

def _dtype(cfg: ExecuteConfig, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32  # CPU bf16 matmuls are slow and gloo reductions upcast anyway
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]


def _trace_content(cfg: ExecuteConfig) -> str:
    """Content fingerprints of the traces the run read (rows say what produced them, not only a path)."""
    parts = {"train": cfg.train, "test": cfg.test} if cfg.train is not None else {"trace": cfg.trace}
    return ",".join(f"{k}:{fingerprint(v) if v else 'random'}" for k, v in parts.items())


def _stack_layer(trace_layer_count: int, layer: int) -> int:
    return layer % trace_layer_count


def run(cfg: ExecuteConfig, comm: xdist.Comm | None = None, write: bool = True,
        predictor=None) -> tuple[dict[str, Any], list[dict]]:
    """Run one configuration; returns (results row, per-layer rows). Rank 0 writes them under ``cfg.out``.

    ``predictor``: an unfitted DistributionPredictor object (e.g. instantiated by hydra) used under
    the name ``cfg.predictor``; None = make it from ``cfg.predictor`` by registry name.
    """
    check_schema(cfg, "executor")
    comm = comm or xdist.init(timeout_s=cfg.timeout_s, device=cfg.device or None)
    dev = comm.device
    dtype = _dtype(cfg, dev)
    shape = resolve_shape(cfg)
    H, E, k = shape["hidden"], shape["n_experts"], shape["top_k"]
    G, L = comm.world, cfg.n_layers
    data = load_workload(cfg, shape)
    LT = data.meta.n_layers
    batches = make_batches(data.test, cfg.phase, cfg.batch_requests, cfg.warmup + cfg.max_batches)
    slots = math.ceil(E / G) + cfg.extra_slots

    # initial placement: the policy on the training requests' loads (a static profile) unless a predictor decides
    train_loads = data.train.loads(by="all").counts[0]
    init_loads = None if cfg.predictor != "none" else _fractions(train_loads)
    placement = _stack_placement(cfg.placement, init_loads, L, LT, E, G, slots, cfg.split, cfg.placement_fields)
    layers = _build_layers(cfg, comm, placement, shape, dtype)

    # inputs drawn before timing: this rank's tokens of every batch
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + comm.rank)
    inputs = []
    for b in batches:
        rows = np.array_split(np.arange(len(b.token_ids)), G)[comm.rank] if cfg.parallel == "ep" else \
            np.arange(len(b.token_ids))
        x = torch.randn(len(rows), H, generator=gen).to(dev, dtype)
        ids = [torch.as_tensor(b.experts[rows, _stack_layer(LT, l)], device=dev) for l in range(L)]
        w = [torch.as_tensor(b.weights[rows, _stack_layer(LT, l)], device=dev).to(dtype) for l in range(L)]
        inputs.append((x, ids, w))

    forecaster = Forecaster(cfg.predictor, data.train, cfg.window, predictor)
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    per_layer = np.zeros((L, 3))  # dispatch, expert, combine ms (this rank, timed batches)
    gpu_tokens = np.zeros((L, G))  # assignments per GPU, timed batches, from the routing
    imbalances, stats = [], LayerStats()
    moe_ms = predictor_ms = predictor_latency_ms = policy_ms = migration_ms = 0.0
    bytes_migrated = migrations = 0
    accuracy = []
    past, past_phase, pending = [], [], None
    if cfg.warm_all:  # Triton specialises on token counts: compile every variant before any timing
        for x, ids, w in inputs[cfg.warmup:]:
            for l, layer in enumerate(layers):
                layer(x, ids[l], w[l])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    for i, batch in enumerate(batches):
        timed = i >= cfg.warmup
        t = i - cfg.warmup  # index among timed batches
        # -- placement decision for the window starting here
        if timed and t > 0 and t % cfg.window == 0 and cfg.predictor != "none":
            if pending is None:  # critical path: forecast now
                t0 = time.perf_counter()
                pending = forecaster.forecast(past, past_phase, batches[i:i + cfg.window])
                lat = (time.perf_counter() - t0) * 1e3
                predictor_latency_ms += lat
                predictor_ms += lat
            if pending is not None:
                true = _fractions(sum(batch_loads(b, E) for b in batches[i:i + cfg.window]))
                accuracy.append(1 - 0.5 * np.abs(pending - true).sum(-1).mean())
                t0 = time.perf_counter()
                new = _stack_placement(cfg.placement, pending, L, LT, E, G, slots, cfg.split, cfg.placement_fields)
                policy_ms += (time.perf_counter() - t0) * 1e3
                if cfg.parallel == "ep":
                    for l, layer in enumerate(layers):
                        st = migrate(layer, new.slot_expert[l], new.replica_share[l])
                        migration_ms += st.ms
                        bytes_migrated += st.bytes_migrated
                    placement = new
                    migrations += 1
            pending = None
        # -- the batch
        x, ids, w = inputs[i]
        timers = [PhaseTimer(dev) for _ in range(L)]
        batch_stats = LayerStats() if timed else None
        comm.barrier()
        start = PhaseTimer(dev)
        start.mark("start")
        for l, layer in enumerate(layers):
            layer(x, ids[l], w[l], timers[l], batch_stats)
        start.mark("batch")
        # -- overlapped forecast for the next window, while the GPU drains this batch
        nxt = t + 1
        if (timed and cfg.predictor != "none" and cfg.predictor_overlap and nxt % cfg.window == 0
                and i + 1 < len(batches)):
            pending, lat, exposed = _overlapped(lambda: forecaster.forecast(past + [batch_loads(batch, E)],
                                                                            past_phase + [batch.phase],
                                                                            batches[i + 1:i + 1 + cfg.window]),
                                                dev, side)
            predictor_latency_ms += lat
            predictor_ms += exposed
        if not timed:
            start.durations()
            continue
        past.append(batch_loads(batch, E))
        past_phase.append(batch.phase)
        moe_ms += comm.max_over_ranks(start.durations()["batch"])
        for l in range(L):
            d = timers[l].durations()
            per_layer[l] += [d.get("dispatch", 0.0), d.get("expert", 0.0), d.get("combine", 0.0)]
        stats.bytes_sent += batch_stats.bytes_sent
        tok = _tokens_per_gpu(batch, placement, cfg.parallel, G, LT) if cfg.parallel == "ep" else \
            np.full((L, G), len(batch.token_ids) * k / G)
        gpu_tokens += tok
        imbalances.append(float(np.mean(tok.max(1) / np.maximum(tok.mean(1), 1e-9))))

    # -- reduce over ranks and write
    per_layer_max = np.array([[comm.max_over_ranks(v) for v in row] for row in per_layer])
    bytes_a2a = comm.sum_over_ranks(stats.bytes_sent)
    n_tokens = sum(len(b.token_ids) for b in batches[cfg.warmup:])
    device = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({comm.backend})") + f" x{G}"
    config = {**dataclasses.asdict(cfg), "trace_content": _trace_content(cfg), "world_size": G, **{f"resolved_{k_}": v for k_, v in shape.items()},
              "slots_per_gpu": slots}
    row = make_row(
        config, backend="exec", device=device, moe_ms=moe_ms, dispatch_ms=per_layer_max[:, 0].sum(),
        expert_ms=per_layer_max[:, 1].sum(), combine_ms=per_layer_max[:, 2].sum(), predictor_ms=predictor_ms,
        migration_ms=migration_ms, other_ms=policy_ms, total_ms=moe_ms + predictor_ms + migration_ms + policy_ms,
        imbalance=float(np.mean(imbalances)) if imbalances else float("nan"), tokens=n_tokens,
        bytes_all_to_all=bytes_a2a, bytes_migrated=bytes_migrated,
        predictor_accuracy=float(np.mean(accuracy)) if accuracy else float("nan"),
        predictor_error=float(1 - np.mean(accuracy)) if accuracy else float("nan"),
    )
    layer_rows = [dict(run_id=row["run_id"], layer=l, dispatch_ms=per_layer_max[l, 0], expert_ms=per_layer_max[l, 1],
                       combine_ms=per_layer_max[l, 2], tokens_max_gpu=float(gpu_tokens[l].max()),
                       tokens_mean_gpu=float(gpu_tokens[l].mean()), predictor_latency_ms=predictor_latency_ms,
                       migrations=migrations)
                  for l in range(L)]
    if write and comm.rank == 0:
        out = Path(cfg.out)
        write_rows([row], out / "rows" / f"{row['run_id']}.parquet")
        write_rows(layer_rows, out / "layers" / f"{row['run_id']}.parquet")
        (out / "config").mkdir(parents=True, exist_ok=True)
        (out / "config" / f"{row['run_id']}.json").write_text(json.dumps(config, indent=1, default=str))
    return row, layer_rows


def _stack_placement(policy, loads, L, LT, E, G, slots, split="even", fields=None) -> Placement:
    """Placement for the L-layer stack from trace-layer loads ``[LT, E]`` (layer l uses trace layer l % LT)."""
    stack_loads = None if loads is None else np.asarray(loads)[[_stack_layer(LT, l) for l in range(L)]]
    placement = make_placement(policy, stack_loads, L, E, G, slots, fields)
    if split == "load_proportional" and stack_loads is not None:
        placement = load_proportional(placement, stack_loads)
    elif split not in ("even", "load_proportional"):
        raise ValueError(f"config field 'split' is {split!r}, expected 'even' or 'load_proportional'")
    return placement


def _build_layers(cfg, comm, placement: Placement, shape, dtype):
    H, Fd, E = shape["hidden"], shape["ffn"], shape["n_experts"]
    layers = []
    for l in range(cfg.n_layers):
        if cfg.parallel == "ep":
            gu, down = slot_weights(placement.slot_expert[l, comm.rank], l, H, Fd, dtype, comm.device, cfg.seed)
            layers.append(ExpertParallelMoE(comm, placement.slot_expert[l], placement.replica_share[l], E, gu, down))
        elif cfg.parallel == "tp":
            full = [expert_weights(l, e, H, Fd, dtype, comm.device, cfg.seed) for e in range(E)]
            gu, down = tp_shard(torch.stack([f[0] for f in full]), torch.stack([f[1] for f in full]),
                                comm.rank, comm.world)
            del full
            layers.append(TensorParallelMoE(comm, gu, down))
        else:
            raise ValueError(f"config field 'parallel' is {cfg.parallel!r}, expected 'ep' or 'tp'")
    return layers


def _tokens_per_gpu(batch: Batch, placement: Placement, parallel: str, G: int, LT: int) -> np.ndarray:
    """``[layer, gpu]`` assignments each GPU computes in this batch, by the same split rule the layers use."""
    L = placement.n_layers
    out = np.zeros((L, G))
    chunks = np.array_split(np.arange(len(batch.token_ids)), G)
    for l in range(L):
        phys, cum, count = (torch.as_tensor(a) for a in replica_tables(
            placement.slot_expert[l], placement.replica_share[l], placement.n_experts))
        for rows in chunks:
            ids = torch.as_tensor(batch.experts[rows, _stack_layer(LT, l)])
            p = choose_slots(ids, phys, cum, count).numpy().reshape(-1)
            out[l] += np.bincount(p // placement.slots_per_gpu, minlength=G)
    return out


def _overlapped(fn, dev: torch.device, side) -> tuple[Any, float, float]:
    """Run host function ``fn`` while the GPU drains its queue; ``(result, latency_ms, exposed_ms)``.

    Exposed time is how long ``fn`` ran past the moment the GPU finished the queued work (measured by
    a helper thread blocked on an event), i.e. what it added to the critical path.
    """
    if dev.type != "cuda":
        t0 = time.perf_counter()
        result = fn()
        lat = (time.perf_counter() - t0) * 1e3
        return result, lat, lat
    done = torch.cuda.Event()
    done.record()
    finished = {}

    def wait():
        done.synchronize()  # releases the GIL while waiting
        finished["t"] = time.perf_counter()

    waiter = threading.Thread(target=wait)
    t0 = time.perf_counter()
    waiter.start()
    with torch.cuda.stream(side):
        result = fn()
    t1 = time.perf_counter()
    waiter.join()
    return result, (t1 - t0) * 1e3, max(0.0, t1 - max(t0, finished["t"])) * 1e3
