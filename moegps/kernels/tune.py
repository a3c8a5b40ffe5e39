"""The tuner of the fused MoE kernels: which configs it tries per (shape, token count), parallel
compilation with the GPU edge-case checks beside it, and the search that writes
``configs/<device>.json``. Run it through the benchmark's CLI:

    python -m moegps.kernels.bench --tune [--shapes mixtral-8x7b deepseek-v2-lite] [--tokens 8 32]

Per (shape, tokens) and per (path, BLOCK_M, half tail): each GEMM's tile timed alone, the sorted
path's best tile again at each GROUP_M, then the best pairs (with each combine) and the fused
decode tiles timed whole from CUDA graphs; the fastest whole call is written.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

from moegps import shapes as shape_registry
from moegps.files import atomic_path
from moegps.kernels import launch, swap_moe, wgmma_moe
from moegps.kernels.launch import fused_moe, launch_down, launch_gate_up, route
from moegps.kernels.reference import moe_reference
from moegps.kernels.timing import make_inputs, make_routing, rel_err, time_many

# (block_n, block_k, num_warps, num_stages) candidates per path; each GEMM picks its own
# Elements after the fourth name variants (in VARIANTS order): "paired" (gate/up only: one dot
# of twice the width, PAIRED), "tma" (sorted path: weights through tensor descriptors); both: the
# gate and up tiles in one stacked copy.
SCAN_TILES = [(32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 2), (128, 128, 8, 3),
              (64, 128, 4, 4, "paired"), (32, 256, 4, 3, "paired")]
SORTED_TILES = [(64, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                (128, 64, 8, 5), (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4),
                (64, 64, 8, 4), (64, 128, 4, 4, "paired"), (128, 64, 8, 3, "paired"),
                (128, 64, 8, 4, "paired"), (64, 64, 8, 4, "paired"), (64, 128, 8, 3, "paired"),
                (64, 128, 4, 4, "tma"), (128, 64, 8, 3, "tma"), (128, 64, 8, 4, "tma"),
                (128, 128, 8, 3, "tma"), (256, 64, 8, 3, "tma"), (256, 64, 8, 4, "tma"),
                (128, 64, 4, 2, "tma"), (128, 64, 4, 3, "tma"), (256, 64, 4, 2, "tma"),
                (64, 64, 8, 3, "tma"), (64, 128, 8, 3, "tma"),
                # gate/up only: the gate and up tiles in one stacked copy, one dot of 2 x block_n
                (128, 64, 8, 4, "paired", "tma"), (128, 64, 8, 3, "paired", "tma"),
                (64, 64, 8, 4, "paired", "tma"), (64, 128, 8, 3, "paired", "tma"),
                (64, 128, 4, 4, "paired", "tma")]
# swap path (swap_moe.py): block_n is the weight rows per program (gate/up: that many gate and
# as many up rows); 8 warps split an expert's up to 256 token columns (4 would hold twice the
# accumulators). Compiled for sm_90: gate/up at block_m 256 takes 254 registers with block_n 64
# and spills with 128; block_m 160 holds block_n 128 (255) and down block_n 256 (253), unspilled;
# block_m 192 gate/up block_n 128 at 4 stages (255; 8 bytes spill at 3) and down block_n 128 (211;
# 256 spills 304 bytes).
SWAP_TILES = [(64, 64, 8, 3, "tma"), (64, 64, 8, 4, "tma"), (128, 64, 8, 3, "tma"),
              (128, 64, 8, 4, "tma"), (32, 64, 8, 4, "tma"), (128, 64, 8, 5, "tma"),
              (128, 64, 8, 6, "tma"), (128, 128, 8, 3, "tma"), (256, 64, 8, 4, "tma")]
# fused path: (block_f, block_k, block_n, num_warps, num_stages[, variant]); 64 experts at T=1
# with block_f 64 is 6 slots x 22 F tiles = 132 programs, one per H100 SM
FUSED_TILES = [(64, 128, 128, 4, 3), (64, 128, 64, 4, 4), (64, 256, 128, 8, 2),
               (32, 256, 128, 4, 3), (32, 128, 256, 4, 3), (128, 64, 64, 4, 3),
               (128, 64, 128, 8, 3), (16, 256, 256, 4, 3), (64, 128, 128, 4, 3, "paired"),
               (32, 256, 128, 4, 3, "paired"), (64, 64, 128, 4, 4, "tma"),
               (64, 64, 128, 4, 6, "tma"), (64, 128, 128, 4, 3, "tma"), (32, 64, 128, 4, 6, "tma"),
               (32, 128, 64, 4, 4, "tma"), (64, 64, 64, 4, 6, "tma"), (128, 64, 64, 4, 4, "tma"),
               (64, 64, 128, 8, 5, "tma"), (64, 128, 128, 4, 3, "paired", "tma"),
               (64, 64, 128, 4, 4, "paired", "tma")]
# GROUP_M the tuner tries for the sorted path's best tiles: how many row blocks walk the N tiles
# together. When one group takes every block, an expert's blocks never straddle two groups, whose
# sweeps would each read its weights from DRAM: Mixtral at 512 tokens (~12 blocks), gate/up 8%
# and down 4.5% faster with 16 than with 8 (NOTES.md, session 6 probe).
GROUP_MS = (8, 16, 32)
# the tuner tries the fused path up to this many (token, slot) pairs (64 experts T=8: 48)
FUSED_MAX_PAIRS = 64
VARIANTS = ("paired", "tma")  # tile flags, in the order candidate tuples name them


def variants(d: dict) -> tuple:
    """The variant names a tile dict sets, in candidate-tuple order."""
    return tuple(v for v in VARIANTS if d.get(v))


def fused_config(t) -> dict:
    return {"path": "fused", "block_m": 16,
            "fused": {"block_f": t[0], "block_k": t[1], "block_n": t[2], "num_warps": t[3],
                      "num_stages": t[4], **dict.fromkeys(t[5:], True)}}


def paired(t) -> bool:
    return "paired" in t[4:]


def tile(t, group_m=8):
    """A GEMM's tile dict from a candidate tuple (block_n, block_k, warps, stages[, variant])."""
    d = {"block_n": t[0], "block_k": t[1], "group_m": group_m, "num_warps": t[2],
         "num_stages": t[3]}
    return dict(d, **dict.fromkeys(t[4:], True))


def tile_tuple(g: dict) -> tuple:
    """The candidate tuple of a GEMM's tile dict (inverse of `tile`)."""
    return (g["block_n"], g["block_k"], g["num_warps"], g["num_stages"]) + variants(g)


def config_tasks(name: str, shape: tuple, config: dict) -> set:
    """The precompile tasks (name, shape, path, block, tile) of one config: its fused tile (the
    inverse of `fused_config`), or its two GEMM tiles; none for the Gluon kernels of the
    "wgmma" path, which compile on first use (the tuner does not search them)."""
    if config["path"] == "wgmma":
        return set()
    if config["path"] == "fused":
        f = config["fused"]
        t = tuple(f[k] for k in ("block_f", "block_k", "block_n", "num_warps", "num_stages"))
        return {(name, shape, "fused", config_block(config), t + variants(f))}
    return {(name, shape, config["path"], config_block(config), tile_tuple(config[gemm]))
            for gemm in ("gate_up", "down")}


def describe_tile(t: dict | tuple) -> str:
    """'128x64x8x8x4 paired tma': a tile's sizes, then its flags (a dict or a candidate tuple)."""
    values = t.values() if isinstance(t, dict) else t
    flags = [k for k, v in t.items() if v is True] if isinstance(t, dict) else []
    return " ".join(["x".join(str(v) for v in values if isinstance(v, int) and not isinstance(v, bool))]
                    + flags + [v for v in values if isinstance(v, str)])


def describe(config: dict) -> str:
    """One line naming a config's path, block and tiles (the tuner's log)."""
    if config["path"] == "fused":
        return "fused " + describe_tile(config["fused"])
    gemms = " / ".join(describe_tile(config[g]) for g in ("gate_up", "down"))
    return (f"{config['path']}{' swap' if config.get('swap') else ''}{' one' if config.get('one') else ''}"
            f" block_m {config['block_m']}"
            f"{' half' if config.get('half_tail') else ''} {gemms}"
            f" combine {config.get('combine', 'sum')}")


def blocks(path: str, rows: float) -> list[tuple[int, bool]]:
    """(BLOCK_M, half_tail) candidates for a path given the mean rows per expert (empty: path
    not tried). Half tails from 64-row blocks up: their half blocks still fill a warp group's
    64-row MMA on Hopper (NOTES.md v10)."""
    if path == "scan":
        return [(16, False)] if rows <= 12 else [(32, False)] if rows <= 24 else []
    if path == "swap":  # an expert's rows in blocks of up to 128-256 (padded to 32). Past 320 rows
        # an expert it lost everywhere it was tried: Mixtral at 1024 and 2048 tokens (256 and 512
        # rows; 8% and 10% slower than the wgmma entries), the 64 experts at 2048 (NOTES.md v24)
        return [(bm, False) for bm in swap_moe.BLOCK_MS] if 16 <= rows <= 320 else []
    if rows < 2:
        return []
    if rows > 512:  # 64 (two CTAs per SM) and 256 never won (NOTES.md v8, v9; 256 at 8192-16384
        bms = [128]     # tokens 3-25% slower in call 25)
    else:
        bms = [16, 32] if rows <= 24 else [32, 64] if rows <= 96 else [64, 128]
    return [(bm, half) for bm in bms for half in ((False, True) if bm >= 64 else (False,))]


def base_config(path: str, block: tuple[int, bool]) -> dict:
    """The routing part of a config: path, block_m and (when set) half_tail."""
    bm, half = block
    return {"path": path, "block_m": bm, **({"half_tail": True} if half else {})}


def config_block(config: dict) -> tuple[int, bool]:
    """(BLOCK_M, half_tail) of a config (inverse of `base_config`'s block)."""
    return config["block_m"], bool(config.get("half_tail", False))


PATHS = ("fused", "scan", "sorted", "swap")  # the paths the tuner can search


def candidates(n_tokens, n_experts, top_k, paths=PATHS) -> list[tuple[str, tuple[int, bool], list]]:
    """(path, (BLOCK_M, half_tail), tiles) groups the tuner tries for one (shape, token count),
    of the named paths only."""
    rows = n_tokens * top_k / n_experts
    fused = [("fused", (16, False), FUSED_TILES)] if n_tokens * top_k <= FUSED_MAX_PAIRS else []
    groups = fused + [(path, block, tiles)
                      for path, tiles in (("scan", SCAN_TILES), ("sorted", SORTED_TILES),
                                          ("swap", SWAP_TILES))
                      for block in blocks(path, rows)]
    return [group for group in groups if group[0] in paths]


# ---------------------------------------------------------------------------------------------
# the shapes: registry names, and NAME+shared for the call the engine makes with a shared expert

SHARED_SUFFIX = "+shared"


def shared_columns(name: str) -> int:
    """How many experts of shape ``name`` are a shared expert's pieces: 0 for a registry name;
    for 'NAME+shared', NAME's shared expert cut into experts' widths (engine.model.Layer.n_shared)."""
    if not name.endswith(SHARED_SUFFIX):
        return 0
    base = name.removesuffix(SHARED_SUFFIX)
    s = shape_registry.from_name(base)
    if not s.shared_ffn or s.shared_ffn % s.expert_ffn:
        raise ValueError(f"shape {name!r}: {base} has no shared expert of a whole number of experts' widths "
                         f"(shared_ffn {s.shared_ffn}, expert_ffn {s.expert_ffn})")
    return s.shared_ffn // s.expert_ffn


RANK_SEPARATOR = "@"


def expert_dims(name: str) -> tuple[int, int, int, int]:
    """(E, H, F, k) the expert kernels see for a registry shape (moegps.shapes); for 'NAME+shared' the
    engine's call with NAME's shared expert among the experts: E + n experts, top-(k + n); for 'NAME@N' one
    expert-parallel rank's call: N of NAME's experts, top-1 (a rank computes a selection of one of its
    experts as a row of its own, executor.layer.expert_compute, and holds only those experts' weights)."""
    base, _, held = name.partition(RANK_SEPARATOR)
    s = shape_registry.from_name(base.removesuffix(SHARED_SUFFIX))
    n = shared_columns(base)
    if not held:
        return s.n_experts + n, s.hidden, s.expert_ffn, s.top_k + n
    if not held.isdigit() or not 1 <= int(held) <= s.n_experts + n:
        raise ValueError(f"shape {name!r}: after {RANK_SEPARATOR!r} the number of experts a rank holds, 1 to "
                         f"{s.n_experts + n}")
    return int(held), s.hidden, s.expert_ffn, 1


def shape_names() -> list[str]:
    """Registry names, and NAME+shared for each shape whose shared expert is whole experts wide."""
    names = shape_registry.names()
    return names + [n + SHARED_SUFFIX for n in names
                    if (s := shape_registry.from_name(n)).shared_ffn and s.shared_ffn % s.expert_ffn == 0]


def shape_arg(name: str) -> str:
    """``name`` if ``expert_dims`` takes it (a command line's type: its error lists the names)."""
    try:
        expert_dims(name)
    except (KeyError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{name!r}: {e}; expected one of {shape_names()}, or NAME"
                                         f"{RANK_SEPARATOR}N for one rank's N experts (top-1)") from None
    return name


# ---------------------------------------------------------------------------------------------
# compilation and GPU correctness on edge cases (bf16), mirroring the interpreter tests


def check_edge_cases() -> list[str]:
    tiles = {"gate_up": tile((64, 64, 4, 3)), "down": tile((64, 64, 4, 3))}
    failures = []
    cases = {  # name: (T, E, H, F, k, ids or None)
        "random": (37, 6, 256, 192, 2, None),
        "empty_experts": (21, 7, 256, 192, 2, "empty"),
        "one_expert_all_top1": (45, 5, 256, 192, 1, "all"),
        "top4": (19, 8, 256, 192, 4, None),
        "one_token_top4": (1, 8, 256, 192, 4, None),
        "odd_hidden": (33, 4, 200, 100, 2, None),
        # more pairs than align's one-launch method takes: the chunked launches
        "chunked_align": (2100, 6, 256, 192, 2, None),
        "chunked_align_e64": (800, 64, 256, 192, 6, None),
        # decode sizes of the fused path at the 64-expert shape's ratios (H, F not multiples of 128)
        **{f"decode_T{T}_top6": (T, 64, 320, 176, 6, None) for T in (1, 2, 3, 5, 8)},
        "decode_hot_expert": (8, 16, 320, 176, 4, "hot"),
    }
    configs = {"scan": dict(tiles, path="scan", block_m=16),
               "sorted": dict(tiles, path="sorted", block_m=16),
               "fused": fused_config((64, 64, 64, 4, 3)),
               "fused_tma": fused_config((64, 64, 64, 4, 3, "tma")),
               "scan_atomic": dict(tiles, path="scan", block_m=16, combine="atomic"),
               "sorted_paired": {"path": "sorted", "block_m": 16, "down": tiles["down"],
                                 "gate_up": tile((64, 64, 4, 3, "paired"))},
               "sorted_tma": {"path": "sorted", "block_m": 16, "gate_up": tile((64, 64, 4, 3, "tma")),
                              "down": tile((64, 64, 4, 3, "tma"))},
               # half tails: 16-row (mma.sync) and 64-row (wgmma) half blocks
               "sorted_half": dict(tiles, path="sorted", block_m=32, half_tail=True),
               "sorted_tma_half": {"path": "sorted", "block_m": 128, "half_tail": True,
                                   "gate_up": tile((64, 64, 8, 3, "tma")),
                                   "down": tile((64, 64, 8, 3, "tma"))},
               "sorted_tma_paired": {"path": "sorted", "block_m": 128, "half_tail": True,
                                     "gate_up": tile((64, 64, 8, 3, "paired", "tma")),
                                     "down": tile((64, 64, 8, 3, "tma"))},
               "fused_tma_paired": fused_config((64, 64, 64, 4, 3, "paired", "tma")),
               "sorted_tma_atomic": {"path": "sorted", "block_m": 128, "half_tail": True,
                                     "combine": "atomic", "gate_up": tile((64, 64, 8, 3, "tma")),
                                     "down": tile((64, 64, 8, 3, "tma"))},
               # the swap path's column parts: one block of up to 256 rows, pointers or TMA
               "swap": {"path": "swap", "block_m": 256, "gate_up": tile((64, 64, 8, 3)),
                        "down": tile((64, 64, 8, 3))},
               "swap_tma": {"path": "swap", "block_m": 128, "gate_up": tile((64, 64, 8, 3, "tma")),
                            "down": tile((64, 64, 8, 3, "tma"))},
               "swap_tma_160": {"path": "swap", "block_m": 160,
                                "gate_up": tile((128, 64, 8, 3, "tma")),
                                "down": tile((256, 64, 8, 3, "tma"))}}
    for (case, (T, E, H, Fd, k, kind)), path in itertools.product(cases.items(), configs):
        if path.startswith("sorted") and case.startswith("decode"):
            continue
        x, w13, w2 = make_inputs(E, H, Fd, k, T, seed=7)
        ids, weights = make_routing(T, E, k, seed=7)
        if kind == "empty":
            ids = torch.tensor([0, 1, 4, 6], device="cuda")[make_routing(T, 4, k, seed=3)[0]]
        if kind == "all":
            ids = torch.full((T, 1), 3, device="cuda")
        if kind == "hot":  # expert 5 in every token's top-k
            ids[:, 0] = torch.where((ids == 5).any(dim=1), ids[:, 0], 5)
        ref = moe_reference(x.double(), w13.double(), w2.double(), ids, weights.double())
        ws = {"h": torch.full((T * k, Fd), float("nan"), dtype=x.dtype, device="cuda"),
              "y": torch.full((T * k, H), float("nan"), dtype=x.dtype, device="cuda"),
              "scratch": torch.full((E * T * k,), -7, dtype=torch.int32, device="cuda")}
        errs, finite = [], True
        try:
            # atomics: a race shows as a spread
            for _ in range(3 if path.startswith("fused") or "atomic" in path else 1):
                out = fused_moe(x, w13, w2, ids, weights, workspace=ws, config=configs[path])
                errs.append(rel_err(out, ref.float()))
                finite = finite and bool(torch.isfinite(out).all())
        except Exception as exc:  # a variant that does not compile here is a failure, not a crash
            print(f"  check {case} {path}: {type(exc).__name__}: {str(exc)[:200]}")
            errs, finite = [float("inf")], False
        err = max(errs)
        ok = finite and err < 1e-2
        print(f"  check {case:22s} {path:13s} rel_err {err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{case}/{path}")
    return failures


# ---------------------------------------------------------------------------------------------
# the search


def _compile_task(task):
    """Pool worker: compile one (path, (BLOCK_M, half_tail), tile) for each GEMM by running it on
    small inputs. Returns the task and, per GEMM, None or the error (a tile that does not fit is
    skipped)."""
    name, (n_experts, hidden, ffn, top_k), path, block, t = task
    w13 = torch.empty(n_experts, 2 * ffn, hidden, dtype=torch.bfloat16, device="cuda").normal_()
    w2 = torch.empty(n_experts, hidden, ffn, dtype=torch.bfloat16, device="cuda").normal_()
    x = torch.randn(16, hidden, dtype=torch.bfloat16, device="cuda")
    if path == "fused":  # one kernel
        ids = torch.randint(0, n_experts, (16, top_k), device="cuda")
        try:
            fused_moe(x, w13, w2, ids, torch.rand(16, top_k, device="cuda"), config=fused_config(t))
            torch.cuda.synchronize()
            return task, [None]
        except Exception as exc:
            return task, [f"{type(exc).__name__}: {str(exc)[:120]}"]
    config = dict(base_config(path, block), gate_up=tile(t), down=tile(t))
    ids = torch.randint(0, n_experts, (16 * top_k,), device="cuda")
    h = torch.randn(16 * top_k, ffn, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(16 * top_k, hidden, dtype=torch.bfloat16, device="cuda")
    routing = route(ids, n_experts, config)
    gates = torch.rand(16 * top_k, device="cuda")
    acc = torch.zeros(16, hidden, device="cuda")
    errors = []
    for run in (lambda: launch_gate_up(x, w13, h, ids, routing, config, top_k),
                lambda: launch_down(h, w2, y, gates, ids, routing, config, top_k),
                # the atomic-combine variant of TMA down tiles (the large-batch winners; others
                # compile when the tuner first times them)
                lambda: "tma" in t and launch_down(h, w2, acc, gates, ids, routing,
                                                   dict(config, combine="atomic"), top_k)):
        try:
            run()
            torch.cuda.synchronize()
            errors.append(None)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
    return task, errors


def precompile(tasks, workers):
    """Compile in parallel processes (Triton's disk cache then serves the main process), with the
    GPU edge-case checks running beside them. Returns {(name, path, block, tile, gemm): error}."""
    failed = {}
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        check = pool.apply_async(check_edge_cases)
        for (name, _, path, block, t), errors in pool.imap_unordered(_compile_task, tasks):
            gemms = ("fused",) if path == "fused" else ("gate_up", "down", "down_atomic")
            for gemm, err in zip(gemms, errors):
                if err:
                    failed[(name, path, block, t, gemm)] = err
        failures = check.get()
    print(f"precompiled {len(tasks)} (path, block, tile) tasks in {time.time() - t0:.0f} s;"
          f" {len(failed)} kernels do not fit (skipped)", flush=True)
    print("edge cases:", "all ok" if not failures else f"FAILED {failures}", flush=True)
    return failed


def tune_one(name, shape, n_tokens, failed, seed=0, paths=PATHS, incumbent=None, routing=None) -> dict:
    """Best config for one (shape, tokens): each GEMM's tile timed alone per (path, block), then
    the best pair timed whole (routing + both GEMMs + combine, CUDA graph) with each combine
    (the k-way combine kernel, atomics in the down GEMM); each fused tile (decode) timed whole.
    `incumbent` (the file's config for these tokens, if any) competes in the whole-call round,
    so a search of fewer `paths` keeps it unless something beats it. `routing`: (ids, weights) to
    tune on instead of random routing (a replay's shares, `timing.share_routing`)."""
    n_experts, hidden, ffn, top_k = shape
    x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens, seed)
    ids, weights = routing if routing is not None else make_routing(n_tokens, n_experts, top_k, seed,
                                                                    shared=shared_columns(name))
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    n_pairs = n_tokens * top_k
    h = torch.empty(n_pairs, ffn, dtype=x.dtype, device="cuda")
    y = torch.empty(n_pairs, hidden, dtype=x.dtype, device="cuda")
    # the whole-call candidates, timed together at the end
    whole = [config_of(incumbent)] if incumbent else []

    for path, block, tiles in candidates(n_tokens, n_experts, top_k, paths):
        if path == "fused":
            whole += [fused_config(t) for t in tiles
                      if (name, path, block, t, "fused") not in failed]
            continue
        gu_tiles = [t for t in tiles if (name, path, block, t, "gate_up") not in failed]
        dn_tiles = [t for t in tiles
                    if not paired(t) and (name, path, block, t, "down") not in failed]
        if not gu_tiles or not dn_tiles:
            continue
        base = base_config(path, block)
        routing = route(flat_ids, n_experts, base)

        def gate_up_run(d, base=base, routing=routing):
            cfg = dict(base, gate_up=d)
            return lambda: launch_gate_up(x, w13, h, flat_ids, routing, cfg, top_k)

        def down_run(d, base=base, routing=routing):
            cfg = dict(base, down=d)
            return lambda: launch_down(h, w2, y, flat_w, flat_ids, routing, cfg, top_k)

        def best_tile(tiles, run, gemm):
            """The fastest tile (a dict), then for the sorted path its best GROUP_M."""
            us = time_many({t: run(tile(t)) for t in tiles}, warmup=5, rep=25)
            best3 = sorted(us, key=us.get)[:3]  # the log: the three fastest
            print(f"    {path} {block} {gemm}: "
                  + ", ".join(f"{describe_tile(t)} {us[t]:.1f}" for t in best3), flush=True)
            if path == "scan":  # the scan path's grid has no row-block order
                return tile(best3[0])
            us = time_many({g: run(tile(best3[0], group_m=g)) for g in GROUP_MS},
                           warmup=5, rep=25)
            print(f"    {path} {block} {gemm} group_m: "
                  + ", ".join(f"{g} {us[g]:.1f}" for g in GROUP_MS), flush=True)
            return tile(best3[0], group_m=min(us, key=us.get))

        gu = best_tile(gu_tiles, gate_up_run, "gate_up")
        # also leaves real values in h for the down GEMM
        launch_gate_up(x, w13, h, flat_ids, routing, dict(base, gate_up=gu), top_k)
        dn = best_tile(dn_tiles, down_run, "down")
        for combine in ("sum", "atomic") if top_k > 1 else ("sum",):
            whole.append(dict(base, gate_up=gu, down=dn,
                              **({"combine": "atomic"} if combine == "atomic" else {})))
    if incumbent and incumbent["path"] in ("scan", "sorted", "swap"):  # its GEMMs alone, in the log
        current = whole[0]
        routing = route(flat_ids, n_experts, current)
        launch_gate_up(x, w13, h, flat_ids, routing, current, top_k)
        us = time_many({"gate_up": lambda: launch_gate_up(x, w13, h, flat_ids, routing, current,
                                                          top_k),
                        "down": lambda: launch_down(h, w2, y, flat_w, flat_ids, routing,
                                                    dict(current, combine="sum"), top_k)},
                       warmup=5, rep=25)
        print(f"    incumbent gate_up {us['gate_up']:.1f}, down {us['down']:.1f}", flush=True)
    runs = {}
    for i, config in enumerate(whole):
        run = functools.partial(fused_moe, x, w13, w2, ids, weights, config=config)
        try:
            run()
            torch.cuda.synchronize()
            runs[i] = run
        except Exception as exc:  # a variant that does not compile here is skipped
            print(f"  skipped {config}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    us = time_many(runs, graph=set(runs), warmup=5, rep=40)
    for i in runs:
        print(f"    whole call {us[i]:9.1f} us: {describe(whole[i])}", flush=True)
    best = min(us, key=us.get)
    if incumbent and best == 0:  # kept: it stays as it was tuned (its own record)
        print(f"  kept {name} T={n_tokens}: {describe(whole[0])}", flush=True)
        return incumbent
    config = dict(whole[best], us=round(us[best], 2))
    print(f"  tuned {name} T={n_tokens}: {config}", flush=True)
    return config


def config_of(entry: dict) -> dict:
    """A table entry without its record of how it was found (time, command, machine): the config itself."""
    return {k: v for k, v in entry.items() if k not in ("us", "tuned_by", "tuned_on", "kept_by")}


def device_table() -> tuple[Path, dict]:
    """This device's config file (configs/<device>.json) and its table ({"shapes": {}} if new)."""
    path = launch.CONFIG_DIR / f"{launch.device_name()}.json"
    return path, json.loads(path.read_text()) if path.exists() else {"shapes": {}}


def put_entry(table: dict, key: str, n_tokens: int, entry: dict) -> None:
    """Set the table's config of (shape key, token count), its token counts kept in order."""
    by_tokens = table["shapes"].setdefault(key, {})
    by_tokens[str(n_tokens)] = entry
    table["shapes"][key] = dict(sorted(by_tokens.items(), key=lambda kv: int(kv[0])))


def write_table(table: dict, targets) -> None:
    """Write the table to each target (temporary file, then rename) and drop launch's cached copy."""
    text = json.dumps(table, indent=1)
    for target in targets:
        with atomic_path(target) as tmp:
            tmp.write_text(text)
    launch._tuned_table.cache_clear()


def write_winners(rows, variants: dict, command: str) -> None:
    """Merge a probe's winning variants into the device's config table (atomic rewrite). rows:
    {"shape", "tokens", "ours_us" (the shipped config's whole call), "<variant>_us" for each of
    `variants` ({name: config}), timed in the same rounds}; a variant goes in where it beats the
    shipped config by 2% or more and is not that config itself."""
    path, table = device_table()
    for row in rows:
        best = min(variants, key=lambda v: row[f"{v}_us"])
        if row[f"{best}_us"] > 0.98 * row["ours_us"]:
            continue
        shipped = launch.get_config(row["tokens"], *expert_dims(row["shape"]))
        if config_of(shipped) == variants[best]:
            # the shipped config itself, timed as a variant (session 14 call 7: Mixtral 8192 as
            # "ht" 2.2% faster than as "ours" in the same rounds)
            continue
        entry = dict(variants[best], us=round(row[f"{best}_us"], 2), tuned_by=command)
        if entry.get("one"):  # what a Triton that cannot build its MMAs runs instead (get_config)
            entry["else"] = shipped
        put_entry(table, launch.shape_key(*expert_dims(row["shape"])), row["tokens"], entry)
        print(f"config: {row['shape']} T={row['tokens']} -> {best} ({row[f'{best}_us']:.1f} us "
              f"against {row['ours_us']:.1f})", flush=True)
    write_table(table, (path,))


def write_size_winner(shape: str, n_tokens: int, own: dict, other: dict, own_us: float, other_us: float,
                      command: str) -> str:
    """Write into the device's table, at this size, ``other`` where it beat ``own`` (what the table served) by
    2% or more in the same rounds, else ``own`` again: written either way, so that a neighbour's new entry
    does not become this size's nearest (benchmarks/kernels/table_probe.py). Returns "other" or "own"."""
    label = "other" if other_us <= 0.98 * own_us else "own"
    config, us = (other, other_us) if label == "other" else (own, own_us)
    entry = config_of(config)
    entry.update(us=round(us, 2), **{("tuned_by" if label == "other" else "kept_by"): command})
    path, table = device_table()
    put_entry(table, launch.shape_key(*expert_dims(shape)), n_tokens, entry)
    write_table(table, (path,))
    return label


def tune(shapes, tokens, out_dir: Path, workers: int, command: str, seed: int = 0,
         paths=PATHS, routing_for=None) -> Path:
    """Tune each (shape, tokens) over `paths` and merge the results into configs/<device>.json
    (and a copy in out_dir), rewritten after each one (temporary file, then rename): a run cut
    short keeps what it finished. Token counts not tuned now keep their entries. With fewer
    paths than all, what serves the token count now competes (tune_one's incumbent): its entry,
    or where it has none the nearest one `get_config` takes (or the default); when that one wins,
    no entry is written (the nearest keeps serving), so that a search of one path cannot put a
    slower config where another path's entry served. `routing_for(name, shape, n_tokens)`: the
    routing to tune on, or None for random routing."""
    tasks = set()
    for name, shape in shapes.items():
        for n_tokens in tokens:
            for path, block, tiles in candidates(n_tokens, shape[0], shape[3], paths):
                tasks.update((name, shape, path, block, t) for t in tiles)
            tasks |= config_tasks(name, shape, launch.default_config(n_tokens, *shape))
    failed = precompile(sorted(tasks, key=str), workers)
    path, table = device_table()
    table.update({"device": launch.device_name(), "torch": torch.__version__,
                  "triton": __import__("triton").__version__,
                  "command": command})
    for name, shape in shapes.items():
        key = launch.shape_key(*shape)
        for n_tokens in tokens:
            own = table["shapes"].get(key, {}).get(str(n_tokens))
            # what this machine runs of its own entry (a one-MMA entry's "else" where it cannot
            # build it; that entry stays where its "else" keeps winning)
            runnable = launch.runnable_entry(own, wgmma_moe.supported())
            incumbent = None
            if set(paths) != set(PATHS):
                incumbent = runnable or launch.get_config(n_tokens, *shape)
            routing = routing_for(name, shape, n_tokens) if routing_for else None
            config = tune_one(name, shape, n_tokens, failed, seed, paths, incumbent, routing)
            if config is incumbent and (own is None or runnable is not own):
                print(f"  {name} T={n_tokens}: the nearest entry (or the default) stays", flush=True)
                continue
            # each entry names the command that tuned it (the file merges several runs)
            put_entry(table, key, n_tokens, dict(config, kept_by=command) if config is incumbent
                      else dict(config, tuned_by=command))
            write_table(table, (out_dir / path.name, path))
    print(f"wrote {path} and {out_dir / path.name}", flush=True)
    return path
