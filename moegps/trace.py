"""RoutingTrace: the one record every moegps stage shares, and expert-load matrices derived from it.

A trace holds one row per (token, MoE layer): which ``top_k`` experts the router chose, in router
order, and optionally their gate weights. It is stored as parquet, with its metadata (model,
expert counts, how it was recorded) as JSON in the file's key-value metadata under ``moegps.trace``.

Columns (numpy dtypes in memory; parquet types on disk):

===========  =========================  =====================================================
request_id   int64                      one id per prompt/request, unique within a trace
step         int32                      0 = prefill, k = k-th decode step
phase        int8                       PREFILL (0) or DECODE (1)
position     int32                      position of the token in its sequence (0-based)
token_id     int32                      tokenizer id of the token, -1 when unknown
layer        int16                      MoE-layer index 0..n_layers-1 (``meta.layer_ids`` maps
                                        it to the model's layer number)
experts      [rows, top_k] int16        chosen experts, router order (fixed_size_list on disk)
weights      [rows, top_k] float32      gate weights, optional (absent: ``None``)
===========  =========================  =====================================================

Everything is read with pyarrow straight into numpy: no Python loop per row, so ten million rows
load in a second or two (``benchmarks/trace_io.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_path

PREFILL = 0
DECODE = 1
PHASES = {"prefill": PREFILL, "decode": DECODE}
META_KEY = b"moegps.trace"
FORMAT_VERSION = 1

Phase = Literal["prefill", "decode", "all"] | None


class TraceError(ValueError):
    """A file or array that is not a valid RoutingTrace; the message names the file and the field."""


@dataclass
class TraceMeta:
    """What a trace is of and how it was recorded. Stored as JSON in the parquet footer."""

    model: str
    n_layers: int
    n_experts: int
    top_k: int
    layer_ids: list[int] = field(default_factory=list)  # model layer number of each MoE layer
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""
    dataset: str = ""
    source: str = ""  # e.g. "collect", "import:deepseek-csv", "reconstructed:olmoe-routing"
    recorded: dict[str, Any] = field(default_factory=dict)  # device, dtype, batch size, date, commit
    notes: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not self.layer_ids:
            self.layer_ids = list(range(self.n_layers))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "<memory>") -> "TraceMeta":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: metadata 'moegps.trace' is not valid JSON ({e})") from None
        missing = [k for k in ("model", "n_layers", "n_experts", "top_k") if k not in raw]
        if missing:
            raise TraceError(f"{where}: metadata 'moegps.trace' lacks field(s) {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in raw.items() if k not in known}
        meta = cls(**{k: v for k, v in raw.items() if k in known})
        if extra:  # keep fields written by newer versions rather than dropping them silently
            meta.recorded = {**meta.recorded, "unknown_fields": extra}
        for name in ("n_layers", "n_experts", "top_k"):
            value = getattr(meta, name)
            if not isinstance(value, int) or value <= 0:
                raise TraceError(f"{where}: metadata field '{name}' is {value!r}, expected a positive int")
        if meta.top_k > meta.n_experts:
            raise TraceError(f"{where}: metadata top_k={meta.top_k} exceeds n_experts={meta.n_experts}")
        if len(meta.layer_ids) != meta.n_layers:
            raise TraceError(
                f"{where}: metadata 'layer_ids' has {len(meta.layer_ids)} entries, expected n_layers={meta.n_layers}"
            )
        return meta


# name -> (numpy dtype in memory, arrow type on disk, required)
_SCALAR_COLUMNS: dict[str, tuple[np.dtype, pa.DataType]] = {
    "request_id": (np.dtype(np.int64), pa.int64()),
    "step": (np.dtype(np.int32), pa.int32()),
    "phase": (np.dtype(np.int8), pa.int8()),
    "position": (np.dtype(np.int32), pa.int32()),
    "token_id": (np.dtype(np.int32), pa.int32()),
    "layer": (np.dtype(np.int16), pa.int16()),
}


@dataclass
class ExpertLoads:
    """Expert-load counts ``counts[group, layer, expert]`` (number of top-k selections).

    ``groups`` holds one array per key field, each ``[group]`` (e.g. ``{"step": ..., "phase": ...}``
    or ``{"domain": np.array(["arxiv", ...])}``). ``aggregate`` is True for loads that come from
    counts without token order (e.g. the OLMoE-paper routing statistics): they are real load
    vectors, but nothing about sequences or batches can be derived from them.
    """

    counts: np.ndarray  # [group, layer, expert] int64
    groups: dict[str, np.ndarray]
    layer_ids: list[int]
    top_k: int
    source: str = ""
    aggregate: bool = False

    @property
    def fractions(self) -> np.ndarray:
        """``[group, layer, expert]`` float64: each layer's share of selections per expert (sums to 1)."""
        total = self.counts.sum(axis=-1, keepdims=True)
        return self.counts / np.maximum(total, 1)

    def imbalance(self) -> np.ndarray:
        """``[group, layer]`` max/mean expert load (1.0 = perfectly even; 0 where a layer saw nothing)."""
        mean = self.counts.mean(axis=-1)
        return np.where(mean > 0, self.counts.max(axis=-1) / np.maximum(mean, 1e-300), 0.0)

    def total(self) -> np.ndarray:
        """``[layer, expert]`` counts summed over groups."""
        return self.counts.sum(axis=0)


@dataclass
class TokenRouting:
    """Token-major view of a trace: ``experts[token, layer, k]``, one row per token (all layers).

    Keys are ``[token]`` arrays; tokens are ordered by (request_id, step, position).
    """

    request_id: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    experts: np.ndarray  # [token, layer, k] int16
    weights: np.ndarray | None  # [token, layer, k] float32


@dataclass
class RoutingTrace:
    """A routing trace in memory: metadata plus one numpy array per column (see module docstring)."""

    meta: TraceMeta
    request_id: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    layer: np.ndarray
    experts: np.ndarray  # [rows, top_k]
    weights: np.ndarray | None = None  # [rows, top_k]

    # ---- construction -------------------------------------------------------------------
    def __post_init__(self):
        for name, (dtype, _) in _SCALAR_COLUMNS.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        self.experts = np.ascontiguousarray(self.experts, dtype=np.int16)
        if self.weights is not None:
            self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)

    @classmethod
    def concat(cls, traces: Iterable["RoutingTrace"], meta: TraceMeta | None = None) -> "RoutingTrace":
        """Join traces row-wise; they must agree on the shape fields of their metadata."""
        traces = list(traces)
        if not traces:
            raise TraceError("concat: no traces given")
        meta = meta or traces[0].meta
        for t in traces:
            for name in ("n_layers", "n_experts", "top_k"):
                if getattr(t.meta, name) != getattr(meta, name):
                    raise TraceError(
                        f"concat: trace of '{t.meta.model}' has {name}={getattr(t.meta, name)}, "
                        f"expected {getattr(meta, name)}"
                    )
        has_weights = all(t.weights is not None for t in traces)
        cols = {n: np.concatenate([getattr(t, n) for t in traces]) for n in _SCALAR_COLUMNS}
        return cls(
            meta=meta,
            experts=np.concatenate([t.experts for t in traces]),
            weights=np.concatenate([t.weights for t in traces]) if has_weights else None,
            **cols,
        )

    def __len__(self) -> int:
        return len(self.layer)

    def select(self, mask: np.ndarray) -> "RoutingTrace":
        """Rows where ``mask`` (bool ``[rows]`` or integer index) holds, as a new trace."""
        cols = {n: getattr(self, n)[mask] for n in _SCALAR_COLUMNS}
        w = None if self.weights is None else self.weights[mask]
        return RoutingTrace(meta=self.meta, experts=self.experts[mask], weights=w, **cols)

    def phase_mask(self, phase: Phase) -> np.ndarray:
        if phase in (None, "all"):
            return np.ones(len(self), dtype=bool)
        if phase not in PHASES:
            raise TraceError(f"phase must be 'prefill', 'decode' or 'all', got {phase!r}")
        return self.phase == PHASES[phase]

    def requests(self) -> np.ndarray:
        """Sorted unique request ids."""
        return np.unique(self.request_id)

    def with_requests(self, request_ids: np.ndarray) -> "RoutingTrace":
        return self.select(np.isin(self.request_id, request_ids))

    @property
    def n_tokens(self) -> int:
        """Number of (request, step, position) tokens, counting each once across layers."""
        return int(np.count_nonzero(self.layer == 0)) if len(self) else 0

    # ---- validation ---------------------------------------------------------------------
    def validate(self, where: str = "<memory>") -> "RoutingTrace":
        """Check shapes and value ranges; raise :class:`TraceError` naming ``where`` and the field."""
        m = self.meta
        n = len(self.layer)
        for name in _SCALAR_COLUMNS:
            if getattr(self, name).shape != (n,):
                raise TraceError(f"{where}: column '{name}' has shape {getattr(self, name).shape}, expected ({n},)")
        if self.experts.shape != (n, m.top_k):
            raise TraceError(
                f"{where}: column 'experts' has shape {self.experts.shape}, expected ({n}, top_k={m.top_k})"
            )
        if self.weights is not None and self.weights.shape != (n, m.top_k):
            raise TraceError(
                f"{where}: column 'weights' has shape {self.weights.shape}, expected ({n}, top_k={m.top_k})"
            )
        if n == 0:
            return self
        _check_range(where, "experts", self.experts, 0, m.n_experts - 1, f"0 <= id < n_experts={m.n_experts}")
        _check_range(where, "layer", self.layer, 0, m.n_layers - 1, f"0 <= layer < n_layers={m.n_layers}")
        _check_range(where, "phase", self.phase, 0, 1, "0 (prefill) or 1 (decode)")
        _check_range(where, "step", self.step, 0, None, "step >= 0")
        _check_range(where, "position", self.position, 0, None, "position >= 0")
        _check_range(where, "token_id", self.token_id, -1, None, "token_id >= -1 (-1 = unknown)")
        bad = (self.phase == PREFILL) != (self.step == 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise TraceError(
                f"{where}: row {row} has phase={self.phase[row]} with step={self.step[row]}; "
                "expected phase 0 (prefill) exactly when step == 0"
            )
        if m.top_k > 1:
            s = np.sort(self.experts, axis=1)
            dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if dup.any():
                row = int(np.argmax(dup))
                raise TraceError(
                    f"{where}: column 'experts' repeats an expert within row {row} ({self.experts[row].tolist()}); "
                    "a router's top-k ids are distinct"
                )
        if self.weights is not None and not np.isfinite(self.weights).all():
            row = int(np.argmax(~np.isfinite(self.weights).all(axis=1)))
            raise TraceError(f"{where}: column 'weights' is not finite at row {row}")
        return self

    # ---- parquet I/O --------------------------------------------------------------------
    def to_arrow(self) -> pa.Table:
        arrays = {n: pa.array(getattr(self, n), type=t) for n, (_, t) in _SCALAR_COLUMNS.items()}
        k = self.meta.top_k
        arrays["experts"] = pa.FixedSizeListArray.from_arrays(pa.array(self.experts.reshape(-1), pa.int16()), k)
        if self.weights is not None:
            arrays["weights"] = pa.FixedSizeListArray.from_arrays(
                pa.array(self.weights.reshape(-1), pa.float32()), k
            )
        table = pa.table(arrays)
        return table.replace_schema_metadata({META_KEY: self.meta.to_json().encode()})

    def write(self, path: str | os.PathLike, row_group_size: int = 1 << 20) -> Path:
        """Validate, then write atomically: a temporary file in the same folder, renamed into place."""
        path = Path(path)
        self.validate(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.to_arrow()
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RoutingTrace":
        """Read a trace file, or a folder of trace shards (``*.parquet``, concatenated in name order)."""
        path = Path(path)
        if path.is_dir():
            shards = sorted(path.glob("*.parquet"))
            if not shards:
                raise TraceError(f"{path}: folder holds no *.parquet trace shards")
            traces = [cls.read(s) for s in shards]
            return cls.concat(traces).validate(str(path)) if len(traces) > 1 else traces[0]
        if not path.exists():
            raise TraceError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise TraceError(f"{path}: not a parquet file ({e})") from None
        return cls.from_arrow(table, where=str(path))

    @classmethod
    def from_arrow(cls, table: pa.Table, where: str = "<memory>") -> "RoutingTrace":
        md = table.schema.metadata or {}
        if META_KEY not in md:
            raise TraceError(
                f"{where}: not a moegps RoutingTrace: the parquet key-value metadata has no 'moegps.trace' entry"
            )
        meta = TraceMeta.from_json(md[META_KEY], where)
        cols = {}
        for name, (dtype, _) in _SCALAR_COLUMNS.items():
            cols[name] = _int_column(table, name, dtype, where)
        experts = _list_column(table, "experts", meta.top_k, where, integer=True)
        weights = _list_column(table, "weights", meta.top_k, where, integer=False) if "weights" in table.column_names else None
        return cls(meta=meta, experts=experts, weights=weights, **cols).validate(where)

    # ---- derived views ------------------------------------------------------------------
    def loads(self, by: Literal["step", "request", "request_step", "all"] = "step", phase: Phase = None) -> ExpertLoads:
        """Expert-load counts ``[group, layer, expert]`` grouped ``by``:

        - ``"step"``: one group per (step) across all requests: the load a server batching all
          requests in lock-step would see (step 0 = every prefill);
        - ``"request"``: one group per request (its prefill and decode together unless ``phase``);
        - ``"request_step"``: one group per (request, step);
        - ``"all"``: a single group.
        ``phase`` restricts rows to ``"prefill"`` or ``"decode"`` first.
        """
        t = self if phase in (None, "all") else self.select(self.phase_mask(phase))
        m = self.meta
        if by == "all":
            keys = {}
            group = np.zeros(len(t), dtype=np.int64)
            n_groups = 1
        else:
            fields = {"step": ["step"], "request": ["request_id"], "request_step": ["request_id", "step"]}
            if by not in fields:
                raise TraceError(f"loads(by=...) must be 'step', 'request', 'request_step' or 'all', got {by!r}")
            key_cols = [getattr(t, f) for f in fields[by]]
            if len(key_cols) == 1:
                uniq, group = np.unique(key_cols[0], return_inverse=True)
                keys = {fields[by][0]: uniq}
            else:
                stacked = np.stack([c.astype(np.int64) for c in key_cols], axis=1)
                uniq, group = np.unique(stacked, axis=0, return_inverse=True)
                group = group.reshape(-1)
                keys = {f: uniq[:, i] for i, f in enumerate(fields[by])}
            n_groups = len(next(iter(keys.values())))
        flat = (group[:, None] * m.n_layers + t.layer[:, None].astype(np.int64)) * m.n_experts + t.experts
        counts = np.bincount(flat.reshape(-1), minlength=n_groups * m.n_layers * m.n_experts)
        return ExpertLoads(
            counts=counts.reshape(n_groups, m.n_layers, m.n_experts),
            groups=keys,
            layer_ids=list(m.layer_ids),
            top_k=m.top_k,
            source=f"{m.model} ({m.source})",
        )

    def by_token(self) -> TokenRouting:
        """Token-major view ``experts[token, layer, k]``; every token must have a row at every layer."""
        L = self.meta.n_layers
        order = np.lexsort((self.layer, self.position, self.step, self.request_id))
        n = len(order)
        if n % L:
            raise TraceError(f"by_token: {n} rows is not a multiple of n_layers={L}; some token lacks a layer")
        first = order[::L]
        layers = self.layer[order].reshape(-1, L)
        if not (layers == np.arange(L, dtype=layers.dtype)).all():
            raise TraceError("by_token: some token lacks a row for some layer (or has two)")
        k = self.meta.top_k
        return TokenRouting(
            request_id=self.request_id[first],
            step=self.step[first],
            phase=self.phase[first],
            position=self.position[first],
            token_id=self.token_id[first],
            experts=self.experts[order].reshape(-1, L, k),
            weights=None if self.weights is None else self.weights[order].reshape(-1, L, k),
        )

    @classmethod
    def from_token_major(
        cls,
        meta: TraceMeta,
        request_id: np.ndarray,
        step: np.ndarray,
        position: np.ndarray,
        token_id: np.ndarray,
        experts: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> "RoutingTrace":
        """Build a trace from ``[token]`` keys and ``experts[token, layer, k]`` (phase from step)."""
        T, L, k = experts.shape
        rep = lambda a: np.repeat(np.asarray(a), L)  # noqa: E731
        return cls(
            meta=meta,
            request_id=rep(request_id),
            step=rep(step),
            phase=rep((np.asarray(step) > 0).astype(np.int8)),
            position=rep(position),
            token_id=rep(token_id),
            layer=np.tile(np.arange(L), T),
            experts=experts.reshape(T * L, k),
            weights=None if weights is None else weights.reshape(T * L, k),
        )


# ---- helpers ------------------------------------------------------------------------------


def _check_range(where: str, name: str, values: np.ndarray, lo: int | None, hi: int | None, expected: str):
    bad = np.zeros(values.shape, dtype=bool)
    if lo is not None:
        bad |= values < lo
    if hi is not None:
        bad |= values > hi
    if bad.any():
        flat = int(np.argmax(bad.reshape(len(values), -1).any(axis=1)))
        value = values[flat].tolist()
        raise TraceError(f"{where}: column '{name}' holds {value} at row {flat}, expected {expected}")


def _int_column(table: pa.Table, name: str, dtype: np.dtype, where: str) -> np.ndarray:
    if name not in table.column_names:
        raise TraceError(f"{where}: missing column '{name}' (expected an integer column)")
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise TraceError(f"{where}: column '{name}' has type {col.type}, expected an integer type")
    if col.null_count:
        raise TraceError(f"{where}: column '{name}' has {col.null_count} null value(s)")
    arr = col.to_numpy()
    out = arr.astype(dtype)
    if not np.array_equal(out, arr):
        raise TraceError(f"{where}: column '{name}' has values that do not fit {dtype}")
    return out


def _list_column(table: pa.Table, name: str, k: int, where: str, integer: bool) -> np.ndarray:
    kind = "integer" if integer else "floating-point"
    if name not in table.column_names:
        raise TraceError(f"{where}: missing column '{name}' (expected lists of top_k={k} {kind} values)")
    col = table.column(name).combine_chunks()
    t = col.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise TraceError(f"{where}: column '{name}' has type {t}, expected a list of {kind} values")
    vt = t.value_type
    ok = pa.types.is_integer(vt) if integer else (pa.types.is_floating(vt) or pa.types.is_integer(vt))
    if not ok:
        raise TraceError(f"{where}: column '{name}' holds {vt} values, expected {kind} values")
    if col.null_count:
        raise TraceError(f"{where}: column '{name}' has {col.null_count} null list(s)")
    if pa.types.is_fixed_size_list(t):
        if t.list_size != k:
            raise TraceError(f"{where}: column '{name}' has lists of length {t.list_size}, metadata says top_k={k}")
        values = col.flatten()
    else:
        lengths = np.diff(col.offsets.to_numpy())
        if len(lengths) and (lengths != k).any():
            row = int(np.argmax(lengths != k))
            raise TraceError(
                f"{where}: column '{name}' has a list of length {lengths[row]} at row {row}, "
                f"metadata says top_k={k} (inconsistent top-k)"
            )
        values = col.flatten()
    if values.null_count:
        raise TraceError(f"{where}: column '{name}' has null entries inside its lists")
    out = values.to_numpy(zero_copy_only=False).reshape(len(col), k)
    if integer:
        if out.size and (out.min() < np.iinfo(np.int16).min or out.max() > np.iinfo(np.int16).max):
            raise TraceError(f"{where}: column '{name}' holds ids outside int16")
        return out.astype(np.int16)
    return out.astype(np.float32)
