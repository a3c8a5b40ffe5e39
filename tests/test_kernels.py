"""Fused MoE Triton kernels on the CPU interpreter (fp16/fp32), against a float64 reference."""

import os

_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (conftest.py: its own library)

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moegps.kernels  # noqa: F401  (imports its submodules)
from conftest import redecorate_kernels

# Another test module may have imported the kernels before the variable was set (Triton decides
# interpreted or compiled when it decorates): decorate them again.
redecorate_kernels()
# back as it was once decorated: other modules' code picks Triton on the CPU while the variable is set
# (the engine), so it is set for this module's tests only, by the fixture below
if _interpret is None:
    del os.environ["TRITON_INTERPRET"]

from moegps.kernels import align, available, default_config, fused_moe, get_config, moe_reference  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


TILE = {"block_n": 32, "block_k": 32, "group_m": 2, "num_warps": 4, "num_stages": 2}
CONFIGS = {
    "scan": {"path": "scan", "block_m": 16, "gate_up": dict(TILE), "down": dict(TILE, block_k=64)},
    "sorted": {"path": "sorted", "block_m": 16, "gate_up": dict(TILE, block_n=64),
               "down": dict(TILE, group_m=3)},
    # F tiles of 16 and H tiles of 32: the test shapes leave partial tiles on both
    "fused": {"path": "fused", "block_m": 16, "fused": {"block_f": 16, "block_k": 32,
                                                        "block_n": 32, "num_warps": 4,
                                                        "num_stages": 2}},
}
# the same with the gate/up GEMM as one interleaved dot (PAIRED); F = 40 leaves a partial pair tile
for _path in ("scan", "sorted", "fused"):
    _cfg = {key: dict(val) if isinstance(val, dict) else val for key, val in CONFIGS[_path].items()}
    _cfg["fused" if _path == "fused" else "gate_up"]["paired"] = True
    CONFIGS[f"{_path}_paired"] = _cfg
# the sorted path with the weights fed through tensor descriptors (TMA on Hopper)
CONFIGS["sorted_tma"] = {**CONFIGS["sorted"], "gate_up": dict(CONFIGS["sorted"]["gate_up"], tma=True),
                         "down": dict(CONFIGS["sorted"]["down"], tma=True)}
# both: the gate and up tiles in one stacked copy, one dot of twice the width
CONFIGS["sorted_tma_paired"] = {**CONFIGS["sorted_tma"],
                                "gate_up": dict(CONFIGS["sorted_tma"]["gate_up"], paired=True)}
# each expert's last block at half height where it fits (32-row blocks, 16-row tails)
CONFIGS["sorted_half"] = {**CONFIGS["sorted"], "block_m": 32, "half_tail": True}
CONFIGS["sorted_tma_half"] = {**CONFIGS["sorted_tma"], "block_m": 32, "half_tail": True}
# the fused decode path with both weights through tensor descriptors
CONFIGS["fused_tma"] = {**CONFIGS["fused"], "fused": dict(CONFIGS["fused"]["fused"], tma=True)}
CONFIGS["fused_tma_paired"] = {**CONFIGS["fused"],
                               "fused": dict(CONFIGS["fused"]["fused"], tma=True, paired=True)}
# the k-way combine as atomics in the down GEMM's epilogue (k = 1 keeps the plain store)
CONFIGS["scan_atomic"] = {**CONFIGS["scan"], "combine": "atomic"}
CONFIGS["sorted_tma_half_atomic"] = {**CONFIGS["sorted_tma_half"], "combine": "atomic"}
# the swap path (weights on the MMA's rows, an expert's tokens on its columns), 256- and 128-row
# blocks, pointer and TMA weights, both combines
CONFIGS["swap"] = {**CONFIGS["sorted"], "path": "swap", "block_m": 256}
CONFIGS["swap_tma_128_atomic"] = {**CONFIGS["sorted_tma"], "path": "swap", "block_m": 128,
                                  "combine": "atomic"}
CONFIGS["swap_tma_160"] = {**CONFIGS["sorted_tma"], "path": "swap", "block_m": 160}
CONFIGS["swap_tma_192"] = {**CONFIGS["sorted_tma"], "path": "swap", "block_m": 192}

PATHS = list(CONFIGS)


def brute_force(x, w_gate_up, w_down, topk_ids, topk_weights):
    """float64, one (token, slot) at a time: the definition, independent of moe_reference."""
    x, w13, w2, wts = (t.double() for t in (x, w_gate_up, w_down, topk_weights))
    ffn = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            act = F.silu(w13[e, :ffn] @ x[t]) * (w13[e, ffn:] @ x[t])
            out[t] += wts[t, j] * (w2[e] @ act)
    return out


def make_problem(rng, n_tokens, n_experts, hidden, ffn, top_k, dtype, ids=None):
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(n_experts, 2 * ffn, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(n_experts, hidden, ffn, generator=gen) / ffn**0.5).to(dtype)
    if ids is None:  # k distinct experts per token, as a router's top-k gives
        ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k]
                           for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, top_k, generator=gen).to(dtype) + 0.1
    return x, w13, w2, ids, weights


def poisoned_workspace(n_tokens, top_k, n_experts, hidden, ffn, dtype):
    n_pairs = n_tokens * top_k
    return {"h": torch.full((n_pairs, ffn), float("nan"), dtype=dtype),
            "y": torch.full((n_pairs, hidden), float("nan"), dtype=dtype),
            "scratch": torch.full((n_experts * n_pairs,), -7, dtype=torch.int32)}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(problem, path, dtype):
    x, w13, w2, ids, weights = problem
    n_tokens, hidden = x.shape
    n_experts, ffn, top_k = w13.shape[0], w13.shape[1] // 2, ids.shape[1]
    ref = moe_reference(x.double(), w13.double(), w2.double(), ids, weights.double())
    ws = poisoned_workspace(n_tokens, top_k, n_experts, hidden, ffn, dtype)
    out = fused_moe(x, w13, w2, ids, weights, config=CONFIGS[path], workspace=ws)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) rows in the output"
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(out, ref) < tol


def test_reference_matches_brute_force(rng):
    x, w13, w2, ids, weights = make_problem(rng, 9, 5, 12, 10, 3, torch.float64)
    ref = moe_reference(x, w13, w2, ids, weights)
    assert torch.allclose(ref, brute_force(x, w13, w2, ids, weights), rtol=1e-10, atol=1e-12)
    half = moe_reference(x.float(), w13.float(), w2.float(), ids, weights.float())
    assert half.dtype == torch.float32 and rel_err(half, ref) < 1e-5


def test_available_under_interpreter():
    assert available()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_random_routing(rng, path, dtype):
    # 37 tokens (not a multiple of BLOCK_M), F = 40 (partial N tile), H = 48 (partial K tile)
    check(make_problem(rng, 37, 6, 48, 40, 2, dtype), path, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_empty_experts(rng, path):
    n_experts = 7
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    used = torch.tensor([0, 1, 4, 6])  # experts 2, 3, 5 get no tokens
    ids = torch.stack([used[torch.randperm(4, generator=gen)[:2]] for _ in range(21)])
    check(make_problem(rng, 21, n_experts, 64, 32, 2, torch.float16, ids=ids), path, torch.float16)


@pytest.mark.parametrize("path", PATHS)
def test_one_expert_takes_all_tokens_top1(rng, path):
    ids = torch.full((45, 1), 3)  # 45 rows of one expert: three BLOCK_M blocks, the last partial
    check(make_problem(rng, 45, 5, 64, 64, 1, torch.float16, ids=ids), path, torch.float16)


@pytest.mark.parametrize("path", PATHS)
def test_top4_and_single_token(rng, path):
    check(make_problem(rng, 19, 6, 48, 32, 4, torch.float16), path, torch.float16)
    check(make_problem(rng, 1, 6, 48, 32, 4, torch.float16), path, torch.float16)


@pytest.mark.parametrize("path", ["fused", "fused_tma"])
@pytest.mark.parametrize("n_tokens", range(1, 9))
def test_fused_decode_token_counts(rng, n_tokens, path):
    """The fused (split-F, atomics) path at the decode sizes it is meant for: T = 1..8 tokens,
    top-3 of 10 experts, H = 40 and F = 24 (neither a multiple of the 32/16 tiles), fp16."""
    check(make_problem(rng, n_tokens, 10, 40, 24, 3, torch.float16), path, torch.float16)


@pytest.mark.parametrize("path", ["swap", "swap_tma_128_atomic", "swap_tma_160", "swap_tma_192"])
def test_swap_every_column_split(rng, path):
    """Experts of 1 to 300 rows in the first slot: every block height the swap kernels split into
    column parts (32 to 256 rows in steps of 32, each a compiled variant), an expert of two blocks
    and one with no rows; the second slot takes experts 11 and 12 (several blocks each). H = 48 and
    F = 40 (partial tiles)."""
    counts = [1, 40, 70, 100, 128, 150, 190, 220, 250, 300, 0]
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    first = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    first = first[torch.randperm(first.numel(), generator=gen)]
    ids = torch.stack([first, 11 + torch.arange(first.numel()) % 2], dim=1)
    meta = align(ids, 13, CONFIGS[path]["block_m"], pad_m=32)
    heights = torch.diff(meta.block_start[:int(meta.n_blocks[0]) + 1])
    assert set(heights.tolist()) == set(range(32, CONFIGS[path]["block_m"] + 1, 32))
    check(make_problem(rng, first.numel(), 13, 48, 40, 2, torch.float32, ids=ids), path,
          torch.float32)


def test_tma_falls_back_where_rows_are_not_16_byte_aligned(rng):
    """F = 36 fp16 (72-byte w2 rows): the copy engine cannot address w2, so the TMA configs run
    on pointer loads; the result must not change."""
    for path in ("fused_tma", "sorted_tma_half_atomic"):
        check(make_problem(rng, 11, 5, 48, 36, 2, torch.float16), path, torch.float16)


def test_fused_expert_in_every_token(rng):
    """Expert 4 in every token's top-3 (20 rows: two BLOCK_M blocks of one expert, each adding
    into different tokens' rows), the other two slots random; fp32 against float64."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    others = torch.stack([torch.randperm(7, generator=gen)[:2] for _ in range(20)])
    others = others + (others >= 4).long()  # experts 0..7 without 4
    ids = torch.cat([others[:, :1], torch.full((20, 1), 4), others[:, 1:]], dim=1)
    check(make_problem(rng, 20, 8, 40, 48, 3, torch.float32, ids=ids), "fused", torch.float32)


def test_fused_repeated_expert_in_a_token(rng):
    """Two slots of one token on the same expert (no router does this, but the sum must still
    count both): two rows of one atomic tile hit the same output row."""
    ids = torch.tensor([[2, 2], [0, 2], [1, 1]])
    check(make_problem(rng, 3, 4, 48, 40, 2, torch.float16, ids=ids), "fused", torch.float16)


def test_default_configs_run(rng):
    """The default for unseen shapes picks both paths across batch sizes; each must be right."""
    x, w13, w2, ids, weights = make_problem(rng, 24, 16, 64, 64, 2, torch.float16)
    ref = moe_reference(x.double(), w13.double(), w2.double(), ids, weights.double())
    paths = set()
    # rows per expert 0.1 (fused), 5 (scan), 19 (sorted, TMA), 38, 150 (half tails), 512
    for n_tokens in (1, 40, 150, 300, 1200, 4096):
        cfg = default_config(n_tokens, 16, 64, 64, 2)
        paths.add(cfg["path"])
        assert rel_err(fused_moe(x, w13, w2, ids, weights, config=cfg), ref) < 2e-3
    assert paths == {"fused", "scan", "sorted"}
    # the measured regimes (NOTES.md v4, v12): fused for 64-expert decode up to 64 pairs, not
    # for Mixtral-sized experts
    assert [default_config(t, 64, 2048, 1408, 6)["path"] for t in (1, 8, 11)] == ["fused"] * 2 + ["scan"]
    assert default_config(1, 8, 4096, 14336, 2)["path"] == "scan"
    assert get_config(24, 4, 64, 64, 2)["path"] in paths
    assert default_config(300, 4, 64, 64, 2)["half_tail"]
    assert not default_config(4096, 4, 64, 64, 2)["half_tail"]
    # Mixtral-sized experts at 64-144 rows each: the swap path, blocks each expert's rows fill to
    # at most SWAP_FILL (its kernels are tested above on the CONFIGS that cover every block height)
    assert [(c["path"], c["block_m"]) for c in (default_config(t, 8, 4096, 14336, 2)
                                                for t in (255, 256, 460, 461, 576, 577))] == [
        ("sorted", 64), ("swap", 128), ("swap", 128), ("swap", 160), ("swap", 160), ("sorted", 128)]
    assert default_config(512, 8, 2048, 4096, 2)["path"] == "sorted"  # 50 MB experts
    # a dozen row blocks in all (8 experts of 50 MB at 512 tokens): one group of 16 takes them all
    one_group = default_config(512, 8, 2048, 4096, 2)
    assert [one_group[g]["group_m"] for g in ("gate_up", "down")] == [16, 16]
    assert default_config(2048, 8, 4096, 14336, 2)["gate_up"]["group_m"] == 8
    assert rel_err(fused_moe(x, w13, w2, ids, weights, config=one_group), ref) < 2e-3


@pytest.mark.parametrize("block_m,scan,half_tail,pad_m", [
    (4, 1024, False, None), (16, 1024, False, None), (4, 32, False, None), (16, 16, False, None),
    (32, 1024, True, None), (32, 16, True, None), (64, 32, True, None),
    (160, 1024, False, 32), (160, 32, False, 32), (192, 32, False, 32), (24, 1024, False, 8),
    (192, 1024, False, 64), (192, 32, False, 64)])  # the last two: wgmma_swap's blocks
def test_align_metadata(rng, block_m, scan, half_tail, pad_m):
    """One launch (few scan chunks) and the chunked two launches (150 pairs > 4 chunks of 16, 32),
    with whole blocks, half-height tails, or any padding (blocks not a power of two high)."""
    n_experts, n_tokens, top_k = 9, 50, 3
    ids = torch.from_numpy(rng.integers(0, n_experts - 2, size=(n_tokens, top_k)))  # 2 empty
    ids[:5] = 0  # one hot expert
    meta = align(ids, n_experts, block_m, scan=scan, half_tail=half_tail, pad_m=pad_m)
    flat = ids.reshape(-1).numpy()
    n_pairs = flat.size
    counts = np.bincount(flat, minlength=n_experts)
    given_pad_m = pad_m is not None
    if pad_m is None:
        pad_m = block_m // 2 if half_tail else block_m
    padded = -(-counts // pad_m) * pad_m
    n_padded = int(meta.n_padded[0])
    assert n_padded == padded.sum()
    n_blocks = int(meta.n_blocks[0])
    assert n_blocks == (-(-counts // block_m)).sum()
    block_start = meta.block_start[:n_blocks + 1].numpy()
    block_expert = meta.block_expert[:n_blocks].numpy()
    assert block_start[-1] == n_padded
    sorted_ids = meta.sorted_pair_ids[:n_padded].numpy()
    start = 0
    for e in range(n_experts):
        rows = sorted_ids[start:start + padded[e]]
        # the expert's pairs in pair order (stable), then the sentinel in the padding
        assert (rows[:counts[e]] == np.flatnonzero(flat == e)).all()
        assert (rows[counts[e]:] == n_pairs).all()
        # its blocks: consecutive from its first row on; block_m rows each and the last one
        # shorter (a multiple of pad_m) with half tails; with pad_m, multiples of pad_m at most
        # block_m high and at most pad_m apart (the rows split evenly)
        mine = np.flatnonzero(block_expert == e)
        heights = np.diff(block_start)[mine]
        assert block_start[mine[0]] == start if mine.size else counts[e] == 0
        assert heights.sum() == padded[e]
        assert all(0 < h <= block_m and h % pad_m == 0 for h in heights)
        if given_pad_m and mine.size:
            assert heights.max() - heights.min() <= pad_m
        else:
            assert set(heights[:-1]) <= {block_m}
        start += padded[e]
    # inverse map: each pair's sorted row holds that pair
    assert (sorted_ids[meta.pair_slot.numpy()] == np.arange(n_pairs)).all()


@pytest.mark.parametrize("top_k,hidden", [(2, 300), (6, 2100), (3, 2048)])
def test_combine_sums_each_tokens_rows(rng, top_k, hidden):
    """The k-way combine kernel against a float64 sum; H not a multiple of its block, H over one
    block (2100: two programs per token), the output poisoned so unwritten entries show."""
    from moegps.kernels.launch import combine_sum

    n_tokens = int(rng.integers(1, 6))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    y = torch.randn(n_tokens * top_k, hidden, generator=gen).to(torch.float16)
    out = torch.full((n_tokens, hidden), float("nan"), dtype=torch.float16)
    combine_sum(y, top_k, out)
    ref = y.double().view(n_tokens, top_k, hidden).sum(dim=1)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-3  # one fp16 rounding of an fp32 sum


def test_combine_gathers_rows_of_expert_order(rng):
    """combine_sum with slots (the wgmma path: y in expert order, with padding rows): out[t] =
    sum_j y[slots[t*k + j]], against a loop in float64."""
    from moegps.kernels.launch import combine_sum

    n_tokens, top_k, hidden = int(rng.integers(1, 6)), 3, 300
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    padded = n_tokens * top_k + 7
    y = torch.randn(padded, hidden, generator=gen).to(torch.float16)
    slots = torch.randperm(padded, generator=gen)[:n_tokens * top_k].to(torch.int32)
    out = combine_sum(y, top_k, slots=slots)
    ref = torch.stack([sum(y[int(slots[t * top_k + j])].double() for j in range(top_k))
                       for t in range(n_tokens)])
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("hidden,block_h,half_tail", [(16, 1024, False), (40, 16, True)])
def test_gather_copies_each_sorted_rows_token_row(rng, hidden, block_h, half_tail):
    """launch.gather_rows (the wgmma path's rows in expert order) on align's own output: every
    used row that holds a pair is that pair's token row, bit for bit; H in one column tile and in
    several with a partial last one. Padding rows and the rows past the used ones (whose ids align
    left unwritten) are skipped: the output is poisoned, and they must still hold the poison."""
    from moegps.kernels.launch import gather_rows

    n_tokens, top_k, n_experts = int(rng.integers(1, 40)), 2, 5
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(n_tokens, hidden, generator=gen).to(torch.float16)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])
    meta = align(ids.reshape(-1), n_experts, 32, half_tail=half_tail)
    used = int(meta.n_padded)
    assert used < meta.sorted_pair_ids.numel()
    meta.sorted_pair_ids[used:] = 0  # unwritten ids may look like a valid pair's
    rows = torch.full((meta.sorted_pair_ids.numel(), hidden), float("nan"), dtype=x.dtype)
    gather_rows(x, meta, top_k, out=rows, block_r=4, block_h=block_h)
    sorted_ids = meta.sorted_pair_ids.tolist()
    copied = {r: p for r, p in enumerate(sorted_ids[:used]) if p < n_tokens * top_k}
    assert sorted(copied.values()) == list(range(n_tokens * top_k))
    for r in range(len(sorted_ids)):
        if r in copied:
            assert torch.equal(rows[r], x[copied[r] // top_k]), (r, copied[r])
        else:
            assert rows[r].isnan().all(), r


def test_half_tail_needs_a_block_of_32():
    with pytest.raises(ValueError, match="half_tail needs block_m"):
        align(torch.zeros(4, 2, dtype=torch.int64), 3, 16, half_tail=True)


def test_bad_padding_and_swap_blocks_are_named():
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="power of two"):
        align(ids, 3, 160)  # a block of 160 rows needs a pad_m
    with pytest.raises(ValueError, match="pad_m must divide"):
        align(ids, 3, 128, pad_m=48)
    with pytest.raises(ValueError, match="power of two"):
        align(ids, 3, 96, pad_m=48)
    x = torch.randn(4, 16)
    w13, w2 = torch.randn(3, 20, 16), torch.randn(3, 16, 10)
    with pytest.raises(ValueError, match="block_m must be 128, 160, 192 or 256"):
        fused_moe(x, w13, w2, ids, torch.rand(4, 2), config={**CONFIGS["swap"], "block_m": 64})
    paired = {**CONFIGS["swap"], "gate_up": dict(CONFIGS["swap"]["gate_up"], paired=True)}
    with pytest.raises(ValueError, match="'paired'"):
        fused_moe(x, w13, w2, ids, torch.rand(4, 2), config=paired)


def test_bad_shapes_are_named():
    x = torch.randn(4, 16, dtype=torch.float16)
    w13 = torch.randn(3, 20, 16, dtype=torch.float16)
    w2 = torch.randn(3, 16, 10, dtype=torch.float16)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(x, w13, w2[:, :, :9], ids, torch.rand(4, 2))
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, w13, w2, ids, torch.rand(4, 3))
    with pytest.raises(ValueError, match="w_gate_up"):
        fused_moe(x, w13[:, :, :8], w2, ids, torch.rand(4, 2))
    with pytest.raises(ValueError, match="'combine'"):
        fused_moe(x, w13, w2, ids, torch.rand(4, 2),
                  config={**CONFIGS["sorted"], "combine": "atomics"})


def test_shipped_configs_are_valid_and_run(rng, monkeypatch):
    """Every tuned config file names valid fields (an entry's "else" too, what a machine runs that
    cannot build the entry); a few of its configs run correctly here (those of the Hopper-only
    "wgmma" path only pass its checks: benchmarks/kernels/wgmma_probe.py runs them on the GPU)."""
    from moegps.kernels import wgmma_swap
    from moegps.kernels.launch import CONFIG_DIR, _tuned_table, wgmma_kernels

    monkeypatch.setattr(wgmma_swap, "HAVE_ONE", True)  # the one-MMA entries' fields are checked alike

    def with_else(cfg):
        while cfg is not None:
            yield cfg
            cfg = cfg.get("else")

    files = sorted(CONFIG_DIR.glob("*.json"))
    assert files, "no tuned config file shipped"
    # float32: the interpreter's fp16 dot is slow on the large tuned tiles
    x, w13, w2, ids, weights = make_problem(rng, 20, 4, 256, 256, 2, torch.float32)
    ref = moe_reference(x.double(), w13.double(), w2.double(), ids, weights.double())
    for path in files:
        shapes = _tuned_table(path.stem)
        assert shapes
        for by_tokens in shapes.values():
            for cfg in (c for entry in by_tokens.values() for c in with_else(entry)):
                assert cfg["block_m"] in (16, 32, 64, 128, 160, 192, 256)
                if cfg["path"] == "fused":
                    assert set(cfg["fused"]) >= {"block_f", "block_k", "block_n", "num_warps",
                                                 "num_stages"}
                    continue
                if cfg["path"] == "wgmma":
                    wgmma_kernels(cfg).check_config(cfg, torch.empty(1, 64, dtype=torch.bfloat16))
                    # the swap kernels' tiles are always 256 weight rows: no block_n
                    needed = {"block_k", "num_stages"} if cfg.get("swap") else {"block_n", "block_k", "num_stages"}
                    for gemm in ("gate_up", "down"):
                        assert set(cfg[gemm]) >= needed
                    continue
                assert cfg["path"] in ("scan", "sorted", "swap")
                for gemm in ("gate_up", "down"):
                    assert set(cfg[gemm]) >= {"block_n", "block_k", "group_m", "num_warps",
                                              "num_stages"}
        some = [c for c in next(iter(shapes.values())).values() if c["path"] != "wgmma"]
        fused = [c for by_tokens in shapes.values() for c in by_tokens.values()
                 if c["path"] == "fused"]
        for cfg in (some[0], some[-1], *fused[:1]):  # decode, large-batch, fused configs
            assert rel_err(fused_moe(x, w13, w2, ids, weights, config=cfg), ref) < 1e-5


@pytest.fixture
def deterministic_mode():
    """torch's deterministic mode for one test (the tests switch it inside), restored after."""
    from moegps.kernels import deterministic_algorithms

    with deterministic_algorithms():
        yield


def test_deterministic_mode_takes_no_config_that_adds_with_atomics(rng, deterministic_mode):
    """Under torch's deterministic mode get_config never returns a config whose kernels add with atomics, at
    every tuned size of every shipped table and between them, and keeps everything else of a tuned entry: an
    atomic combine becomes the k-way sum with the same tiles; a fused entry, the default without the fused
    path. Outside the mode the tables do choose atomics (so the first check can fail), and the configs chosen
    in the mode run right."""
    from moegps.kernels.launch import CONFIG_DIR, _tuned_table, adds_with_atomics

    chose_atomics = 0
    for path in sorted(CONFIG_DIR.glob("*.json")):
        for key, by_tokens in _tuned_table(path.stem).items():
            shape = [int(part.split("=")[1]) for part in key.split(",")]  # E, H, F, k
            top_k = shape[3]
            for n_tokens in sorted({int(t) for t in by_tokens} | {int(t) + 1 for t in by_tokens}):
                torch.use_deterministic_algorithms(False)
                free = get_config(n_tokens, *shape, table=path.stem)
                torch.use_deterministic_algorithms(True)
                fixed = get_config(n_tokens, *shape, table=path.stem)
                assert not adds_with_atomics(fixed, top_k), (path.name, key, n_tokens, fixed)
                if not adds_with_atomics(free, top_k):
                    assert fixed == free
                elif free["path"] == "fused":
                    assert fixed == default_config(n_tokens, *shape, atomics=False)
                else:
                    assert fixed == {**free, "combine": "sum"}
                chose_atomics += adds_with_atomics(free, top_k)
    assert chose_atomics > 5
    # 64 experts of 48 x 32 at two tokens: the default is the fused path outside the mode
    x, w13, w2, ids, weights = make_problem(rng, 2, 64, 48, 32, 6, torch.float32)
    torch.use_deterministic_algorithms(False)
    assert default_config(2, 64, 48, 32, 6)["path"] == "fused"
    torch.use_deterministic_algorithms(True)
    assert get_config(2, 64, 48, 32, 6)["path"] != "fused"
    out = fused_moe(x, w13, w2, ids, weights)
    assert rel_err(out, brute_force(x, w13, w2, ids, weights)) < 1e-5


@pytest.mark.parametrize("path", ["fused", "scan_atomic"])
def test_deterministic_mode_refuses_a_config_that_adds_with_atomics(rng, path, deterministic_mode):
    """An explicit config with atomics raises under torch's deterministic mode, naming the config field, and
    warns under warn_only (then runs, right); the same tiles with the k-way sum run."""
    x, w13, w2, ids, weights = make_problem(rng, 5, 4, 32, 40, 2, torch.float32)
    with pytest.raises(RuntimeError, match="'fused'" if path == "fused" else "'combine': 'atomic'"):
        fused_moe(x, w13, w2, ids, weights, config=CONFIGS[path])
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="not deterministic"):
        out = fused_moe(x, w13, w2, ids, weights, config=CONFIGS[path])
    assert rel_err(out, brute_force(x, w13, w2, ids, weights)) < 1e-5
    torch.use_deterministic_algorithms(True)
    if path == "scan_atomic":
        summed = fused_moe(x, w13, w2, ids, weights, config={**CONFIGS[path], "combine": "sum"})
        assert rel_err(summed, brute_force(x, w13, w2, ids, weights)) < 1e-5
