"""The Hopper-only wgmma path (moegps/kernels/wgmma_moe.py) on the CPU: its kernels compiled for
sm_90, its tile order, config checks and config lookup. The kernels run only on an
sm_90 GPU, where benchmarks/kernels/wgmma_probe.py checks them against the fp32 reference."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_unspilled
from moegps.kernels import launch, wgmma_moe, wgmma_swap


@settings(max_examples=60, deadline=None)
@given(n_blocks=st.integers(1, 40), n_tiles_n=st.integers(1, 12), group=st.integers(1, 20))
def test_tile_order_visits_every_tile_once(n_blocks, n_tiles_n, group):
    seen = [wgmma_moe.tile_order(t, n_blocks, n_tiles_n, group)
            for t in range(n_blocks * n_tiles_n)]
    assert sorted(seen) == [(b, n) for b in range(n_blocks) for n in range(n_tiles_n)]


def test_tile_order_keeps_a_group_of_blocks_on_one_weight_slab():
    # 10 blocks in groups of 4 (the last group has 2), 3 N tiles: within a group the blocks run
    # fastest, so consecutive tiles read the same N slab
    order = [wgmma_moe.tile_order(t, 10, 3, 4) for t in range(30)]
    assert order[:12] == [(b, n) for n in range(3) for b in range(4)]
    assert order[24:] == [(b, n) for n in range(3) for b in (8, 9)]


def _inputs():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w13 = torch.randn(4, 64, 64, dtype=torch.bfloat16)
    w2 = torch.randn(4, 64, 32, dtype=torch.bfloat16)
    ids = torch.randint(0, 4, (5, 2))
    return x, w13, w2, ids, torch.rand(5, 2)


def _config(**change) -> dict:
    return {"path": "wgmma", "block_m": 128,
            "gate_up": {"block_n": 128, "block_k": 64, "num_stages": 4},
            "down": {"block_n": 256, "block_k": 64, "num_stages": 4}, **change}


def test_wgmma_path_off_hopper_is_a_clear_error():
    if wgmma_moe.supported():
        pytest.skip("a Hopper GPU is present")
    with pytest.raises(ValueError, match="Hopper"):
        launch.fused_moe(*_inputs(), config=_config())


@pytest.mark.parametrize("change, field", [
    ({"block_m": 64}, "block_m"),
    ({"gate_up": {"block_n": 128, "block_k": 16, "num_stages": 4}}, "gate_up.block_k"),
    ({"gate_up": {"block_n": 128, "block_k": 64, "num_stages": 4, "gather": 3}}, "gate_up.gather"),
    ({"gate_up": {"block_n": 128, "block_k": 64, "num_stages": 4, "gather": 1}}, "gate_up.gather"),
    ({"down": {"block_n": 256, "block_k": 64, "num_stages": 4, "gather": 4}}, "down.gather"),
    # one launch: the GEMMs share their stages (the down tile twice the gate/up tile's columns, which
    # it stacks gate over up) and the tile order, and a down tile may wait (dynamic tiles only)
    ({"one_launch": True, "down": {"block_n": 128, "block_k": 64, "num_stages": 4}}, "down.block_n"),
    ({"one_launch": True, "down": {"block_n": 256, "block_k": 32, "num_stages": 4}}, "down.block_k"),
    ({"one_launch": True, "down": {"block_n": 256, "block_k": 64, "num_stages": 3}}, "down.num_stages"),
    ({"one_launch": True, "down": {"block_n": 256, "block_k": 64, "num_stages": 4, "group_m": 16}},
     "down.group_m"),
    ({"one_launch": True, "down": {"block_n": 256, "block_k": 64, "num_stages": 4, "dynamic": False}},
     "dynamic"),
])
def test_check_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        wgmma_moe.check_config(_config(**change), torch.randn(3, 64, dtype=torch.bfloat16))


def test_check_config_takes_one_launch_of_matching_tiles():
    wgmma_moe.check_config(_config(one_launch=True), torch.randn(3, 64, dtype=torch.bfloat16))


# Compiled in a fresh interpreter (conftest.py's compiling_python): the scripts' common head, then
# each kernel's signature and checks.
COMPILE_HEAD = r"""
import base64, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from moegps.kernels import wgmma_moe, wgmma_swap
if not wgmma_moe.HAVE_GLUON:
    print(json.dumps({"skip": "this Triton has no Gluon"})); sys.exit()
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

def desc(block):
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return f"tensordesc<bf16[{block[0]}, {block[1]}],{layout!r}>"
"""

COMPILE = COMPILE_HEAD + r"""
gate_up, block_n, dynamic, gather, timeline, fused = json.loads(sys.argv[1])
def gemm(suffix, block_n):  # one GEMM's descriptors and sizes (fused: the down GEMM's are the second)
    return {f"a{suffix}_desc": desc([128, 64]), f"b{suffix}_desc": desc([block_n, 64]),
            f"b{suffix}_half_desc": desc([block_n // 2, 64]), f"out{suffix}_desc": desc([64, 128]),
            f"out{suffix}_half_desc": desc([64, block_n // 2])}
signature = {**gemm("", block_n), "sorted_ptr": "*i32", "weights_ptr": "*fp32",
             "block_expert_ptr": "*i32", "block_start_ptr": "*i32", "n_blocks_ptr": "*i32",
             **{name: "i32" for name in ("n_tiles_n", "group", "k_dim", "n_pairs", "b_rows", "up_offset")},
             "tile_counter_ptr": "*i32", "x_ptr": "*bf16", "top_k": "i32", "timeline_ptr": "*i64",
             **gemm("2", 2 * block_n), **{name: "i32" for name in ("n_tiles_n2", "k_dim2", "b_rows2")},
             "GATE_UP": "constexpr", "STAGES": "constexpr", "DYNAMIC": "constexpr", "GATHER": "constexpr",
             "TIMELINE": "constexpr", "FUSED": "constexpr"}
# x_ptr 16-byte aligned, as Triton's launcher specialises an aligned pointer (the gather's cp.async)
source = GluonASTSource(wgmma_moe.grouped_gemm_kernel, signature=signature,
                        constexprs={"GATE_UP": gate_up, "STAGES": 4, "DYNAMIC": dynamic, "GATHER": gather,
                                    "TIMELINE": timeline, "FUSED": fused},
                        attrs={(list(signature).index("x_ptr"),): [["tt.divisibility", 16]]})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": wgmma_moe.MAX_REGISTERS})
ptx = compiled.asm["ptx"]
print(json.dumps({"wgmma": "wgmma.mma_async" in ptx, "setmaxnreg": "setmaxnreg" in ptx,
                  "tanh": "tanh.approx.f32" in ptx, "ex2": "ex2.approx" in ptx,
                  "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
                  "cp_async_arrive": len(re.findall(r"cp\.async\.mbarrier\.arrive\.noinc", ptx)),
                  "atomics": len(re.findall(r"atom\.global\.gpu\.acq_rel\.add", ptx)),
                  "counts": len(re.findall(r"(?:red|atom)\.global\.gpu\.release\.add", ptx)),
                  "count_waits": len(re.findall(r"ld\.global\.acquire\.gpu", ptx)),
                  "clocks": len(re.findall(r"%clock64", ptx)),
                  "barrier_counts": sorted({int(c) for c in re.findall(r"mbarrier\.init\.shared[:\w.]*\s+\[[^]]+\],\s*(\d+)", ptx)}),
                  "shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps,
                  "cubin": base64.b64encode(compiled.asm["cubin"]).decode()}))
"""


@pytest.mark.parametrize("gate_up, block_n, dynamic, gather, timeline, fused", [
    (True, 128, True, 0, False, False), (False, 256, True, 0, False, False), (True, 128, False, 0, False, False),
    (True, 128, True, 4, False, False), (True, 128, True, 2, False, False), (True, 128, True, 4, True, False),
    (False, 256, True, 0, True, False), (True, 128, True, 4, False, True), (True, 128, True, 0, False, True),
    (True, 128, True, 4, True, True)])
def test_kernels_compile_for_hopper_without_spills(gate_up, block_n, dynamic, gather, timeline, fused,
                                                   compiling_python):
    """The device code compiled for sm_90 here, with no GPU (Triton ships ptxas): it must build
    with this Triton's Gluon, keep its accumulators in registers (no local memory) and fit the
    227 KB of shared memory an H100/H200 block may use. With dynamic tiles, the producer's two
    claims of the tile counter are its only atomics (one thread each, the compiler's lowering).
    With the producer gathering the token rows (cp.async, `gather` warps), a stage's barrier waits
    for its TMA copies' arrival and one arrival from each of the producer's threads. With the
    timeline (benchmarks/kernels/timeline.py), the clock is read only then, and still no spills."""
    import json

    result = compiling_python(COMPILE, json.dumps([gate_up, block_n, dynamic, gather, timeline, fused]))
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["wgmma"] and result["setmaxnreg"]  # tensor cores, register handoff
    # gate/up's SiLU: one tanh.approx an element, no exp (wgmma_moe._silu)
    assert (result["tanh"], result["ex2"]) == (gate_up, False)
    # (fused: the claim in the loop over K is compiled once for each GEMM)
    assert result["atomics"] == ((3 if fused else 2) if dynamic else 0)
    # fused: h stores counted on their block (release), waited for by the down tiles (acquire)
    assert (result["counts"] > 0, result["count_waits"] > 0) == (fused, fused)
    assert (result["clocks"] > 0) == timeline
    assert (result["cp_async"] > 0, result["cp_async_arrive"] > 0) == (bool(gather), bool(gather))
    # barriers wait for the producer (1), for both consumer warpgroups (2), or (gather) for the
    # producer's TMA copies and each of its threads' row copies (1 + 32 x warps)
    assert result["barrier_counts"] == sorted({1, 2, 1 + 32 * gather}), result["barrier_counts"]
    assert result["shared"] <= 227 * 1024
    # launchable: the block's warps (Gluon pads the partitions to whole warpgroups) and no spills
    assert_unspilled(result["cubin"], result["warps"])


def test_get_config_skips_wgmma_entries_where_they_cannot_run(monkeypatch):
    """A device table with a wgmma entry nearest: without a Hopper GPU and Gluon, the nearest entry
    this machine can run is taken instead."""
    table = {launch.shape_key(8, 64, 32, 2): {
        "512": {"path": "sorted", "block_m": 64, "gate_up": {}, "down": {}},
        "2048": {"path": "wgmma", "block_m": 128, "gate_up": {}, "down": {}}}}
    monkeypatch.setattr(launch, "_tuned_table", lambda name: table)
    monkeypatch.setattr(wgmma_moe, "supported", lambda device=None: False)
    assert launch.get_config(2000, 8, 64, 32, 2)["path"] == "sorted"
    monkeypatch.setattr(wgmma_moe, "supported", lambda device=None: True)
    assert launch.get_config(2000, 8, 64, 32, 2)["path"] == "wgmma"


# --- the weights-as-rows kernels (wgmma_swap.py, a wgmma config's "swap")

def _swap_config(**change) -> dict:
    tile = {"block_k": 32, "num_stages": 6, "group_m": 8}
    return {"path": "wgmma", "swap": True, "block_m": 192, "gate_up": dict(tile), "down": dict(tile),
            **change}


@pytest.mark.parametrize("change, field", [
    ({"block_m": 256}, "block_m"),
    ({"block_m": 160}, "block_m"),  # not a multiple of the default pad_m, 64
    ({"pad_m": 16}, "pad_m"),
    ({"half_tail": True}, "block_m"),
    ({"gate_up": {"block_k": 16, "num_stages": 6}}, "gate_up.block_k"),
    ({"down": {"block_k": 64, "num_stages": 4}}, "down.num_stages"),  # 4 x 56 KB + 32 KB > 227 KB
    ({"gate_up": {"block_k": 32, "num_stages": 6, "gather": 4}}, "gate_up.gather"),
    ({"down": {"block_n": 256, "block_k": 32, "num_stages": 6}}, "down.block_n"),
])
def test_swap_check_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        wgmma_swap.check_config(_swap_config(**change), torch.randn(3, 64, dtype=torch.bfloat16))
    wgmma_swap.check_config(_swap_config(), torch.randn(3, 64, dtype=torch.bfloat16))  # the default passes


def test_swap_one_mma_config_is_a_clear_error_where_this_triton_cannot_build_it(monkeypatch):
    monkeypatch.setattr(wgmma_swap, "HAVE_ONE", False)
    with pytest.raises(ValueError, match="'one'"):
        wgmma_swap.check_config(_swap_config(one=True), torch.randn(3, 64, dtype=torch.bfloat16))


def test_swap_route_pads_to_64_in_blocks_of_at_most_192(monkeypatch):
    """The kernels take a block's rows as one MMA part of up to 128 and one of up to 64 (their
    compiled variants), so a swap config routes with align's blocks of at most block_m rows padded
    to pad_m, 64 unless given (tests/test_kernels.py's test_align_metadata checks align there)."""
    seen = []
    monkeypatch.setattr(launch, "align", lambda ids, n_experts, block_m, **kw: seen.append((block_m, kw)))
    launch.route(torch.zeros(6, dtype=torch.int64), 8, _swap_config())
    launch.route(torch.zeros(6, dtype=torch.int64), 8, _config(half_tail=True))
    launch.route(torch.zeros(6, dtype=torch.int64), 8, _swap_config(block_m=160, pad_m=32))
    assert seen == [(192, {"pad_m": 64}), (128, {"half_tail": True}), (160, {"pad_m": 32})]


@pytest.mark.parametrize("pad", wgmma_swap.PADS)
def test_swap_token_parts_cover_every_block_exactly(pad):
    """Every block height align can give (a multiple of pad up to 192 rows) runs as MMA parts the
    kernels compile (N0 of 32/64/128 into the 128-row buffer, N1 of 0/32/64 into the 64-row one)
    that add up to its rows: no row left out, no part wider than the rows it holds."""
    for n_rows in range(pad, max(wgmma_swap.BLOCK_MS) + 1, pad):
        n0, n1 = wgmma_swap.token_parts(n_rows, pad)
        assert n0 in (32, 64, 128) and n1 in (0, 32, 64)
        assert n0 + n1 == n_rows, (n_rows, pad, n0, n1)


SWAP_COMPILE = COMPILE_HEAD + r"""
gate_up, stages, block_k, pad, one, block_m = json.loads(sys.argv[1])
if one and not hasattr(gl, "inline_asm"):
    print(json.dumps({"skip": "this Triton's Gluon has no inline_asm on shared buffers"})); sys.exit()
signature = wgmma_swap.compile_signature(block_k)
source = GluonASTSource(wgmma_swap.grouped_gemm_kernel, signature=signature,
                        constexprs={"GATE_UP": gate_up, "STAGES": stages, "DYNAMIC": True, "PAD": pad, "ONE": one,
                                    "BLOCK_M": block_m})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": wgmma_moe.MAX_REGISTERS})
ptx = compiled.asm["ptx"]
print(json.dumps({"mma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k16)", ptx))),
                  "tanh": "tanh.approx.f32" in ptx, "shared": compiled.metadata.shared,
                  "warps": compiled.metadata.num_warps, "cubin": base64.b64encode(compiled.asm["cubin"]).decode()}))
"""

# Stack bytes the swap kernels were measured to spill under Triton 3.9's ptxas (sm_90): a few of
# the prologue's scalars (stored before the partitions start, reloaded once a tile), none in the
# K loops; timed as such on the H200 (NOTES.md session 16). Anything more fails the test.
# (gate_up, stages, block_k, pad, one, block_m): bytes. The packed down GEMM of blocks up to 192 rows:
# timed on the H200 in session 19's call 9 (NOTES.md v40).
SWAP_SPILLS = {(False, 6, 32, 64, False, 192): 32, (True, 3, 64, 64, False, 192): 32,
               (False, 6, 32, 32, False, 192): 32, (True, 6, 32, 64, True, 192): 16,
               (False, 6, 32, 64, True, 192): 32, (False, 6, 32, 32, True, 192): 32,
               (False, 4, 64, 32, True, 192): 24}


@pytest.mark.parametrize("gate_up, stages, block_k, pad, one, block_m", [
    (True, 6, 32, 64, False, 192), (False, 6, 32, 64, False, 192), (True, 3, 64, 64, False, 192),
    (True, 6, 32, 32, False, 192), (False, 6, 32, 32, False, 192), (True, 6, 32, 32, True, 192),
    (False, 6, 32, 32, True, 192), (True, 6, 32, 64, True, 192), (False, 6, 32, 64, True, 192),
    (True, 4, 64, 32, False, 160), (False, 4, 64, 32, False, 160), (True, 4, 64, 32, True, 160),
    (False, 4, 64, 32, True, 160), (True, 4, 64, 32, True, 192), (False, 4, 64, 32, True, 192)])
def test_swap_kernels_compile_for_hopper(gate_up, stages, block_k, pad, one, block_m, compiling_python):
    """Compiled for sm_90 on the CPU: MMAs of 128 and 64 token columns (a block's parts; and 32
    where rows are padded to 32; with `one`, blocks of 160 and 192 rows as one MMA of that width),
    the SiLU's tanh.approx in gate/up only, the shared memory wgmma_swap.shared_layout counts (its
    barriers aside) within 227 KB, launchable, unspilled (but for the measured prologue scalars
    above). Four stages of 64 columns: with two MMAs, for blocks of at most 160 rows (a 32-row tail
    buffer), they leave room for epilogue buffers of 64 rows only, through which a part of 128 is
    stored in halves; with one, packed (no epilogue buffers, weight slice 3 in the token buffer)."""
    import json

    result = compiling_python(SWAP_COMPILE, json.dumps([gate_up, stages, block_k, pad, one, block_m]))
    if "skip" in result:
        pytest.skip(result["skip"])
    widths = {"m64n128k16", "m64n64k16"} | ({"m64n32k16"} if pad == 32 else set())
    if one:
        widths |= ({"m64n192k16"} if block_m > 160 else set()) | ({"m64n160k16"} if pad == 32 else set())
    assert set(result["mma"]) == widths
    assert result["tanh"] == gate_up
    counted = wgmma_swap.shared_layout(stages, block_k, block_m, pad, one)[2]
    assert counted <= result["shared"] < counted + 1024  # (the barriers: a few hundred bytes)
    assert result["shared"] <= wgmma_swap.SHARED_BYTES
    assert_unspilled(result["cubin"], result["warps"],
                     stack_bytes=SWAP_SPILLS.get((gate_up, stages, block_k, pad, one, block_m), 0))


def test_swap_probe_variants_name_their_blocks_and_the_one_mma_flag(monkeypatch):
    """benchmarks/kernels/swap_probe.py's variant spelling (imported with its folder on the path)."""
    probe = _kernels_script(monkeypatch, "swap_probe")
    one = probe.variant("6x32:160/32o", 8)
    assert (one["block_m"], one["pad_m"], one.get("one")) == (160, 32, True)
    assert one["gate_up"] == one["down"] == {"block_k": 32, "num_stages": 6, "group_m": 8}
    plain = probe.variant("3x64", 16)
    assert (plain["block_m"], plain["pad_m"], plain.get("one")) == (192, 64, None)
    assert plain["gate_up"]["group_m"] == 16


SIGNATURE = r"""
import inspect, json
from moegps.kernels import wgmma_moe, wgmma_swap
if not wgmma_moe.HAVE_GLUON:
    print(json.dumps({"skip": "this Triton has no Gluon"})); raise SystemExit
print(json.dumps({"params": list(inspect.signature(wgmma_swap.grouped_gemm_kernel.fn).parameters),
                  "signature": list(wgmma_swap.compile_signature(32))}))
"""


def test_swap_compile_signature_is_the_kernels(compiling_python):
    """The signature the swap kernels are compiled ahead with (the tests above; the cubins
    benchmarks/kernels/carried.py builds and launches) names the kernel's parameters, in order
    (checked where Gluon imports, outside the CPU interpreter)."""
    result = compiling_python(SIGNATURE)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["signature"] == result["params"]


def _kernels_script(monkeypatch, name: str):
    """A script of benchmarks/kernels, imported with its folder on the path."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))
    return importlib.import_module(name)


def test_timeline_reader_on_a_hand_built_launch(monkeypatch):
    """benchmarks/kernels/timeline.py's reading of the kernels' TIMELINE records, on a launch built
    by hand with known phases: two programs, each consumer two tiles, clocks at 2 cycles a ns."""
    timeline = _kernels_script(monkeypatch, "timeline")
    rng = np.random.default_rng(7)
    buf = torch.full((2, 3, 8, 6), -1, dtype=torch.int64)
    ghz = 2.0
    expected = {"first_stage": [], "k_loop": [], "k_waits": [], "epilogue": [], "between": []}
    consumer_1 = {key: [] for key in expected}  # the same of consumer 1's tiles (odd numbers) alone
    for prog in range(2):
        base = int(rng.integers(10**6, 10**9))  # each SM's clock starts anywhere
        ns0 = 5000 + 300 * prog  # the second program starts 300 ns late
        buf[prog, 2, 0] = torch.tensor([0, base, base + 40, base + 900, 80, ns0])
        buf[prog, 2, 1] = torch.tensor([1, base + 4000, base + 4040, base + 4900, 0, ns0 + 2000])
        for c in range(2):
            t = base + 100 + 10 * c
            for i in range(2):
                first, loop, waited, epi = (int(v) for v in rng.integers([50, 800, 0, 100], [300, 1500, 300, 400]))
                buf[prog, c, i] = torch.tensor([2 * i + c, t, t + first, t + first + loop, t + first + loop + epi, waited])
                for key, v in (("first_stage", first), ("k_loop", loop), ("k_waits", waited), ("epilogue", epi)):
                    expected[key].append(v / ghz / 1e3)
                    if c == 1:
                        consumer_1[key].append(v / ghz / 1e3)
                t += first + loop + epi
                if i == 0:
                    gap = int(rng.integers(20, 200))
                    expected["between"].append(gap / ghz / 1e3)
                    if c == 1:
                        consumer_1["between"].append(gap / ghz / 1e3)
                    t += gap
    progs = timeline.records(buf)
    assert timeline.clock_ghz(progs) == pytest.approx(ghz)
    s = timeline.summarize(progs, ghz, mma_floor_us=1.0)
    for key, values in expected.items():
        assert s["tile_median_us"][key] == pytest.approx(float(np.median(values)))
    # every consumer's span is its ramp, its tiles' phases, the gaps between them and its tail
    assert sum(v for k, v in s["share"].items() if k != "k_waits") == pytest.approx(1.0)
    assert s["share"]["k_waits"] * 4 * s["span_us"] == pytest.approx(sum(expected["k_waits"]))
    assert s["producer"]["metadata_us"] == pytest.approx(40 / ghz / 1e3)
    # a one launch's GEMMs apart (by tile number): the medians of the tiles taken, the shares of all
    odd = timeline.summarize(progs, ghz, mma_floor_us=1.0, tiles=lambda tile: tile % 2 == 1)
    for key, values in consumer_1.items():
        assert odd["tile_median_us"][key] == pytest.approx(float(np.median(values)))
    assert odd["share"] == pytest.approx(s["share"])
    buf[0, 0, :, 0] = 3  # a partition that filled every slot: its last tiles were lost
    with pytest.raises(ValueError, match="TIMELINE_TILES"):
        timeline.records(buf)


def test_stream_probe_kernel_streams_every_box_once(monkeypatch):
    """benchmarks/kernels/stream_probe.py's kernel under the interpreter, three programs striding
    over the tiles: its outputs add up to the weights' sum (each box read once) plus, with token
    rows, each tile's expert's token rows once a tile; float64 references."""
    import importlib

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    probe = importlib.reload(_kernels_script(monkeypatch, "stream_probe"))  # decorated for the interpreter
    gen = torch.Generator().manual_seed(11)
    n_experts, rows, k_dim, n_tok = 2, 64, 256, 16
    w = torch.randn(n_experts * rows, k_dim, generator=gen).to(torch.bfloat16)
    tokens = torch.randn(n_experts * n_tok, k_dim, generator=gen).to(torch.bfloat16)
    per_expert = tokens.double().view(n_experts, n_tok, k_dim).sum(dim=(1, 2))
    for box in ((32, 64, 2), (64, 128, 3)):
        tiles_per_expert = rows // box[0]
        for toks, extra in ((None, 0.0), (tokens, tiles_per_expert * per_expert.sum().item())):
            out = torch.full((3,), float("nan"))
            probe.stream(w, toks, rows, box, 3, out)()
            programs = min(3, n_experts * tiles_per_expert)
            expected = w.double().sum().item() + extra
            scale = w.double().abs().sum().item() + tiles_per_expert * tokens.double().abs().sum().item()
            assert abs(out[:programs].double().sum().item() - expected) <= 1e-6 * scale, (box, toks is None)


def test_probe_deadline_names_the_step_that_overran(monkeypatch, capsys):
    """benchmarks/kernels/deadline.py: a step that overruns its deadline is named on stderr and
    the expiry action runs (the probes end the process there); a step done in time leaves no
    trace once the deadline would have passed."""
    import time

    deadline = _kernels_script(monkeypatch, "deadline").deadline
    fired = []
    with deadline(0.05, "check mixtral T=7", on_expiry=lambda: fired.append(True)):
        time.sleep(0.3)
    assert fired == [True]
    assert "HUNG: check mixtral T=7" in capsys.readouterr().err
    with deadline(0.1, "timing", on_expiry=lambda: fired.append(False)):
        pass
    time.sleep(0.25)
    assert fired == [True] and capsys.readouterr().err == ""


def test_clock_probe_summary_against_hand_computed_ratios(monkeypatch):
    """benchmarks/kernels/clock_probe.py's summary on records built by hand: the medians over the
    rounds, time and cycles against bmm, and the share of the matmul's rate in time and at equal
    clocks. Drawn: ours takes 1.2x bmm's time at 0.9x its clock, so 1.08x its cycles."""
    probe = _kernels_script(monkeypatch, "clock_probe")
    rng = np.random.default_rng(11)
    bmm_us, mhz = rng.uniform(300, 3000), rng.uniform(1200, 1900)
    flops = 2 * 8192 * 6 * 3 * 2048 * 1408
    records = []
    for r, jitter in enumerate((0.98, 1.0, 1.03)):  # the medians must take the middle round
        for method, us, clock, fl in (("ours", 1.2 * bmm_us, 0.9 * mhz, flops), ("bmm", bmm_us, mhz, flops),
                                      ("matmul", 0.5 * bmm_us, mhz, 2 * 8192**3)):
            records.append({"shape": "s", "tokens": 8192, "method": method, "round": r, "us": us * jitter,
                            "kcycles": us * jitter * clock / 1e3, "TFLOPs": fl / (us * jitter) * 1e-6,
                            "sm_MHz": clock, "sm_MHz_min": clock - 10, "power_W": 500.0})
    lines = {line["method"]: line for line in probe.summarise(records)}
    ours = lines["ours"]
    assert ours["us"] == pytest.approx(1.2 * bmm_us)
    assert ours["time_vs_bmm"] == pytest.approx(1.2)
    assert ours["cycles_vs_bmm"] == pytest.approx(1.08)
    rate = flops / (1.2 * bmm_us) / (2 * 8192**3 / (0.5 * bmm_us))
    assert ours["pct_rate"] == pytest.approx(100 * rate)
    assert ours["pct_rate_cycles"] == pytest.approx(100 * rate * 0.9)
    assert lines["matmul"]["pct_rate"] == pytest.approx(100.0)
