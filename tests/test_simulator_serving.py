"""Serving in simulated time (moegps.simulator.serving).

The simulator's copy of the serving loop is checked against the engine's loop itself (``engine.serve.serve`` on a
float64 random model): both run on clocks that every model call moves on by the same cost of that call, read from
the engine's own arguments and state (prompt lengths, bucket, the slots' positions, the chunk and where it starts),
so every request's first-token and finish times agree only if the admissions, slots, buckets and positions do. The
cost of one call is checked against a sum written out by hand.
"""

import csv
import math

import numpy as np
import pytest
import torch

import moegps.engine.serve as engine_serve
from moegps.engine import Engine
from moegps.engine.generate import BUCKETS, MAX_PACKED_TOKENS, PREFILL_ROUND_TO
from moegps.engine.model import random_model
from moegps.engine.serve import Request
from moegps.shapes import from_name
from moegps.simulator import cost, serving
from moegps.simulator.serving import Call, call_seconds, serve_times
from moegps.simulator.system import load_system


@pytest.fixture(autouse=True)
def engine_cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def model():
    shape = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=64, n_layers=2, hidden=32, n_heads=4,
                                              n_kv_heads=2, head_dim=8, expert_ffn=24, n_experts=8, top_k=2)
    return random_model(shape, device="cpu", dtype=torch.float64, seed=3)


class ChargedClock:
    """Time that only the model calls (``charge``) and the waits for arrivals (``sleep``) move on."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_the_buckets_and_prefill_graphs_are_the_engines():
    assert serving.BUCKETS == BUCKETS
    assert (serving.PREFILL_ROUND_TO, serving.MAX_PACKED_TOKENS) == (PREFILL_ROUND_TO, MAX_PACKED_TOKENS)


@pytest.mark.parametrize("policy", ["continuous", "chunked 3", "chunked 8", "chunked 8 in 3 graphs", "static",
                                    "one prompt a prefill"])
def test_serve_times_follows_the_engines_loop(rng, model, monkeypatch, policy):
    """Eleven requests over four slots (max_batch 3, rounded up to the bucket of 4), arriving while others run and
    after idle gaps, each model call costing a random linear function of its prompt tokens, bucket, the bucket's
    positions and its chunk (chunks of 8 tokens, or a piece padded to the smallest of 8, 4 and 2 that holds it):
    every request's first-token and finish time from serve_times equals the engine's.
    The engine's records of its calls (serve's ``calls``, kept on the host) are the calls its model saw (read from
    its device state) and the calls serve_times costs, in order; their times are those costs, and nothing else
    (compare_calls: measured = modelled in every class, the loop's gaps 0 once its sleeps are taken out)."""
    coef = rng.uniform(0.1, 1.0, size=6) * np.array([1e-3, 1e-2, 1e-4, 1e-5, 1e-4, 1e-5])

    def seconds(call: Call) -> float:
        return float(coef[0] * sum(call.prompts) + coef[1] + coef[2] * call.bucket
                     + coef[3] * sum(call.decode_positions) + coef[4] * call.chunk + coef[5] * call.chunk_start)

    requests = [Request(rng.integers(0, 64, size=int(rng.integers(1, 12))).tolist(), int(rng.integers(1, 14)),
                        float(rng.uniform(0, 0.3)) + (1.0 if i > 8 else 0.0)) for i in range(11)]
    chunk = int(policy.split()[1]) if policy.startswith("chunked") else 0
    graphs = 3 if policy.endswith("graphs") else 1
    continuous = policy != "static"
    budget = 1 if policy == "one prompt a prefill" else 8192
    clock = ChargedClock()
    seen: list[Call] = []  # the calls as the model ran them
    engine = Engine(model, max_batch=3, max_len=32)
    assert engine.prefill_graphs is None  # every prefill goes through engine.serve.prefill
    whole_prefill, step = engine_serve.prefill, engine.step

    def charged_prefill(model, cache, prompts, **kwargs):
        seen.append(Call(prompts=tuple(len(p) for p in prompts)))
        clock.t += seconds(seen[-1])
        return whole_prefill(model, cache, prompts, **kwargs)

    def charged_step(bucket, size=0):
        run = step(bucket, size)

        def call():
            start = int(engine.chunk_inputs(size)[2]) if size else 0
            seen.append(Call(decode_positions=tuple(engine.positions[:bucket].tolist()), chunk=size,
                             chunk_start=start))
            clock.t += seconds(seen[-1])
            return run()
        return call

    monkeypatch.setattr(engine_serve, "prefill", charged_prefill)
    monkeypatch.setattr(engine, "step", charged_step)
    records: list[dict] = []
    served = engine_serve.serve(engine, requests, continuous=continuous, chunk=chunk, max_prefill_tokens=budget,
                                clock=clock, sleep=clock.sleep, calls=records, chunk_graphs=graphs)
    simulated: list[Call] = []
    timed = serve_times([len(r.prompt) for r in requests], [r.max_new_tokens for r in requests],
                        [r.arrival_s for r in requests], engine.cache.slots,
                        lambda call: simulated.append(call) or seconds(call), continuous=continuous,
                        chunk=chunk, max_prefill_tokens=budget, chunk_sizes=engine_serve.chunk_sizes(chunk, graphs))
    assert [serving.call_of(r) for r in records] == seen == simulated
    if graphs > 1:  # pieces of every size ran
        assert {c.chunk for c in seen if c.chunk} == {8, 4, 2}
    assert sum(r["slept_s"] for r in records) > 0  # the loop waited for arrivals
    compared = serving.compare_calls(records, seconds)
    assert sum(row["calls"] for row in compared[:-1]) == len(seen) and compared[-1]["class"] == "between calls"
    for row in compared:
        assert row["measured_s"] == pytest.approx(row["modelled_s"], abs=1e-9)
    for s, t, r in zip(served, timed, requests):
        assert len(s.tokens) == t.new_tokens == r.max_new_tokens
        assert t.arrival_s == pytest.approx(s.arrival_s, abs=1e-12)
        assert t.first_token_s == pytest.approx(s.first_token_s, abs=1e-12)
        assert t.finish_s == pytest.approx(s.finish_s, abs=1e-12)
    assert any(t.first_token_s > t.arrival_s for t in timed)  # some waited: the schedule was tested, not only costs


def test_serve_times_rejects_bad_requests():
    with pytest.raises(ValueError, match="chunk must be 0"):
        serve_times([3], [2], [0.0], 4, lambda call: 1.0, continuous=False, chunk=8)
    with pytest.raises(ValueError, match="at least one new token"):
        serve_times([3], [0], [0.0], 4, lambda call: 1.0)


def test_call_seconds_by_hand():
    """A decode step of four rows at positions 0, 10, 100, 1000 beside a chunk of 16 tokens from position 32, on
    Mixtral-8x7B and the H200 profile: per layer the attention block's roofline over its weights, the rows' K/V
    reads and the context's FLOPs over all 20 tokens, plus each expert's time averaged over Binomial(19, 2/8) counts
    written out with math.comb (the free row at position 0 routes as a running row: no token of its own), plus the
    layer overhead and the profile's fixed cost a layer; and the vocabulary projection's weights once."""
    shape, system = from_name("mixtral-8x7b"), load_system("h200_8gpu")
    call = Call(decode_positions=(0, 10, 100, 1000), chunk=16, chunk_start=32)
    tokens = 20
    context = (1 + 11 + 101 + 1001) + sum(32 + j + 1 for j in range(16))
    kv = 1 + 11 + 101 + 1001
    attention = max((shape.non_expert_params_per_layer * 2 + kv * shape.kv_bytes_per_token) / system.hbm_bandwidth,
                    (2 * shape.non_expert_params_per_layer * tokens + 4 * shape.n_heads * shape.head_dim * context)
                    / system.matmul_flops)
    p = shape.top_k / shape.n_experts
    routed = tokens - 1
    experts = shape.n_experts * sum(math.comb(routed, c) * p ** c * (1 - p) ** (routed - c)
                                    * float(cost.expert_time(np.array([c]), shape, system)[0])
                                    for c in range(1, routed + 1))
    vocab = shape.vocab_size * shape.hidden * 2 / system.hbm_bandwidth  # 5 rows: memory-bound
    want = 32 * (attention + experts + system.layer_overhead + system.block_overhead) + vocab
    assert system.block_overhead > 0  # the profile's calibrated per-layer cost of a call
    assert call_seconds(call, shape, system) == pytest.approx(want, rel=1e-9)
    assert call_seconds(call, shape, system, eager_layer_s=1.0) == pytest.approx(want, rel=1e-9)  # graphed: no host
    assert call_seconds(Call(), shape, system) == 0.0


def test_an_eager_prefill_takes_the_hosts_time_at_least(rng):
    """Several prompts in one prefill past the packed graphs' tokens run eagerly in the engine: the call takes
    max(GPU time, layers x the host's time a layer); one prompt or a pack within a graph (a replay) keeps the
    GPU time whatever the host's."""
    shape, system = from_name("mixtral-8x7b"), load_system("h200_8gpu")
    lengths = tuple(int(n) for n in rng.integers(20, 200, size=3))
    padded = -(-sum(lengths) // 128) * 128
    gpu = call_seconds(Call(prompts=lengths), shape, system)
    slow_host = 2 * gpu / shape.n_layers
    for graphed_up_to in (0, padded - 1):
        eager = call_seconds(Call(prompts=lengths), shape, system, slow_host, packed_graph_tokens=graphed_up_to)
        assert eager == pytest.approx(2 * gpu, rel=1e-12)
        assert call_seconds(Call(prompts=lengths), shape, system, slow_host / 4, graphed_up_to) == gpu
    assert call_seconds(Call(prompts=lengths), shape, system, slow_host, packed_graph_tokens=padded) == gpu
    one = Call(prompts=lengths[:1])
    assert call_seconds(one, shape, system, slow_host, packed_graph_tokens=0) == call_seconds(one, shape, system)


def test_the_command_writes_the_engines_columns(tmp_path, capsys):
    """The command's CSV has the columns of ``python -m moegps.engine.serve --out`` (benchmarks/engine/plot_serve.py
    reads either), a row per request, rate and policy."""
    out = tmp_path / "sim.csv"
    assert serving.main(["--requests", "6", "--rate", "0", "50", "--max-batch", "2", "--max-new-tokens", "8",
                         "--chunk", "16", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 2 * 3
    assert {"rate", "policy", "request", "new_tokens", "arrival_s", "first_token_s", "finish_s"} <= set(rows[0])
    assert {r["policy"] for r in rows} == {"continuous", "chunked", "static"}
    assert all(float(r["arrival_s"]) <= float(r["first_token_s"]) <= float(r["finish_s"]) for r in rows)
    assert "mixtral-8x7b on one GPU of h200_8gpu" in capsys.readouterr().out


def test_fit_calls_recovers_a_known_profile(rng, tmp_path, capsys):
    """Call records timed by a known profile (a weight rate and a per-layer cost other than the start's): fit_calls
    from the shipped profile recovers both within 1%; the CLI fits on one rate's records, compares on the other's and
    writes a profile that loads back with the fitted values."""
    import csv
    import gzip
    from dataclasses import replace

    from moegps.simulator.system import load_system

    shape = from_name("deepseek-v2-lite")
    start = replace(load_system("h100_8gpu"), n_gpus=1, gpus_per_node=1)
    truth = start.replace(hbm_bandwidth=start.hbm_bandwidth * float(rng.uniform(1.1, 1.4)),
                          block_overhead=float(rng.uniform(1e-5, 8e-5)))
    records = []
    for i in range(300):
        bucket = int(rng.choice([1, 2, 4, 8, 16, 32]))
        positions = rng.integers(0, 400, size=bucket)
        positions[rng.random(bucket) < 0.3] = 0  # free rows
        prompts = tuple(int(p) for p in rng.integers(20, 300, size=int(rng.integers(1, 4)))) if i % 10 == 0 else ()
        call = Call(prompts=prompts) if prompts else Call(decode_positions=tuple(int(p) for p in positions))
        seconds = call_seconds(call, shape, truth)
        records.append({"rate": 10.0 if i % 2 else 40.0, "policy": "continuous", "prompts": " ".join(map(str, prompts)),
                        "positions": "" if prompts else " ".join(map(str, positions)), "chunk": 0, "chunk_start": 0,
                        "start_s": 0.0, "end_s": seconds, "slept_s": 0.0})
    fitted = serving.fit_calls(records, shape, start)
    assert fitted.hbm_bandwidth == pytest.approx(truth.hbm_bandwidth, rel=1e-2)
    assert fitted.block_overhead == pytest.approx(truth.block_overhead, rel=1e-2)

    path, out = tmp_path / "run-calls.csv", tmp_path / "fitted.yaml"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    argv = ["--shape", "deepseek-v2-lite", "--system", "h100_8gpu", "--calls", str(path), "--eager-layer-s", "0",
            "--free-rows", "alias"]  # as call_seconds costed them (no serve record beside these calls)
    assert serving.main(argv + ["--fit-rates", "40", "--fitted-system", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out calls against fitted" in text and "wrote" in text
    loaded = load_system(out)
    assert loaded.block_overhead == pytest.approx(truth.block_overhead, rel=1e-2)
    assert loaded.hbm_bandwidth == pytest.approx(truth.hbm_bandwidth, rel=1e-2)
    zipped = tmp_path / "run-calls.csv.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    assert serving.read_call_records(zipped) == serving.read_call_records(path)
    with pytest.raises(SystemExit):
        serving.main(argv + ["--fit-rates", "5"])
    assert "leaves no calls to fit on" in capsys.readouterr().err
    simulate = ["--shape", "deepseek-v2-lite", "--system", "h100_8gpu", "--requests", "6", "--rate", "20",
                "--max-batch", "4", "--call-times", str(zipped)]
    assert serving.main(simulate + ["--call-times-rates", "40"]) == 0
    assert "calls timed as measured" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        serving.main(simulate + ["--call-times-rates", "5"])
    assert "no calls at rates [5.0]" in capsys.readouterr().err


def test_a_runs_calls_are_costed_with_the_free_rows_it_ran(tmp_path, capsys):
    """--calls without --free-rows takes the run's own mode from its RUN.csv.json (gzipped calls too); a record
    without one is a run from before the choice, which decoded its free rows as token 0; no record: an error naming
    the file, since the mode changes every decode step's cost."""
    import json

    (tmp_path / "run.csv.json").write_text(json.dumps({"free_rows": "alias"}))
    assert serving.run_free_rows(tmp_path / "run-calls.csv.gz") == "alias"
    (tmp_path / "run.csv.json").write_text(json.dumps({"model": "deepseek-v2-lite"}))
    assert serving.run_free_rows(tmp_path / "run-calls.csv") == "token0"
    with pytest.raises(ValueError, match="other-calls.csv: the run's record other.csv.json is not beside it"):
        serving.run_free_rows(tmp_path / "other-calls.csv")
    with pytest.raises(SystemExit):
        serving.main(["--shape", "deepseek-v2-lite", "--system", "h100_8gpu", "--calls", str(tmp_path / "x.csv")])
    assert "give --free-rows token0 or alias" in capsys.readouterr().err


def test_free_rows_route_as_one_token_or_none(monkeypatch):
    """A decode step's free rows (position 0) all decode token 0 in the engine and pick the same experts: the experts
    are costed for the running rows, the chunk and one token for all the free rows, the attention block for every row;
    aliased (Engine.alias_free_rows), the free rows add no token to the experts while a row runs, and one (row 0's)
    when none does."""
    shape, system = from_name("deepseek-v2-lite"), load_system("h100_8gpu")
    routed = []
    expert_seconds = serving.expected_expert_seconds
    monkeypatch.setattr(serving, "expected_expert_seconds",
                        lambda n, *a: routed.append(float(n)) or expert_seconds(n, *a))
    for positions, chunk, want, aliased in (((0, 0, 0, 5), 0, 2, 1), ((7, 9, 0, 0, 0, 0, 0, 0), 16, 19, 18),
                                            ((3, 4), 0, 2, 2), ((0, 0), 8, 9, 9)):
        call = Call(decode_positions=positions, chunk=chunk, chunk_start=4)
        call_seconds(call, shape, system, free_rows="token0")
        assert routed.pop() == want
        call_seconds(call, shape, system)  # alias, the engine's default
        assert routed.pop() == aliased
    with pytest.raises(ValueError, match="free_rows must be 'token0' or 'alias'"):
        call_seconds(Call(decode_positions=(3,)), shape, system, free_rows="pinned")


def test_expert_time_from_a_routing_trace(rng):
    """trace_expert_seconds: every token of a hand-built trace picking experts 0 and 1 at every layer costs each layer
    two experts of n tokens, exactly; a trace routed uniformly at random costs what the binomial model does (within
    3%); a skewed one costs less at 32 tokens (fewer distinct experts read); a trace of another model is refused
    naming the field."""
    from moegps.simulator.serving import expected_expert_seconds, trace_expert_seconds
    from moegps.workloads import synthetic_trace

    shape, system = from_name("mixtral-8x7b").replace(name="eight", n_layers=8), load_system("h200_8gpu")
    hand = synthetic_trace(rng, skew=0.0, n_requests=20, n_layers=8)
    hand.experts[:] = np.array([0, 1])
    seconds = trace_expert_seconds(hand, shape, system, samples=2)
    for n in (1, 7, 300):
        assert seconds(n) == pytest.approx(8 * 2 * float(cost.expert_time(np.array([n]), shape, system)[0]), rel=1e-12)
    assert seconds(0) == 0.0

    uniform = synthetic_trace(rng, skew=0.0, n_requests=400, n_layers=8, stickiness=0.0)
    picks = np.argsort(rng.random((len(uniform.experts), 8)), axis=1)[:, :2]  # two distinct experts, uniformly
    uniform.experts[:] = picks
    seconds = trace_expert_seconds(uniform, shape, system, samples=64)
    for n in (1, 4, 32, 256):
        assert seconds(n) == pytest.approx(8 * expected_expert_seconds(n, shape, system), rel=0.03)
    skewed = trace_expert_seconds(synthetic_trace(rng, skew=2.0, n_requests=400, n_layers=8), shape, system, samples=64)
    assert skewed(2) < 0.97 * seconds(2)

    with pytest.raises(ValueError, match="n_layers is 8, expected 32"):
        trace_expert_seconds(hand, from_name("mixtral-8x7b"), system)


def test_cli_with_a_routing_trace(rng, tmp_path, capsys):
    from moegps.workloads import synthetic_trace

    path = tmp_path / "trace.parquet"
    synthetic_trace(rng, skew=1.0, n_requests=30, n_layers=26, n_experts=64, top_k=6).write(path)
    argv = ["--shape", "deepseek-v2-lite", "--system", "h100_8gpu", "--requests", "6", "--rate", "20", "--max-batch", "4"]
    assert serving.main(argv + ["--routing-trace", str(path)]) == 0
    assert f"routing drawn from {path}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        serving.main(argv + ["--routing-trace", str(path), "--calls", str(path)])
    assert "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serving.main(["--shape", "mixtral-8x7b", "--routing-trace", str(path)])
    assert "metadata field n_experts is 64, expected 8" in capsys.readouterr().err


def test_expert_time_from_measured_active_experts():
    """active_expert_seconds on hand-built counts: at a measured point a(n) experts share n * k picks evenly; between
    points (and from a(1) = k) a(n) is interpolated in log n (n = 2 halfway from 1 to 4, n = 8 halfway from 4 to 16);
    past the last point, uniform routing exactly; counts equal to uniform routing's means cost what its binomial model
    does; impossible counts and malformed items are refused, naming them."""
    from moegps.simulator.serving import (active_expert_seconds, expected_expert_seconds, parse_active_experts,
                                          uniform_active_experts)

    shape, system = from_name("deepseek-v2-lite"), load_system("h100_8gpu")
    layers, k = shape.n_moe_layers, shape.top_k

    def even(a, n):  # a experts sharing n * k picks, every MoE layer
        return layers * a * float(cost.expert_time(np.array([n * k / a]), shape, system)[0])

    seconds = active_expert_seconds({4: 12.0, 16: 24.0}, shape, system)
    for n, a in ((1, 6.0), (2, 9.0), (4, 12.0), (8, 18.0), (16, 24.0)):
        assert seconds(n) == pytest.approx(even(a, n), rel=1e-12), n
    assert seconds(17) == pytest.approx(layers * expected_expert_seconds(17, shape, system), rel=1e-12)
    assert seconds(0) == 0.0

    uniform = active_expert_seconds({n: uniform_active_experts(n, 64, k) for n in (8, 32)}, shape, system)
    for n in (8, 32):
        assert uniform(n) == pytest.approx(layers * expected_expert_seconds(n, shape, system), rel=0.01)

    with pytest.raises(ValueError, match="at most min\\(E, n \\* k\\) = 24"):
        active_expert_seconds({4: 30.0}, shape, system)
    with pytest.raises(ValueError, match="at least top_k = 6"):
        active_expert_seconds({4: 3.0}, shape, system)
    assert parse_active_experts(["8=24.5", "32=40"]) == {8: 24.5, 32: 40.0}
    with pytest.raises(ValueError, match="'8:3': expected TOKENS=EXPERTS"):
        parse_active_experts(["8:3"])


def test_cli_with_measured_active_experts(capsys):
    argv = ["--shape", "deepseek-v2-lite", "--system", "h100_8gpu", "--requests", "6", "--rate", "20", "--max-batch", "4"]
    assert serving.main(argv + ["--active-experts", "4=12", "16=24"]) == 0
    out = capsys.readouterr().out
    assert "distinct experts as measured: 4=12 16=24" in out
    uniform_out = (serving.main(argv), capsys.readouterr().out)[1]
    ceiling = lambda text: float(text.split("decode ceiling ")[1].split()[0])  # noqa: E731
    assert ceiling(out) > ceiling(uniform_out)  # 4 slots reading 12 experts a layer, not uniform routing's 21
    with pytest.raises(SystemExit):
        serving.main(argv + ["--active-experts", "4=12", "--fit-rates", "20", "--calls", "x.csv"])
    assert "give --active-experts without them" in capsys.readouterr().err


def test_measured_call_seconds_looks_up_the_median_of_its_kind():
    """Hand-built records: a decode step is costed by the median of the steps of its bucket with as many rows running,
    else of its bucket, a prefill by its class's; a kind never recorded falls back to the given model."""
    def record(seconds, prompts="", positions="", chunk=0):
        return {"prompts": prompts, "positions": positions, "chunk": chunk, "chunk_start": 0, "start_s": 1.0,
                "end_s": 1.0 + seconds, "slept_s": 0.0}

    records = [record(0.010, positions="5 0 0 0"), record(0.012, positions="0 7 0 0"), record(0.030, positions="5 0 0 0"),
               record(0.050, positions="5 6 7 8"), record(0.1, prompts="40"), record(0.3, prompts="60")]
    seconds = serving.measured_call_seconds(records, lambda call: 99.0)
    assert seconds(Call(decode_positions=(9, 0, 0, 0))) == pytest.approx(0.012)   # one running: 10, 12, 30
    assert seconds(Call(decode_positions=(9, 8, 7, 6))) == pytest.approx(0.050)   # four running
    assert seconds(Call(decode_positions=(9, 8, 0, 0))) == pytest.approx(0.021)   # none with two: the bucket's
    assert seconds(Call(prompts=(123,))) == pytest.approx(0.2)                    # one prompt: 0.1, 0.3
    assert seconds(Call(decode_positions=(1, 2))) == 99.0                         # bucket 2: never recorded


def test_plot_calls_breaks_a_run_into_its_parts():
    """benchmarks/engine/plot_calls.py's breakdown of hand-built records: each call's time to its kind, the sleeps
    to waiting, the rest between calls to the loop; the parts of a run add up to its span; runs kept apart."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "plot_calls", Path(__file__).resolve().parents[1] / "benchmarks/engine/plot_calls.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)

    def record(rate, start, end, slept=0.0, prompts="", positions="", chunk=0):
        return {"rate": rate, "policy": "continuous", "prompts": prompts, "positions": positions, "chunk": chunk,
                "chunk_start": 0, "start_s": start, "end_s": end, "slept_s": slept}

    records = [record(10, 0.0, 0.5, prompts="30"), record(10, 0.6, 0.8, positions="31"),
               record(10, 2.0, 2.3, slept=1.1, prompts="12 40"), record(10, 2.35, 2.5, positions="13 41", chunk=16),
               record(20, 0.0, 0.25, positions="3 0")]
    parts = plot.breakdown(records)
    ten = parts[(10.0, "continuous")]
    assert ten["prefill, one prompt"] == pytest.approx(0.5) and ten["prefill, several packed"] == pytest.approx(0.3)
    assert ten["decode steps"] == pytest.approx(0.2) and ten["decode steps with a chunk"] == pytest.approx(0.15)
    assert ten["waiting for arrivals"] == pytest.approx(1.1)
    assert ten["loop between calls"] == pytest.approx(0.1 + 0.1 + 0.05)
    assert sum(ten.values()) == pytest.approx(2.5)
    assert parts[(20.0, "continuous")]["decode steps"] == pytest.approx(0.25)
    assert sum(parts[(20.0, "continuous")].values()) == pytest.approx(0.25)


def test_ab_serve_prints_b_over_a(tmp_path, capsys, monkeypatch):
    """benchmarks/engine/ab_serve.py on two simulated runs of the same requests (free rows as token 0, then aliased):
    each run's throughput and medians of B over A, as summarize gives them from each CSV; with --predicted, the
    same files' ratios beside (here equal)."""
    from pathlib import Path

    from moegps.engine.serve import summarize

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks" / "engine"))
    import ab_serve

    files = []
    for mode in ("token0", "alias"):
        files.append(tmp_path / f"{mode}.csv")
        assert serving.main(["--shape", "deepseek-v2-lite", "--system", "h100_8gpu", "--requests", "12", "--rate", "20",
                             "--max-batch", "8", "--max-new-tokens", "16", "--chunk", "32", "--free-rows", mode,
                             "--out", str(files[-1])]) == 0
    capsys.readouterr()
    ab_serve.main([str(files[0]), str(files[1]), "--predicted", str(files[0]), str(files[1])])
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| 20 |")}
    assert {policy for _, policy in lines} == {"continuous", "chunked", "static"}
    by_run = [{policy: summarize(served) for (policy, _), served in engine_serve.served_by_run(
        list(csv.DictReader(open(f, newline="")))).items()} for f in files]
    for (_, policy), line in lines.items():
        cells = [c.strip() for c in line.split("|")[3:-1]]
        for cell, key in zip(cells, ("tokens_per_s", "ttft_p50_ms", "tpot_p50_ms", "latency_p50_ms")):
            want = by_run[1][policy][key] / by_run[0][policy][key]
            measured, predicted = (float(x) for x in cell.split(" / "))
            assert measured == predicted == pytest.approx(want, abs=5e-4), (policy, key)
    assert any(float(line.split("|")[5].split(" / ")[0]) < 0.999 for line in lines.values())  # aliasing changed TPOT
