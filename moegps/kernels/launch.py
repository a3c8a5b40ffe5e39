"""Launcher of the fused MoE kernels: config choice, buffers, the k-way combine.

A config is a plain dict (kept as JSON data per device in configs/<device name>.json):
    {"path": "scan" | "sorted", "block_m": 16,
     "gate_up": {"block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4},
     "down":    {"block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4}}
`block_m` is shared by both GEMMs (the sorted path pads each expert's rows to it once).
The one-launch decode path (both GEMMs and the combine in one kernel, split over F) has one tile:
    {"path": "fused", "block_m": 16,
     "fused": {"block_f": 64, "block_k": 128, "block_n": 128, "num_warps": 4, "num_stages": 3}}
Optional tile flags: "paired" (gate/up and fused tiles: one dot of twice the width for w1 and
w3) and "tma" (sorted and fused tiles: the weights through tensor descriptors, Hopper's copy
engine); both together load the gate and up tiles in one stacked copy.
A sorted config may set "half_tail": true (block_m >= 32): each expert's rows are padded to
block_m / 2 only, and its last block runs at half height when that is all it holds.
The Hopper-only Gluon kernels (wgmma_moe.py) have their own path, written into a device's table
by benchmarks/kernels/wgmma_probe.py where they win, never chosen by default_config:
    {"path": "wgmma", "block_m": 128[, "half_tail": true],
     "gate_up": {"block_n": 128, "block_k": 64, "num_stages": 4, "group_m": 8[, "dynamic": false]
                 [, "gather": 4]},
     "down": {...}}
("gather": the gate/up kernel's producer, of that many warps, copies the token rows from x itself:
no gather launch; "one_launch": true at the top level runs both GEMMs as one launch, the down
tiles after the gate/up tiles, which needs the down tile twice the gate/up block_n and the same
block_k, stages and group_m: wgmma_moe.launch_moe.) With "swap": true the wgmma path runs wgmma_swap.py's kernels, weights on the
MMA's rows and blocks of up to block_m (128, 160, 192) token rows on its columns, an expert's rows
padded to pad_m (64, the default, or 32); tiles of 256 weight rows:
    {"path": "wgmma", "swap": true, "block_m": 192[, "pad_m": 32][, "one": true],
     "gate_up": {"block_k": 32, "num_stages": 6, "group_m": 8}, "down": {...}}
("one": blocks of 160 or 192 rows as one MMA, which needs Triton >= 3.9; a table entry with it
carries an "else", the entry it replaced, which get_config takes where this Triton cannot build it.)
The swap path (swap_moe.py) runs the sorted GEMMs transposed, weights on the MMA's rows and an
expert's tokens (up to block_m of 128, 160, 192 or 256, padded to 32) on its columns, so that each
weight tile is loaded by one program; its tiles are those of the sorted path, without "paired":
    {"path": "swap", "block_m": 160, "gate_up": {"block_n": 128, ..., "tma": true},
     "down": {"block_n": 256, ...}}
A scan, sorted or swap config may set "combine": "atomic": the down GEMM adds its tiles into an fp32
[T, H] accumulator with atomics instead of writing y [T*k, H] for a k-way sum afterwards (the
default, "sum", is deterministic; "atomic" varies in the last bits from run to run).

Under ``torch.use_deterministic_algorithms(True)`` no config adds with atomics: get_config runs a
tuned "combine": "atomic" entry with the k-way sum and takes the default's choice without the fused
path where a table chose "fused" (whose programs add their F slices into one output); an explicit
config that adds with atomics raises, as torch's own nondeterministic operations do (or warns, with
``warn_only=True``). Every other path writes each output element from one program in a fixed order.
``deterministic_algorithms()`` is that mode as a context, with what cuBLAS needs for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
from pathlib import Path

import torch
import triton

# Kernel names imported directly: the package attribute `fused_moe` is the function below,
# which shadows the kernel module of the same name.
from .fused_moe import (combine_kernel, down_scan_kernel, down_sorted_kernel, fused_scan_kernel,
                        gate_up_scan_kernel, gate_up_sorted_kernel, gather_kernel)
from . import wgmma_moe, wgmma_swap
from .pdl import launch_flags
from . import swap_moe
from .swap_moe import down_swap_kernel, gate_up_swap_kernel
from .routing import SCAN, align

CONFIG_DIR = Path(__file__).parent / "configs"
# An expert of `rows` rows on average is counted to take ceil(rows / (SWAP_FILL * block_m)) swap
# blocks: Mixtral on an H200 with 160-row blocks (NOTES.md v23b) was 15% faster than the sorted
# path at a fill of 0.9 (576 tokens), and 1.4x slower at 1.2 (768 tokens), where most experts take
# two blocks. get_config takes a swap entry only where experts take the blocks they took where it
# was tuned.
SWAP_FILL = 0.9


def swap_blocks(rows: float, block_m: int) -> int:
    """Swap blocks of `block_m` rows an expert of `rows` rows (a mean) is counted to take."""
    return max(1, math.ceil(rows / (SWAP_FILL * block_m)))


def swap_fits(rows: float, block_m: int) -> bool:
    """Whether experts of `rows` rows on average fit one swap block of `block_m` (SWAP_FILL)."""
    return swap_blocks(rows, block_m) == 1


def available() -> bool:
    """True when the Triton kernels can run here: a CUDA GPU, or Triton's CPU interpreter."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def shape_key(n_experts: int, hidden: int, ffn: int, top_k: int) -> str:
    return f"E={n_experts},H={hidden},F={ffn},k={top_k}"


def device_name(device: torch.device | None = None) -> str:
    """'NVIDIA_H100_80GB_HBM3' style name used for config files; 'cpu' without a GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def default_config(n_tokens: int, n_experts: int, hidden: int, ffn: int, top_k: int,
                   atomics: bool = True) -> dict:
    """A config for a shape no tuned file covers, from the rows each expert gets on average
    (``atomics=False``: never the fused path, whose programs add into one output with atomics).

    The decode of small (fine-grained) experts: the one-launch fused path. Few rows per expert
    otherwise: the scan path with BLOCK_M 16 and narrow N tiles for many programs (the weights
    must stream from all SMs at once). Large experts at 64-144 rows each: the swap path. More
    rows: the sorted path, BLOCK_M near the rows per expert, then TMA-fed 128-row tiles for the
    tensor cores (compute-bound). Chosen from what the tuner picked on an H100 and an H200
    (NOTES.md), so that an unseen shape lands near a tuned one.
    """
    config = _default_by_rows(n_tokens, n_experts, hidden, ffn, top_k, atomics)
    rows = n_tokens * top_k / n_experts
    if config["path"] == "sorted" and n_experts * math.ceil(rows / config["block_m"]) <= 12:
        # Few row blocks in all (about one per expert, a few tails): one group takes them all,
        # so no expert's blocks straddle two groups, whose sweeps over the N tiles would each
        # read its weights from DRAM (Mixtral at 512 tokens: gate/up 8% and down 4.5% faster
        # with 16 than with 8; NOTES.md, session 6).
        for gemm in ("gate_up", "down"):
            config[gemm]["group_m"] = 16
    return config


def _default_by_rows(n_tokens: int, n_experts: int, hidden: int, ffn: int, top_k: int, atomics: bool) -> dict:
    """default_config's choice of path and tiles (group_m 8)."""
    rows = n_tokens * top_k / n_experts
    # One-launch fused path for the decode of fine-grained experts (a few MB each): it saves the
    # launch ramps and tails of gate/up, down and the combine, and pays atomics in proportion to
    # the pairs. Measured on an H100 (NOTES.md v4, v12): faster at 64 experts T=1-8 (6-48 pairs,
    # 17 MB experts), slower than the scan path on Mixtral's 350 MB experts at every T.
    if atomics and n_tokens * top_k <= 64 and 3 * hidden * ffn * 2 <= 64e6:
        return {"path": "fused", "block_m": 16,
                "fused": {"block_f": 64, "block_k": 128, "block_n": 128, "num_warps": 4,
                          "num_stages": 3}}
    if rows <= 8 and n_tokens * top_k <= 8 * SCAN:
        tile = {"block_n": 64, "block_k": 128, "group_m": 8, "num_warps": 4, "num_stages": 4}
        return {"path": "scan", "block_m": 16, "gate_up": dict(tile), "down": dict(tile)}
    # Large experts at 64-144 rows each (memory-bound): the swap path, every expert's rows in one
    # block, each weight tile streamed once. Mixtral on an H200 (NOTES.md v23): 90-91% of the floor
    # at 256-384 tokens against 67-79% for the sorted default below, 83-86% at 512 against 77%, 77%
    # at 576 against the tuned sorted config's 65%.
    if rows >= 64 and swap_fits(rows, 160) and 3 * hidden * ffn * 2 >= 64e6:
        block_m = 128 if swap_fits(rows, 128) else 160
        return {"path": "swap", "block_m": block_m,
                "gate_up": {"block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8,
                            "num_stages": 4, "tma": True},
                "down": {"block_n": 128 if block_m == 128 else 256, "block_k": 64, "group_m": 8,
                         "num_warps": 8, "num_stages": 5 if block_m == 128 else 4, "tma": True}}
    if rows <= 24:  # the tuned 64 experts at 128 tokens (12 rows), 14% faster than the scan path
        return {"path": "sorted", "block_m": 32,
                "gate_up": {"block_n": 64, "block_k": 128, "group_m": 8, "num_warps": 4,
                            "num_stages": 4, "tma": True},
                "down": {"block_n": 128, "block_k": 128, "group_m": 8, "num_warps": 8,
                         "num_stages": 3, "tma": True}}
    if rows <= 96:  # the tuned 64 experts at 512 tokens (48 rows; NOTES.md v14)
        return {"path": "sorted", "block_m": 64,
                "gate_up": {"block_n": 64, "block_k": 128, "group_m": 8, "num_warps": 4,
                            "num_stages": 4, "paired": True, "tma": True},
                "down": {"block_n": 64, "block_k": 64, "group_m": 8, "num_warps": 8,
                         "num_stages": 3, "tma": True}}
    # Compute-bound: weights through the copy engine (TMA; the launcher falls back to pointer
    # loads where rows are not 16-byte aligned), gate and up in one stacked copy and one dot of
    # 256 columns, 128 x 256 down tiles once rows fill them. The tuner took these at every
    # Mixtral and 64-expert point from 2048 tokens (NOTES.md v6, v14), with 3 stages from 2048
    # rows per expert (Mixtral 8192-16384 tokens; 4 stages read 3-16% slower there).
    gate_up = {"block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8,
               "num_stages": 3 if rows >= 2048 else 4, "paired": True, "tma": True}
    down = {"block_n": 256, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3,
            "tma": True}
    if rows <= 160:
        down.update(block_n=128, block_k=128)
    # Up to 3 blocks' worth of rows, an expert's last block at half height saves >= 14% of the
    # padded MMA rows (tuned 64 experts at 2048 tokens, 192 rows: 3% faster; NOTES.md v10).
    return {"path": "sorted", "block_m": 128, "half_tail": rows <= 384, "gate_up": gate_up,
            "down": down}


@functools.lru_cache(maxsize=None)
def _tuned_table(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        return {}
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table.get("shapes"), dict):
        raise ValueError(f"{path}: field 'shapes' must map 'E=..,H=..,F=..,k=..' to "
                         "{tokens: config}")
    return table["shapes"]


def get_config(n_tokens: int, n_experts: int, hidden: int, ffn: int, top_k: int,
               device: torch.device | None = None, table: str | None = None) -> dict:
    """Tuned config of the nearest tuned token count for this shape and device, else the default (also past
    twice the largest tuned count: a table says nothing of sizes far beyond it).

    A swap config is taken only where an expert takes as many blocks (`swap_blocks`) as where it
    was tuned: each block streams the expert's weights, so an entry tuned with one block an expert
    is slow where most experts take two (Mixtral on an H200, the 512-token entry of 160-row blocks:
    91% of the floor at 384 tokens, but 48% at 768, where each expert's 192 rows take two blocks,
    against 68% for the default; benchmarks/kernels/logs/h200-2026-12-04-h/call4-*; at 576 tokens,
    a fill of 0.9, the swap entry was 867 against 1019 us, call 8).

    Where no table has this top-k, the table of the same experts with the nearest other top-k
    serves, its entries matched by selections (tokens x top-k: the rows the experts get): an
    expert-parallel rank computes the tokens whose k experts are not all its own one row per
    selection, top-1 (executor.layer.expert_compute), on the experts a k-way table was tuned for.
    ``table``: another device's table to serve from (its name as in configs/, e.g. "NVIDIA_H200"; what
    benchmarks/kernels/table_probe.py tries on this device); entries this device cannot run are skipped
    as always."""
    table = _tuned_table(table or device_name(device))
    tuned_k, by_tokens = top_k, table.get(shape_key(n_experts, hidden, ffn, top_k)) or {}
    if not by_tokens:
        these_experts = shape_key(n_experts, hidden, ffn, top_k).removesuffix(f"k={top_k}")
        other_ks = [int(key.removeprefix(these_experts + "k=")) for key in table
                    if key.startswith(these_experts + "k=")]
        if other_ks:
            tuned_k = min(other_ks, key=lambda k: (abs(k - top_k), k))
            by_tokens = table[shape_key(n_experts, hidden, ffn, tuned_k)]
    gluon = wgmma_moe.supported(device)
    by_tokens = {t: c for t, c in ((t, runnable_entry(c, gluon)) for t, c in by_tokens.items()) if c}
    rows = n_tokens * top_k / n_experts
    by_tokens = {t: c for t, c in by_tokens.items()
                 if c["path"] != "swap" or swap_blocks(rows, c["block_m"])
                 == swap_blocks(int(t) * tuned_k / n_experts, c["block_m"])}
    # Past twice the most selections a table was tuned at, its nearest entry is no evidence: a rank's table tuned
    # at 1-256 rows served its 128-row tiles to prefill shares of thousands of rows, 1.36x the default's time
    # (benchmarks/simulator/h200-2026-12-05-v/, the prefill-heavy replay).
    if not by_tokens or n_tokens * top_k > 2 * max(int(t) * tuned_k for t in by_tokens):
        config = default_config(n_tokens, n_experts, hidden, ffn, top_k)
    else:
        config = by_tokens[min(by_tokens, key=lambda t: abs(int(t) * tuned_k - n_tokens * top_k))]
    if torch.are_deterministic_algorithms_enabled() and adds_with_atomics(config, top_k):
        config = (default_config(n_tokens, n_experts, hidden, ffn, top_k, atomics=False)
                  if config["path"] == "fused" else dict(config, combine="sum"))
    return config


def runnable_entry(config: dict | None, gluon: bool) -> dict | None:
    """A table entry, or where this machine cannot run it the entry it replaced (its "else", a
    one-MMA swap entry's: tune.write_winners keeps it), or None: a Triton without Gluon skips the
    wgmma entries, one whose Gluon lacks inline PTX on shared buffers the one-MMA ones."""
    while config is not None and ((config["path"] == "wgmma" and not gluon)
                                  or (config.get("one") and not wgmma_swap.HAVE_ONE)):
        config = config.get("else")
    return config


def _check(x, w_gate_up, w_down, topk_ids, topk_weights):
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    n_tokens, hidden = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != hidden or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [experts, 2*ffn, hidden={hidden}], "
                         f"got {tuple(w_gate_up.shape)}")
    n_experts, ffn = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (n_experts, hidden, ffn):
        raise ValueError(f"w_down must be [experts={n_experts}, hidden={hidden}, ffn={ffn}], "
                         f"got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n_tokens:
        raise ValueError(f"topk_ids must be [tokens={n_tokens}, k], got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    return n_tokens, hidden, n_experts, ffn, topk_ids.shape[1]


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
    *,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Mixtral/SwiGLU expert FFN of routed tokens on the Triton kernels.

    x: [T, H] (bf16/fp16/fp32). w_gate_up: [E, 2F, H] (rows 0..F-1 gate w1, F..2F-1 up w3).
    w_down: [E, H, F] (w2). topk_ids: [T, k] int in [0, E). topk_weights: [T, k].
    Returns [T, H] in x's dtype: sum_j topk_weights[t, j] * w2 @ (silu(w1 @ x) * (w3 @ x)) with
    fp32 accumulation (fp32 inputs run on tf32 tensor cores, Triton's default for dot). Ids
    outside [0, E) are not checked (that would need a host sync): the result is then undefined.
    `config`: see the module docstring; None picks the tuned (or default) one.
    `workspace`: optional preallocated buffers {"h": [T*k, F], "y": [T*k, H]} in x's dtype and
    {"scratch": [E*T*k] int32} (reused by a caller in a loop; the tests fill them with NaN).
    The `fused` path uses only "scratch" and accumulates in a fresh zeroed fp32 [T, H] (its
    atomics make the last bits of the result vary from run to run).
    """
    n_tokens, hidden, n_experts, ffn, top_k = _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    if config is None:
        config = get_config(n_tokens, n_experts, hidden, ffn, top_k, x.device)
    _check_deterministic(config, top_k)
    x = x.contiguous()
    w_gate_up = w_gate_up.contiguous()
    w_down = w_down.contiguous()
    n_pairs = n_tokens * top_k
    ids = topk_ids.reshape(-1).contiguous()  # any integer dtype: the kernels read it as is
    weights = topk_weights.reshape(-1).contiguous()
    if n_tokens == 0:
        return torch.zeros_like(x)
    workspace = workspace or {}
    if config["path"] == "fused":
        return launch_fused(x, w_gate_up, w_down, weights, ids,
                            route(ids, n_experts, config, workspace.get("scratch")), config, top_k)
    if config["path"] == "wgmma":
        return _fused_moe_wgmma(x, w_gate_up, w_down, ids, weights, config, top_k)
    h = workspace.get("h")
    h = torch.empty(n_pairs, ffn, dtype=x.dtype, device=x.device) if h is None else h
    routing = route(ids, n_experts, config, workspace.get("scratch"))
    launch_gate_up(x, w_gate_up, h, ids, routing, config, top_k)
    if combine_atomic(config, top_k):
        acc = torch.zeros(n_tokens, hidden, dtype=torch.float32, device=x.device)
        launch_down(h, w_down, acc, weights, ids, routing, config, top_k)
        return acc if x.dtype == torch.float32 else acc.to(x.dtype)
    y = workspace.get("y")
    y = torch.empty(n_pairs, hidden, dtype=x.dtype, device=x.device) if y is None else y
    launch_down(h, w_down, y, weights, ids, routing, config, top_k)
    if top_k == 1:
        return y
    return combine_sum(y, top_k)


def _fused_moe_wgmma(x, w_gate_up, w_down, ids, weights, config, top_k) -> torch.Tensor:
    """fused_moe on the Hopper-only Gluon kernels (wgmma_moe.py): h stays in expert order."""
    if not wgmma_moe.supported(x.device):
        raise ValueError("config path 'wgmma' runs only on a Hopper GPU (sm_90) with Gluon; "
                         "use 'sorted' elsewhere")
    wgmma_kernels(config).check_config(config, x)
    routing = route(ids, w_gate_up.shape[0], config)
    if config.get("one_launch"):
        y = wgmma_gemms(x, w_gate_up, w_down, weights, routing, config, top_k)
    else:
        h = wgmma_gate_up(x, w_gate_up, routing, config, top_k)
        y = wgmma_down(h, w_down, weights, routing, config)
    return combine_sum(y, top_k, slots=routing.pair_slot)


def wgmma_gate_up(x, w_gate_up, routing, config: dict, top_k: int, kernels=wgmma_moe) -> torch.Tensor:
    """The wgmma path's gate/up GEMM on x [T, H]: its producer gathers the token rows itself where
    the tile says "gather" (its warps), else they are copied into expert order first (gather_rows);
    with "swap", on the weights-as-rows kernels (wgmma_swap.py).
    `kernels`: the module whose launch_gate_up runs (benchmarks/kernels/ab_wgmma.py passes an older
    copy of wgmma_moe)."""
    if config.get("swap"):
        return wgmma_swap.launch_gate_up(gather_rows(x, routing, top_k), w_gate_up, routing, config)
    a, rows_top_k = gate_up_rows(x, routing, config, top_k)
    return kernels.launch_gate_up(a, w_gate_up, routing, config, top_k=rows_top_k)


def gate_up_rows(x, routing, config: dict, top_k: int) -> tuple[torch.Tensor, int | None]:
    """The wgmma_moe gate/up kernel's A and the top_k it gathers with: x itself and top_k where
    the tile says "gather" (its producer copies each block's rows), else the token rows copied
    into expert order first (gather_rows) and None."""
    if config["gate_up"].get("gather", 0):
        return x.contiguous(), top_k
    return gather_rows(x, routing, top_k), None


def wgmma_gemms(x, w_gate_up, w_down, weights, routing, config: dict, top_k: int) -> torch.Tensor:
    """y [max_padded, H] in expert order from x [T, H] in one launch (config "one_launch",
    wgmma_moe.launch_moe), the token rows gathered as in wgmma_gate_up."""
    if config.get("swap"):
        raise ValueError("config field 'one_launch' is the wgmma_moe kernels' (no 'swap')")
    a, rows_top_k = gate_up_rows(x, routing, config, top_k)
    return wgmma_moe.launch_moe(a, w_gate_up, w_down, weights, routing, config, rows_top_k)


def wgmma_kernels(config: dict):
    """The module of a wgmma config's kernels: wgmma_swap.py with "swap", else wgmma_moe.py."""
    return wgmma_swap if config.get("swap") else wgmma_moe


def wgmma_down(h, w_down, weights, routing, config: dict) -> torch.Tensor:
    """The wgmma path's down GEMM: y [max_padded, H] in expert order (see wgmma_gate_up)."""
    return wgmma_kernels(config).launch_down(h, w_down, weights, routing, config)


def combine_sum(y: torch.Tensor, top_k: int, out: torch.Tensor | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H] = sum over j of y [T*k, H]'s rows t*k + j (fp32 sums, y's dtype out): the
    k-way combine, one streaming launch (combine_kernel). With `slots` [T*k] (RoutingMeta's
    pair_slot), y is in expert order and pair p's row is y[slots[p]]."""
    hidden = y.shape[1]
    n_pairs = y.shape[0] if slots is None else slots.numel()
    out = torch.empty(n_pairs // top_k, hidden, dtype=y.dtype, device=y.device) if out is None else out
    block_h = min(2048, triton.next_power_of_2(hidden))
    combine_kernel[(n_pairs // top_k, triton.cdiv(hidden, block_h))](
        y.contiguous(), y if slots is None else slots, out, hidden, TOP_K=top_k, BLOCK_H=block_h,
        GATHER=slots is not None, num_warps=8 if block_h >= 2048 else 4, **launch_flags(y))
    return out


def gather_rows(x: torch.Tensor, routing, top_k: int, out: torch.Tensor | None = None, block_r: int = 4,
                block_h: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """[max_padded, H]: row r = x's row of the routing's sorted pair r (x [T, H], routing a
    RoutingMeta): the token rows in expert order, which the wgmma path's TMA copies read (TMA has
    no row gather on Hopper). Padding rows and the rows past the used ones are left unwritten:
    they feed only padding rows of h and y, which nothing reads. One launch (gather_kernel)."""
    n_rows, hidden = routing.sorted_pair_ids.numel(), x.shape[1]
    out = torch.empty(n_rows, hidden, dtype=x.dtype, device=x.device) if out is None else out
    if n_rows:
        gather_kernel[(triton.cdiv(n_rows, block_r),)](
            x.contiguous(), routing.sorted_pair_ids, out, routing.n_padded, routing.n_pairs, hidden,
            TOP_K=top_k, BLOCK_R=block_r, BLOCK_H=min(block_h, triton.next_power_of_2(hidden)),
            num_warps=num_warps, **launch_flags(x))
    return out


def combine_atomic(config: dict, top_k: int) -> bool:
    """Whether the down GEMM combines the k outputs itself (config "combine": "atomic", k > 1)."""
    combine = config.get("combine", "sum")
    if combine not in ("sum", "atomic"):
        raise ValueError(f"config field 'combine' must be 'sum' or 'atomic', got {combine!r}")
    return combine == "atomic" and top_k > 1


def adds_with_atomics(config: dict, top_k: int) -> bool:
    """Whether a config's kernels add into their output with atomics, in an order that varies from run
    to run: the fused path (its programs' F slices) and the down GEMM's k-way combine."""
    return config["path"] == "fused" or combine_atomic(config, top_k)


def _check_deterministic(config: dict, top_k: int) -> None:
    """Under torch.use_deterministic_algorithms(True), a config that adds with atomics raises (warns with
    warn_only=True), as torch's nondeterministic operations do."""
    if not (torch.are_deterministic_algorithms_enabled() and adds_with_atomics(config, top_k)):
        return
    what = ("config path 'fused' adds its programs' F slices" if config["path"] == "fused"
            else "config field 'combine': 'atomic' adds the k experts' outputs")
    message = (f"fused_moe: {what} into the output with atomics, which is not deterministic, and "
               "torch.use_deterministic_algorithms(True) is set; pass config=None (get_config then picks a "
               "config without atomics) or a config with another path and 'combine': 'sum'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


@contextlib.contextmanager
def deterministic_algorithms():
    """A context in which results are the same bits from run to run on the same machine and batch: torch's
    deterministic mode, which these kernels follow by choosing configs without atomics (the engine's own
    kernels never add with atomics: its attention and router splits merge in a fixed order). cuBLAS asks for
    a fixed workspace in that mode (CUBLAS_WORKSPACE_CONFIG, set if unset). torch's NaN fill of uninitialised
    memory is left off: it would add a launch to every allocation inside a captured graph, and the kernels
    never read what they did not write (their tests fill buffers with NaN). Restores the previous settings
    on exit."""
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def route(ids: torch.Tensor, n_experts: int, config: dict, scratch: torch.Tensor | None = None):
    """The routing state a path needs: the scan path's scratch rows [E * T*k] int32 (filled by
    the kernels themselves) or the sorted path's RoutingMeta (one align launch)."""
    if config["path"] in ("scan", "fused"):
        if scratch is None:
            scratch = torch.empty(n_experts * ids.numel(), dtype=torch.int32, device=ids.device)
        return scratch
    if config["path"] == "wgmma" and config.get("swap"):
        return align(ids, n_experts, config["block_m"], pad_m=wgmma_swap.pad_m(config))
    if config["path"] in ("sorted", "wgmma"):
        return align(ids, n_experts, config["block_m"], half_tail=config.get("half_tail", False))
    if config["path"] == "swap":
        if config["block_m"] not in swap_moe.BLOCK_MS or config.get("half_tail"):
            *first, last = swap_moe.BLOCK_MS
            raise ValueError(f"a swap config's block_m must be {', '.join(map(str, first))} or {last} "
                             f"(no half_tail), got block_m={config['block_m']}, "
                             f"half_tail={config.get('half_tail')}")
        return align(ids, n_experts, config["block_m"], pad_m=swap_moe.PAD_M)
    raise ValueError(f"config field 'path' must be 'scan', 'sorted', 'swap', 'wgmma' or 'fused', "
                     f"got {config['path']!r}")


def _gemm_kwargs(tile: dict, block_m: int, k_dim: int) -> dict:
    """Launch constants of one GEMM from its tile config; ``k_dim`` is its reduction length."""
    return dict(BLOCK_M=block_m, BLOCK_N=tile["block_n"], BLOCK_K=tile["block_k"],
                EVEN_K=k_dim % tile["block_k"] == 0,
                num_warps=tile["num_warps"], num_stages=tile["num_stages"])


def _paired(tile: dict) -> dict:
    """The gate/up kernels' PAIRED flag (one dot of twice the width instead of two), off by default."""
    return {"PAIRED": bool(tile.get("paired", False))}


def _weights_operand(w: torch.Tensor, tma: bool, block_n: int, block_k: int,
                     stacked: bool = False):
    """A kernel's weight operand and TMA flag: with `tma` (and where the copy engine can address
    it: 16-byte aligned rows), a tensor descriptor over w [E, rows, cols] viewed
    [E * rows, cols] in [block_n, block_k] boxes, or with `stacked` ([w1; w3] of a PAIRED
    gate/up) viewed [E * 2, rows / 2, cols] in [2, block_n, block_k] boxes, the gate and the up
    tile of the same F columns in one copy; otherwise the tensor itself."""
    rows, cols = w.shape[1], w.shape[2]
    aligned = (cols * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0
    if not (tma and aligned):
        return w, {}
    from triton.tools.tensor_descriptor import TensorDescriptor

    if stacked:
        desc = TensorDescriptor.from_tensor(w.view(w.shape[0] * 2, rows // 2, cols),
                                            [2, block_n, block_k])
    else:
        desc = TensorDescriptor.from_tensor(w.view(w.shape[0] * rows, cols), [block_n, block_k])
    return desc, {"TMA": True}


def _gate_up_operand(w_gate_up: torch.Tensor, tile: dict, block_n: int):
    """`_weights_operand` of [w1; w3] for a gate/up or fused tile of `block_n` F columns."""
    return _weights_operand(w_gate_up, bool(tile.get("tma")), block_n, tile["block_k"],
                            stacked=bool(tile.get("paired")))


def _blocks(routing) -> tuple:
    """The sorted kernels' block arguments from a RoutingMeta."""
    return (routing.sorted_pair_ids, routing.block_expert, routing.block_start, routing.n_blocks)


def launch_gate_up(x, w_gate_up, h, ids, routing, config: dict, top_k: int) -> None:
    """h [T*k, F] = silu(x @ w1^T) * (x @ w3^T) per pair; x [T, H], w_gate_up [E, 2F, H]."""
    n_experts, ffn, hidden = w_gate_up.shape[0], w_gate_up.shape[1] // 2, w_gate_up.shape[2]
    tile, block_m = config["gate_up"], config["block_m"]
    n_tiles = triton.cdiv(ffn, tile["block_n"])
    common = _gemm_kwargs(tile, block_m, hidden)
    strides = (x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h.stride(0))
    if config["path"] == "scan":
        gate_up_scan_kernel[(min(n_experts, ids.numel()), n_tiles)](
            x, w_gate_up, h, ids, routing, ids.numel(), top_k, hidden, ffn, *strides,
            SCAN=SCAN, E_POW2=triton.next_power_of_2(n_experts), **common, **_paired(tile),
            **launch_flags(x))
    elif config["path"] == "swap":
        if tile.get("paired"):
            raise ValueError("a swap config's gate_up tile cannot be 'paired' (gate and up are "
                             "two dots against the same token columns already)")
        w_operand, tma = _weights_operand(w_gate_up, bool(tile.get("tma")), tile["block_n"],
                                          tile["block_k"])
        gate_up_swap_kernel[(routing.max_blocks * n_tiles,)](
            x, w_operand, h, *_blocks(routing), ids.numel(), top_k, hidden, ffn,
            routing.max_blocks, tile["group_m"], *strides, **common, **tma, **launch_flags(x))
    else:
        w_operand, tma = _gate_up_operand(w_gate_up, tile, tile["block_n"])
        gate_up_sorted_kernel[(routing.max_blocks * n_tiles,)](
            x, w_operand, h, *_blocks(routing), ids.numel(), top_k, hidden, ffn,
            routing.max_blocks, tile["group_m"], *strides, HALF_TAIL=routing.half_tail,
            **common, **_paired(tile), **tma, **launch_flags(x))


def launch_down(h, w_down, y, weights, ids, routing, config: dict, top_k: int) -> None:
    """y [T*k, H] = topk_weights * (h @ w2^T) per pair; h [T*k, F], w_down [E, H, F].

    With `combine_atomic(config, top_k)`, y is instead an fp32 [T, H] accumulator (zeroed by
    the caller) into which each pair's row is added: the k-way combine done by the GEMM.
    """
    n_experts, hidden, ffn = w_down.shape
    tile, block_m = config["down"], config["block_m"]
    n_tiles = triton.cdiv(hidden, tile["block_n"])
    common = dict(_gemm_kwargs(tile, block_m, ffn), COMBINE=combine_atomic(config, top_k))
    strides = (h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0))
    if config["path"] == "scan":
        down_scan_kernel[(min(n_experts, ids.numel()), n_tiles)](
            h, w_down, y, weights, ids, routing, ids.numel(), top_k, hidden, ffn, *strides,
            SCAN=SCAN, E_POW2=triton.next_power_of_2(n_experts), **common, **launch_flags(h))
    else:
        w_operand, tma = _weights_operand(w_down, bool(tile.get("tma")), tile["block_n"],
                                          tile["block_k"])
        kernel, flags = ((down_swap_kernel, {}) if config["path"] == "swap" else
                         (down_sorted_kernel, {"HALF_TAIL": routing.half_tail}))
        kernel[(routing.max_blocks * n_tiles,)](
            h, w_operand, y, weights, *_blocks(routing), ids.numel(), top_k, hidden, ffn,
            routing.max_blocks, tile["group_m"], *strides, **flags, **common, **tma,
            **launch_flags(h))


def launch_fused(x, w_gate_up, w_down, weights, ids, scratch, config: dict,
                 top_k: int) -> torch.Tensor:
    """[T, H] in x's dtype = sum_j topk_weights * w2 @ (silu(w1 @ x) * (w3 @ x)), one heavy launch.

    Grid (min(E, T*k) expert slots, F / block_f tiles); the partial sums meet in a zeroed fp32
    accumulator through atomics, cast to x's dtype afterwards (a memset and a cast around the
    kernel: two tiny launches, measured to cost nothing next to it; NOTES.md, v4).
    """
    n_experts, ffn, hidden = w_gate_up.shape[0], w_gate_up.shape[1] // 2, w_gate_up.shape[2]
    tile = config["fused"]
    acc = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    grid = (min(n_experts, ids.numel()), triton.cdiv(ffn, tile["block_f"]))
    # both weights through the copy engine, or neither (one TMA flag in the kernel)
    w13_operand, tma = _gate_up_operand(w_gate_up, tile, tile["block_f"])
    w2_operand, tma2 = _weights_operand(w_down, bool(tile.get("tma")), tile["block_n"],
                                        tile["block_f"])
    if not (tma and tma2):
        w13_operand, w2_operand, tma = w_gate_up, w_down, {}
    fused_scan_kernel[grid](
        x, w13_operand, w2_operand, acc, weights, ids, scratch, ids.numel(), top_k, hidden, ffn,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_down.stride(0),
        w_down.stride(1),
        BLOCK_M=config["block_m"], BLOCK_F=tile["block_f"], BLOCK_K=tile["block_k"],
        BLOCK_N=tile["block_n"], EVEN_K=hidden % tile["block_k"] == 0, SCAN=SCAN,
        E_POW2=triton.next_power_of_2(n_experts), **_paired(tile), **tma,
        num_warps=tile["num_warps"], num_stages=tile["num_stages"], **launch_flags(x))
    return acc if x.dtype == torch.float32 else acc.to(x.dtype)
