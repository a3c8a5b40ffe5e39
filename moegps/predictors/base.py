"""The two predictor protocols, what they are given at run time, and what they cost.

Distribution-only predictors answer *what share of the next batch's top-k selections will each
expert get, per layer?* Token-to-expert predictors answer *which k experts will this token pick at
this layer?* Both are fitted on a training trace (``fit(train) -> self``) and report their own
cost, because MoE-GPS's point is that a predictor's overhead decides whether its accuracy pays.

Run-time inputs
---------------
``DistributionPredictor.predict_next(past_loads, context) -> [layer, expert]`` fractions:

- ``past_loads``: ``[t, layer, expert]`` counts of the batches already served, oldest first
  (what a server's expert-load counters hold). ``context.past_phase`` ``[t]`` says which phase
  each past batch was; recent-history predictors look only at past batches of the next batch's phase.
- ``context``: a :class:`BatchContext` describing the next batch as the scheduler knows it
  before any layer runs: phase, number of tokens and requests, the token ids being fed in, and
  (decode only) the routing counts of each batch request's own prefill.

``TokenPredictor.predict(tokens) -> [token, layer, k]`` expert ids from a :class:`TokenBatch`:
token id, position, phase, the previous ``window`` token ids of the same request, and optionally
``routed`` (the true experts of the layers already run; a predictor for layer ``l`` may read
only ``routed[:, l - 1]``, which exists once layer ``l-1``'s router has run, i.e. before layer
``l``'s attention). Which fields each predictor reads is listed in its ``cost().inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from ..trace import RoutingTrace


@dataclass
class PredictorCost:
    """What one prediction costs; the simulator turns this into time.

    FLOPs and bytes are counted analytically: a call on a batch of ``n`` tokens costs
    ``flops_per_batch + n * flops_per_token`` FLOPs and reads ``bytes_per_batch + n * bytes_per_token``
    bytes (parameters and table rows; see :meth:`flops_for`, :meth:`bytes_for`).
    ``bytes_per_prediction`` is the bytes of one call on a one-token batch.
    ``latency_s`` maps a batch size in tokens to the measured median seconds of one call on this
    CPU (filled by :func:`moegps.predictors.bench.measure_latency` or the evaluation);
    ``gpu_latency_s`` likewise on CUDA, ``None`` where not measured.
    """

    name: str
    family: str  # "distribution" | "token"
    flops_per_token: float = 0.0
    flops_per_batch: float = 0.0
    bytes_per_token: float = 0.0
    bytes_per_batch: float = 0.0
    memory_bytes: int = 0  # fitted state size
    runs_before_attention: bool = False  # can its answer be known before the layer's attention?
    on_critical_path: bool = False  # must the forward pass wait for it (not hidable behind GEMMs)?
    inputs: tuple[str, ...] = ()  # run-time inputs it reads (BatchContext / TokenBatch field names)
    latency_s: dict[int, float] = field(default_factory=dict)
    gpu_latency_s: dict[int, float] | None = None

    @property
    def bytes_per_prediction(self) -> float:
        return self.bytes_per_batch + self.bytes_per_token

    def flops_for(self, n_tokens: int) -> float:
        return self.flops_per_batch + n_tokens * self.flops_per_token

    def bytes_for(self, n_tokens: int) -> float:
        return self.bytes_per_batch + n_tokens * self.bytes_per_token

    def as_row(self) -> dict[str, Any]:
        return {
            "flops_per_token": self.flops_per_token,
            "flops_per_batch": self.flops_per_batch,
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_batch": self.bytes_per_batch,
            "bytes_per_prediction": self.bytes_per_prediction,
            "memory_bytes": self.memory_bytes,
            "runs_before_attention": self.runs_before_attention,
            "on_critical_path": self.on_critical_path,
            "inputs": ",".join(self.inputs),
        }


@dataclass
class TokenBatch:
    """Tokens to predict, ``[token]`` arrays (``context_ids`` ``[token, window]``, -1 = none).

    ``routed`` ``[token, layer, k]`` holds true experts of layers already run (cross-layer
    predictors read ``routed[:, l-1]`` for layer ``l`` only); ``None`` where not available.
    ``hidden`` ``[token, layer, d]`` low-dimensional hidden-state features; traces do not carry
    them yet, so it is always ``None`` today and predictors that could use it skip it.
    """

    token_id: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    request_id: np.ndarray | None = None
    context_ids: np.ndarray | None = None
    routed: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.token_id)

    def select(self, index: np.ndarray) -> "TokenBatch":
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return TokenBatch(
            token_id=self.token_id[index], position=self.position[index], phase=self.phase[index],
            request_id=pick(self.request_id), context_ids=pick(self.context_ids),
            routed=pick(self.routed), hidden=pick(self.hidden),
        )


@dataclass
class BatchContext:
    """The next batch as a scheduler knows it before it runs.

    ``phase``: 0 prefill / 1 decode. ``token_ids``: ``[n_tokens]`` ids fed in (prefill: the
    prompts; decode: each request's last token). ``past_phase``: ``[t]`` phase of each past batch
    in ``past_loads`` (``None``: all of ``phase``). ``request_prefill_loads``: ``[request, layer,
    expert]`` counts of each batch request's own prefill (decode batches; ``None`` if unknown).
    ``tokens``: the full :class:`TokenBatch`, for distribution-from-token predictors.
    ``steps``: ``[n_tokens]`` generation step of each token (0 = prefill, s = s-th decode step;
    a scheduler knows it for every request), ``None`` if unknown.
    """

    phase: int
    n_tokens: int
    n_requests: int = 1
    token_ids: np.ndarray | None = None
    past_phase: np.ndarray | None = None
    request_prefill_loads: np.ndarray | None = None
    tokens: TokenBatch | None = None
    steps: np.ndarray | None = None


@runtime_checkable
class DistributionPredictor(Protocol):
    name: str
    n_layers: int
    n_experts: int

    def fit(self, train: RoutingTrace) -> "DistributionPredictor": ...

    def predict_next(self, past_loads: np.ndarray, context: BatchContext) -> np.ndarray:
        """``[layer, expert]`` float64 fractions of the next batch's selections (rows sum to 1)."""
        ...

    def cost(self) -> PredictorCost: ...


@runtime_checkable
class TokenPredictor(Protocol):
    name: str
    n_layers: int
    n_experts: int
    top_k: int

    def fit(self, train: RoutingTrace) -> "TokenPredictor": ...

    def predict(self, tokens: TokenBatch) -> np.ndarray:
        """``[token, layer, k]`` int16 predicted expert ids (distinct per row)."""
        ...

    def cost(self) -> PredictorCost: ...


# ---- registry ------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def make(name: str, **kwargs) -> DistributionPredictor | TokenPredictor:
    """A predictor by registry name, e.g. ``make("ema", decay=0.5)``; see ``moegps.predictors.REGISTRY``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown predictor {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


# ---- small shared helpers ------------------------------------------------------------------


def top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """``[..., expert]`` scores -> ``[..., k]`` int16 ids of the k largest, best first (ties: lower id)."""
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(scores, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1).astype(np.int16)


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to sum to 1 (uniform where a row sums to 0); float64."""
    x = np.asarray(x, dtype=np.float64)
    s = x.sum(axis=axis, keepdims=True)
    n = x.shape[axis]
    return np.where(s > 0, x / np.where(s > 0, s, 1), 1.0 / n)


class Vocab:
    """Maps raw ids (token ids, positions) to dense indices 1..n; 0 = unseen (the fallback row)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids) + 1

    def index(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[at] == ids, at + 1, 0)


def expert_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """``[..., k]`` ids -> ``[..., n_experts]`` 0/1 multi-hot (int64 counts if ids repeat)."""
    out = np.zeros(experts.shape[:-1] + (n_experts,), dtype=np.int64)
    np.put_along_axis(out, experts.astype(np.int64), 1, axis=-1)
    return out
