"""The engine benchmark's bookkeeping (CPU): kernels of a profiled step assigned to their parts."""

import os
import random

import pytest
import torch

from moegps.engine import bench
from moegps.engine.bench import kernel_parts, kernel_table, trace_gaps


SKINNY = "_skinny_linear_kernel"  # the engine's own projection kernel at decode sizes


def _layer(rng, with_shared=False, skinny=False):
    """One decoder layer's kernels in launch order with random durations, and the expected part of each."""
    # decode-sized batches (skinny) run the QKV projection, rotary and cache write as one launch
    qkv = ([("_qkv_rope_cache_kernel", "attention")] if skinny else
           [("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", "attention"), ("_rope_cache_kernel", "attention")])
    names = [("_add_rmsnorm_kernel", "norms"), *qkv, ("_decode_attention_kernel", "attention"),
             (SKINNY if skinny else "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "attention"),
             ("_add_rmsnorm_router_kernel", "moe"), ("gate_up_scan_kernel", "moe"), ("down_scan_kernel", "moe"),
             ("combine_kernel", "moe")]
    if with_shared:  # a shared expert's GEMMs after the routed experts
        names += [("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8", "moe"),
                  ("void at::native::vectorized_elementwise_kernel<4, silu>", "other kernels"),
                  ("nvjet_sm90_tst_128x64_64x4_1x2_h_bz_TNT", "moe")]
    return [(name, part, rng.uniform(0.5, 200.0)) for name, part in names]


@pytest.mark.parametrize("with_shared, skinny", [(False, False), (True, False), (False, True), (True, True)])
def test_kernel_parts_sums_each_part_and_finds_the_lm_head(with_shared, skinny):
    rng = random.Random(7)
    launches = [k for _ in range(rng.randint(2, 5)) for k in _layer(rng, with_shared, skinny)]
    launches += [("_add_rmsnorm_kernel", "norms", rng.uniform(1, 5)),
                 (SKINNY if skinny else "nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT", "lm_head", rng.uniform(50, 70)),
                 ("void at::native::unrolled_elementwise_kernel<copy>", "other kernels", rng.uniform(1, 3))]
    trace = [(float(i), dur, name) for i, (name, _, dur) in enumerate(launches)]
    expected = {}
    for _, part, dur in launches:
        expected[part] = expected.get(part, 0.0) + dur / 1e3
    got = kernel_parts(trace)
    assert set(k for k, v in got.items() if v) == set(expected)
    for part, ms in expected.items():
        assert got[part] == pytest.approx(ms, rel=1e-12)


def test_kernel_table_orders_by_total_time():
    trace = [(0.0, 3.0, "a"), (1.0, 10.0, "b"), (2.0, 4.0, "a"), (3.0, 1.0, "c")]
    rows = kernel_table(trace, top=2)
    assert [(r["kernel"], r["launches"], r["total_us"]) for r in rows] == [("b", 1, 10.0), ("a", 2, 7.0)]
    assert rows[1]["mean_us"] == pytest.approx(3.5)


def test_trace_gaps_counts_idle_time_once():
    """Random kernels on an integer timeline, back to back, overlapping (two streams) or apart, against
    a brute-force count: the time units between the first start and the last end that no kernel covers,
    and the runs of such units as the gaps."""
    rng = random.Random()
    trace, t = [], 0
    for i in range(60):
        dur = rng.randint(1, 100)
        trace.append((float(t), float(dur), f"k{i}"))
        t += rng.choice([dur, dur // 2, dur + rng.randint(1, 30)])
    end = int(max(s + d for s, d, _ in trace))
    covered = [False] * end
    for s_, d, _ in trace:
        covered[int(s_):int(s_ + d)] = [True] * int(d)
    runs, run = [], 0
    for c in covered:
        if not c:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    idle_ms, top = trace_gaps(trace, top=3)
    assert idle_ms == pytest.approx(covered.count(False) / 1e3)
    assert [g["gap_us"] for g in top] == sorted(runs, reverse=True)[:3]


def test_decode_variant_sets_and_restores_the_switches(monkeypatch):
    from moegps.engine import kernels as K

    monkeypatch.delenv("MOEGPS_PDL", raising=False)
    rows, attention = K.SKINNY_MAX_ROWS, dict(K.ATTENTION_DEFAULTS)
    with bench.decode_variant("cuBLAS projections"):
        assert "MOEGPS_PDL" not in os.environ and K.SKINNY_MAX_ROWS == 0
    with bench.decode_variant("no PDL"):
        assert os.environ["MOEGPS_PDL"] == "0" and K.SKINNY_MAX_ROWS == rows
    with bench.decode_variant("attention splits >= 64 keys"):
        assert K.ATTENTION_DEFAULTS == {**attention, "min_split": 64}
    per_program, fused_programs = K.ROUTER_EXPERTS_PER_PROGRAM, K.FUSED_ROUTER_MAX_PROGRAMS
    with bench.decode_variant("router 4 experts a program"):
        assert K.ROUTER_EXPERTS_PER_PROGRAM == 4 != per_program and K.FUSED_ROUTER_MAX_PROGRAMS == fused_programs
    with bench.decode_variant("norm + router as two launches"):
        assert K.FUSED_ROUTER_MAX_PROGRAMS == 0 and K.ROUTER_EXPERTS_PER_PROGRAM == per_program
    with bench.decode_variant("deterministic"):
        assert torch.are_deterministic_algorithms_enabled() and K.SKINNY_MAX_ROWS == rows
    assert "MOEGPS_PDL" not in os.environ and K.SKINNY_MAX_ROWS == rows and K.ATTENTION_DEFAULTS == attention
    assert (K.ROUTER_EXPERTS_PER_PROGRAM, K.FUSED_ROUTER_MAX_PROGRAMS) == (per_program, fused_programs)
    assert not torch.are_deterministic_algorithms_enabled()


def test_plot_ttft_draws_the_graphed_rows_of_each_shape(tmp_path, rng):
    """The TTFT figure from rows as part_ttft writes them (eager and graph, two shapes, a run
    without the rested timing): one PNG, which matplotlib can read back."""
    import matplotlib.image

    rows = []
    for shape in ("mixtral-8x7b", "deepseek-v2-lite"):
        for prompt in (128, 2048):
            for prefill in ("eager", "graph"):
                pct = rng.uniform(40, 110, size=3)
                rows.append(dict(shape=shape, prompt=prompt, prefill=prefill, device="test GPU",
                                 ttft_ms=rng.uniform(5, 400), ttft_rested_ms=float("nan") if prompt == 128 else 90.0,
                                 pct_of_floor=pct[0], pct_of_floor_beside=pct[1],
                                 pct_of_floor_rested=float("nan") if prompt == 128 else pct[2]))
    path = tmp_path / "ttft.png"
    bench.plot_ttft(rows, path)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 800  # two panels side by side


def test_host_cpu_names_the_model_and_cores(tmp_path, monkeypatch):
    """The report's host line (generate()'s batch-1 peer is bound by the host's Python): the CPU
    model from /proc/cpuinfo where there is one, and the core count."""
    monkeypatch.setattr(os, "cpu_count", lambda: 48)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Made Up\nmodel name\t: Test CPU 9000 @ 3.1GHz\nflags\t: x\n")
    assert bench.host_cpu(cpuinfo) == "Test CPU 9000 @ 3.1GHz, 48 cores"
    monkeypatch.setattr(bench.platform, "processor", lambda: "")
    assert bench.host_cpu(tmp_path / "absent") == "unknown CPU, 48 cores"


def tiny_model(dtype, seed: int):
    """A two-layer Mixtral-family model of hidden size 32 with random weights on the CPU."""
    from moegps.engine.model import random_model
    from moegps.shapes import from_name

    shape = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=64, n_layers=2, hidden=32, n_heads=4,
                                              n_kv_heads=2, head_dim=8, expert_ffn=24, n_experts=8, top_k=2)
    return random_model(shape, device="cpu", dtype=dtype, seed=seed)


def test_part_chunk_runs_on_the_cpu(monkeypatch):
    """The chunk part's bookkeeping on a tiny float32 model (its timings are the GPU's to take): a row per
    batch and chunk size, each time positive, the extra of a chunk beside the decode step the difference of
    the two steps, floors from the rates given; a batch in the largest bucket skipped (no slot past it)."""
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(torch.float32, random.Random().randrange(2**20))
    shape = model.shape
    rows = bench.part_chunk(model, [1, 3, 128], [4, 6], context=8, copy_rate=1e10, matmul_rate=1e12, reps=2)
    assert [(r["batch"], r["chunk"]) for r in rows] == [(1, 4), (1, 6), (3, 4), (3, 6)]
    for r in rows:
        assert min(r["decode_ms"], r["with_chunk_ms"], r["chunk_alone_ms"], r["decode_floor_ms"]) > 0
        assert r["chunk_extra_ms"] == pytest.approx(r["with_chunk_ms"] - r["decode_ms"])
        assert r["chunk_matmul_floor_ms"] == pytest.approx(2 * bench.active_params(shape) * r["chunk"] / 1e12 * 1e3)


def test_chunk_step_engine_with_a_piece_is_a_prompts_first_chunk(monkeypatch):
    """chunk_step_engine(piece=...): the step's chunk row for the piece's last token gives the logits a prefill of the
    piece alone gives (float64: the chunk sits at position 0 of its slot and its padding rows, after the piece, are
    not seen), with the padding rows routing as themselves or cycled over the piece's rows alike."""
    import torch

    from moegps.engine.generate import bucket_for
    from moegps.engine.model import KVCache, prefill

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rng = random.Random()
    model = tiny_model(torch.float64, rng.randrange(2**20))
    shape = model.shape
    piece = [rng.randrange(1, 64) for _ in range(5)]
    want = prefill(model, KVCache(shape, 1, 8, torch.float64, "cpu"), [torch.tensor(piece)])[0]
    for alias in (False, True):
        engine, chunk = bench.chunk_step_engine(model, 3, 8, 6, torch.Generator().manual_seed(rng.randrange(99)),
                                                piece, alias)
        assert chunk.tolist() == piece + [0, 0, 0]
        with torch.inference_mode():
            logits = engine.step(bucket_for(3), 8)()
        assert torch.allclose(logits[-1], want, rtol=0, atol=1e-10)


def test_part_agree_compares_the_prefill_and_the_decode_path_with_transformers(rng):
    """A tiny random transformers Mixtral (float32, CPU) and the engine over its tensors: teacher-forced, both of
    the engine's paths (the whole sequence prefilled; the prompt prefilled, then one decode step a position) give
    transformers' logits at the last prompt position and each after it. A decode step fed the wrong position or
    token would not."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from moegps.engine.model import from_transformers

    torch.manual_seed(int(rng.integers(2**31)))
    config = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    hf = MixtralForCausalLM(config).eval()
    row = bench.part_agree(hf, from_transformers(hf), prompt_len=7, new=5)
    assert row["positions"] == 6
    for path in ("engine", "engine_decode", "eager"):
        assert row[f"{path}_vs_grouped_mm_rel_err"] < 1e-4, row
        assert row[f"{path}_vs_grouped_mm_top1"] == 1.0, row
    assert row["deterministic_decode_vs_grouped_mm_top1"] == 1.0, row
    # on the CPU nothing adds with atomics: both pairs of decode runs give the same bits
    assert row["engine_decode_repeats_same_bits"] and row["deterministic_decode_repeats_same_bits"], row
    assert not torch.are_deterministic_algorithms_enabled()
