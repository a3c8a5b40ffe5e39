"""The per-layer cost model: pure functions from token counts, byte matrices and a system to seconds.

Every function takes arrays with any leading batch dimensions (``...``: steps, layers) and returns
seconds of the same leading shape, so a whole replay is a handful of numpy calls. The model of one
MoE layer at one step (each phase waits for the slowest GPU, as a bulk-synchronous EP layer does):

    layer = predictor exposed + dispatch all-to-all + max_gpu(expert FFNs) + combine all-to-all
            + non-MoE part (attention etc.) + fixed per-layer overhead

- Expert FFN time per GPU: the sum over the experts it holds that got tokens of a roofline
  ``launch + max(bytes / HBM bandwidth, FLOPs(padded tokens) / matmul throughput)`` (weights
  streamed once per expert; tokens padded up to the GEMM tile), or a measured ``tokens -> seconds``
  table (:class:`ExpertTimeTable`, e.g. the kernels benchmark's CSV).
- All-to-all time from the bytes each GPU pair exchanges, per topology (switch, full mesh, 2D mesh).
- Predictor overhead from its FLOPs and bytes on the GPU roofline (or its measured latency), hidden
  behind the previous layer's expert GEMMs when it is off the critical path.
- Re-placement: expert weight bytes each GPU receives over its links.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shapes import ModelShape
from .system import SystemSpec

# ---- expert FFN ---------------------------------------------------------------------------------


@dataclass
class ExpertTimeTable:
    """Measured time of one expert's FFN (one GEMM group) by token count; linear in between.

    ``tokens [n]`` ascending, ``seconds [n]``. Beyond the last point the time grows with the slope
    of the last two points (compute-bound growth); below the first point it is the first point's
    time (weight reads dominate there).
    """

    tokens: np.ndarray
    seconds: np.ndarray
    source: str = ""

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.float64)
        self.seconds = np.asarray(self.seconds, dtype=np.float64)
        order = np.argsort(self.tokens)
        self.tokens, self.seconds = self.tokens[order], self.seconds[order]
        if len(self.tokens) < 2 or (self.seconds <= 0).any():
            raise ValueError(f"{self.source or 'expert time table'}: needs >= 2 rows of positive seconds")

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        n = np.asarray(tokens, dtype=np.float64)
        t = np.interp(n, self.tokens, self.seconds)
        slope = (self.seconds[-1] - self.seconds[-2]) / max(self.tokens[-1] - self.tokens[-2], 1e-12)
        return np.where(n > self.tokens[-1], self.seconds[-1] + slope * (n - self.tokens[-1]), t)


_TIME_COLUMNS = {"seconds": 1.0, "time_s": 1.0, "time_ms": 1e-3, "median_ms": 1e-3, "time_us": 1e-6, "median_us": 1e-6}


def load_expert_table(path: str | Path, **filters) -> ExpertTimeTable:
    """An :class:`ExpertTimeTable` from a CSV with a ``tokens`` column and one time column
    (``seconds``, ``time_s``, ``time_ms``, ``median_ms``, ``time_us`` or ``median_us``).

    ``filters`` keep rows whose columns equal the given values (e.g. ``kernel="triton", hidden=4096``);
    rows with the same token count are averaged.
    """
    import pandas as pd

    path = Path(path)
    frame = pd.read_csv(path)
    if "tokens" not in frame.columns:
        raise ValueError(f"{path}: no 'tokens' column (expected tokens and a time column {sorted(_TIME_COLUMNS)})")
    for key, value in filters.items():
        if key not in frame.columns:
            raise ValueError(f"{path}: filter column '{key}' not in {list(frame.columns)}")
        frame = frame[frame[key] == value]
    column = next((c for c in _TIME_COLUMNS if c in frame.columns), None)
    if column is None:
        raise ValueError(f"{path}: no time column; expected one of {sorted(_TIME_COLUMNS)}")
    if frame.empty:
        raise ValueError(f"{path}: no rows left after filters {filters}")
    grouped = frame.groupby("tokens")[column].mean()
    return ExpertTimeTable(grouped.index.to_numpy(), grouped.to_numpy() * _TIME_COLUMNS[column], source=str(path))


def kernel_bench_column(frame, method: str | None = None) -> str:
    """The time column of a ``moegps.kernels.bench`` table to read: ``<method>_us``, or by default
    ``balanced_us`` where the table has it (runs from December 2026: the MoE call on routing that
    gives every active expert ``tokens * k / active_experts`` rows, which is what the per-expert
    readings below assume) and ``ours_us`` before (random routing: the rows' experts got uneven
    counts, so the even-split reading is an approximation that includes their padding)."""
    if method is not None:
        return f"{method}_us"
    if "balanced_us" in frame and frame["balanced_us"].notna().any():
        return "balanced_us"
    return "ours_us"


def load_kernel_bench(path: str | Path, shape: str, method: str | None = None) -> ExpertTimeTable:
    """An :class:`ExpertTimeTable` from ``moegps.kernels.bench``'s ``bench.csv``.

    That table times a whole MoE layer of ``tokens`` tokens (``k`` selections each) spread over
    ``active_experts`` experts, in microseconds (``<method>_us``; the method by
    :func:`kernel_bench_column`); per expert this is ``tokens * k / active_experts`` tokens in
    ``<method>_us / active_experts``.
    """
    import pandas as pd

    path = Path(path)
    frame = pd.read_csv(path)
    frame = frame[frame["shape"] == shape] if "shape" in frame else frame
    column = kernel_bench_column(frame, method)
    need = {"shape", "tokens", "k", "active_experts", column}
    if not need <= set(frame.columns):
        raise ValueError(f"{path}: needs columns {sorted(need)}; has {list(frame.columns)}")
    frame = frame[frame[column].notna()]
    if frame.empty:
        raise ValueError(f"{path}: no rows for shape {shape!r} with a {column} time")
    per_expert_tokens = frame["tokens"] * frame["k"] / frame["active_experts"]
    seconds = frame[column] * 1e-6 / frame["active_experts"]
    grouped = pd.Series(seconds.to_numpy(), index=per_expert_tokens.to_numpy()).groupby(level=0).mean()
    return ExpertTimeTable(grouped.index.to_numpy(), grouped.to_numpy(), source=f"{path} ({shape}, {column})")


def expert_time(tokens: np.ndarray, shape: ModelShape, system: SystemSpec, table: ExpertTimeTable | None = None) -> np.ndarray:
    """Seconds one GPU spends on one expert given ``tokens [...]`` (0 where it got no tokens).

    Roofline: ``launch + max((weights + activations) bytes / HBM, 2 * 3 * h * f * padded / FLOP/s)``
    (or their ``roofline_p``-norm when the profile sets it: a smooth knee fitted by calibration)
    with tokens padded up to ``system.tile_tokens`` (fractional token counts from replica shares
    are rounded up too).
    """
    n = np.asarray(tokens, dtype=np.float64)
    if table is not None:
        t = table(n)
    else:
        padded = np.ceil(np.maximum(n, 0) / system.tile_tokens - 1e-9) * system.tile_tokens
        bytes_moved = shape.expert_weight_bytes + n * 2 * shape.token_bytes
        memory = bytes_moved / system.hbm_bandwidth
        compute = padded * shape.expert_flops_per_token / system.matmul_flops
        if system.roofline_p is None:
            t = np.maximum(memory, compute)
        else:  # a smooth knee: kernels are neither purely memory- nor compute-bound near the ridge
            p = system.roofline_p
            t = np.maximum(memory, compute) * (1 + np.minimum(memory, compute) ** p / np.maximum(memory, compute) ** p) ** (1 / p)
        t = t + system.expert_launch
    return np.where(n > 0, t, 0.0)


def times_whole_calls(table) -> bool:
    """Whether ``table`` times a GPU's whole expert call (``gpu_seconds``, ``executor.expert_timer``): such a
    time holds the call's fixed cost (routing metadata, launches), which the roofline leaves to ``layer_overhead``."""
    return hasattr(table, "gpu_seconds")


def gpu_expert_time(tokens_per_gpu_expert: np.ndarray, shape: ModelShape, system: SystemSpec,
                    table=None) -> np.ndarray:
    """``[..., gpu, expert]`` tokens each GPU computes for each expert -> ``[..., gpu]`` seconds.

    ``table``: None (the roofline), an :class:`ExpertTimeTable` (each expert's measured time by its
    tokens, summed over a GPU's experts), or anything with ``gpu_seconds`` that times a GPU's whole
    share at once (``executor.expert_timer.KernelExpertTimer``: the kernels run on this device)."""
    if times_whole_calls(table):
        return table.gpu_seconds(tokens_per_gpu_expert)
    return expert_time(tokens_per_gpu_expert, shape, system, table).sum(axis=-1)


# ---- token routing and all-to-all -------------------------------------------------------------


def route_tokens(src_counts: np.ndarray, share: np.ndarray, local_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Where the selections go.

    ``src_counts [..., gpu_src, expert]``: top-k selections made by tokens living on each GPU.
    ``share [..., expert, gpu]``: fraction of an expert's tokens each GPU's replica takes (sums to
    1 over GPUs). With ``local_first`` a selection whose expert has a replica on the token's own GPU
    stays there; the rest are split by ``share``.

    Returns ``pair [..., gpu_src, gpu_dst]`` selections sent from each GPU to each (diagonal = local)
    and ``per_gpu [..., gpu, expert]`` tokens each GPU computes for each expert.
    """
    src_counts = np.asarray(src_counts, dtype=np.float64)
    held = np.swapaxes(share, -1, -2) > 0  # [..., gpu, expert]
    if local_first:
        local = src_counts * held
        remote = src_counts - local
    else:
        local = np.zeros_like(src_counts)
        remote = src_counts
    pair = remote @ share  # [..., src, dst]
    g = src_counts.shape[-2]
    pair[..., np.arange(g), np.arange(g)] += local.sum(axis=-1)
    per_gpu = remote.sum(axis=-2)[..., :, None] * share  # [..., expert, gpu]
    per_gpu = np.swapaxes(per_gpu, -1, -2) + local
    return pair, per_gpu


def mesh_link_incidence(rows: int, cols: int) -> np.ndarray:
    """``[gpu_src * gpu_dst, link]`` 0/1: which directed links dimension-order (X then Y) routing uses.

    Devices are numbered row-major on a ``rows x cols`` grid; links are the directed neighbour
    pairs, 2 * (rows * (cols - 1) + cols * (rows - 1)) of them.
    """
    n = rows * cols
    links: dict[tuple[int, int], int] = {}

    def link(a, b):
        return links.setdefault((a, b), len(links))

    paths = []
    for src in range(n):
        for dst in range(n):
            r, c = divmod(src, cols)
            r1, c1 = divmod(dst, cols)
            used = []
            while c != c1:
                step = 1 if c1 > c else -1
                used.append(link(r * cols + c, r * cols + c + step))
                c += step
            while r != r1:
                step = 1 if r1 > r else -1
                used.append(link(r * cols + c, (r + step) * cols + c))
                r += step
            paths.append(used)
    out = np.zeros((n * n, len(links)))
    for i, used in enumerate(paths):
        out[i, used] = 1.0
    return out


_INCIDENCE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def all_to_all_time(pair_bytes: np.ndarray, system: SystemSpec) -> np.ndarray:
    """Seconds of one all-to-all: ``pair_bytes [..., gpu_src, gpu_dst]`` (diagonal ignored) -> ``[...]``.

    - switch: each GPU sends and receives at ``link_bandwidth`` within its node and at
      ``inter_node_bandwidth`` across nodes (separate links, so the slower of the two sets it).
    - full_mesh: each pair has its own link; the busiest link sets the time.
    - mesh2d: fluid model of dimension-order routing; the busiest directed link sets the time.
    A fixed latency is paid whenever any byte crosses GPUs (inter-node latency if any crosses nodes).
    """
    b = np.array(pair_bytes, dtype=np.float64)
    g = system.n_gpus
    if b.shape[-2:] != (g, g):
        raise ValueError(f"pair_bytes has shape {b.shape}, expected [..., {g}, {g}] for {system.name}")
    b[..., np.arange(g), np.arange(g)] = 0.0
    any_bytes = b.sum(axis=(-1, -2)) > 0
    if system.topology == "switch":
        node = system.node_of()
        same = node[:, None] == node[None, :]
        intra, inter = b * same, b * ~same
        t_intra = np.maximum(intra.sum(-1), intra.sum(-2)).max(-1) / system.link_bandwidth
        t_inter = np.maximum(inter.sum(-1), inter.sum(-2)).max(-1) / system.inter_node_bandwidth
        latency = np.where(inter.sum(axis=(-1, -2)) > 0, system.inter_node_latency, system.link_latency)
        t = np.maximum(t_intra, t_inter) + latency
    elif system.topology == "full_mesh":
        t = b.max(axis=(-1, -2)) / system.link_bandwidth + system.link_latency
    else:
        key = tuple(system.mesh_shape)
        if key not in _INCIDENCE_CACHE:
            _INCIDENCE_CACHE[key] = mesh_link_incidence(*key)
        link_bytes = b.reshape(b.shape[:-2] + (g * g,)) @ _INCIDENCE_CACHE[key]
        t = link_bytes.max(axis=-1) / system.link_bandwidth + system.link_latency
    return np.where(any_bytes, t, 0.0)


# ---- non-MoE part, predictor, re-placement ------------------------------------------------------


def other_time(tokens_per_gpu: np.ndarray, shape: ModelShape, system: SystemSpec, attention: str = "dp",
               context_per_gpu: np.ndarray | None = None, kv_read_per_gpu: np.ndarray | None = None) -> np.ndarray:
    """Non-MoE part of a layer (attention, shared experts, norms): ``[..., gpu]`` -> ``[...]``.

    ``dp``: each GPU holds all attention weights and runs its own tokens (the slowest GPU sets
    it). ``tp``: weights split over the GPUs, every GPU runs every token, plus a ring all-reduce of
    the activations. Weights: ``shape.non_expert_params_per_layer`` (attention, router, shared expert, norms).

    The attention over the context, when given (``[..., gpu]`` like ``tokens_per_gpu``):
    ``context_per_gpu``, the positions the GPU's tokens attend to (a token at position p: p + 1),
    costs ``4 * n_heads * head_dim`` FLOPs each (QK and PV); ``kv_read_per_gpu``, the positions whose
    K and V its decode tokens read from memory, ``shape.kv_bytes_per_token`` bytes each (a prompt's
    attention keeps its K and V on chip: FlashAttention). Both go into the same roofline as the
    weights: a decode step at batch 32 and context 4096 reads 17 GB of Mixtral-8x7B's cache. (A GPU's
    context may belong to tokens another GPU projects: the cache stays where the request's tokens came from.)
    """
    n = np.asarray(tokens_per_gpu, dtype=np.float64)
    context = np.zeros_like(n) if context_per_gpu is None else np.asarray(context_per_gpu, dtype=np.float64)
    kv_read = np.zeros_like(n) if kv_read_per_gpu is None else np.asarray(kv_read_per_gpu, dtype=np.float64)
    weight_bytes = shape.non_expert_params_per_layer * shape.dtype_bytes
    flops = 2.0 * shape.non_expert_params_per_layer * n + 4.0 * shape.n_heads * shape.head_dim * context
    kv_bytes = kv_read * shape.kv_bytes_per_token
    if attention == "dp":
        t = np.maximum((weight_bytes + kv_bytes) / system.hbm_bandwidth, flops / system.matmul_flops)
        return np.where((n > 0) | (context > 0), t, 0.0).max(axis=-1)
    if attention == "tp":
        # every GPU runs every token on its share of the heads (and of the weights)
        g = system.n_gpus
        total = n.sum(axis=-1)
        t = np.maximum((weight_bytes + kv_bytes.sum(axis=-1)) / g / system.hbm_bandwidth,
                       flops.sum(axis=-1) / g / system.matmul_flops)
        allreduce = 2 * (g - 1) / g * total * shape.token_bytes / system.link_bandwidth + system.link_latency
        return np.where(total > 0, t + (allreduce if g > 1 else 0.0), 0.0)
    raise ValueError(f"attention must be 'dp' or 'tp', got {attention!r}")


def predictor_time(flops: np.ndarray, bytes_read: np.ndarray, system: SystemSpec) -> np.ndarray:
    """Seconds of a predictor call on one GPU: roofline of its FLOPs and bytes plus one kernel launch."""
    flops = np.asarray(flops, dtype=np.float64)
    bytes_read = np.asarray(bytes_read, dtype=np.float64)
    t = np.maximum(flops / system.matmul_flops, bytes_read / system.hbm_bandwidth) + system.expert_launch
    return np.where((flops > 0) | (bytes_read > 0), t, 0.0)


def exposed_time(work: np.ndarray, overlap: np.ndarray, on_critical_path: bool) -> np.ndarray:
    """The part of auxiliary ``work`` (s) that shows: all of it on the critical path, else what the
    ``overlap`` window (s, the GEMMs it hides behind) cannot cover: ``max(0, work - overlap)``."""
    work = np.asarray(work, dtype=np.float64)
    return work if on_critical_path else np.maximum(work - np.asarray(overlap, dtype=np.float64), 0.0)


def migration_bytes(share_old: np.ndarray, share_new: np.ndarray, expert_weight_bytes: float) -> np.ndarray:
    """Bytes of expert weights each GPU must receive: ``share [layer, expert, gpu]`` x2 -> ``[gpu]``.

    An expert a GPU holds in the new placement but not the old must be copied there (all layers).
    """
    new_copies = (np.asarray(share_new) > 0) & ~(np.asarray(share_old) > 0)
    return new_copies.sum(axis=(0, 1)) * float(expert_weight_bytes)


def migration_time(bytes_in: np.ndarray, system: SystemSpec) -> np.ndarray:
    """Seconds to receive ``bytes_in [..., gpu]`` of weights; the busiest receiver sets it."""
    b = np.asarray(bytes_in, dtype=np.float64).max(axis=-1)
    bw = system.link_bandwidth if system.n_nodes == 1 else min(system.link_bandwidth, system.inter_node_bandwidth)
    return np.where(b > 0, b / bw + system.link_latency, 0.0)
