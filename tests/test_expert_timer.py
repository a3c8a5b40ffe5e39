"""executor.expert_timer: the simulator's expert time measured by running each GPU's rows through the kernels."""

import numpy as np
import pytest
import torch

from moegps.shapes import ModelShape
from moegps.simulator import cost
from moegps.executor.expert_timer import KernelExpertTimer
from moegps.simulator.replay import ReplayConfig, make_batches, oracle_plan, contiguous_share, simulate, static_plan
from moegps.simulator.system import SystemSpec
from moegps.workloads import random_trace

TINY = ModelShape(name="tiny", vocab_size=100, n_layers=2, hidden=32, n_heads=2, n_kv_heads=2, head_dim=16,
                  expert_ffn=48, n_experts=6, top_k=2)


def _system():
    return SystemSpec(name="test", n_gpus=3, gpus_per_node=3, hbm_bandwidth=1e12, matmul_flops=1e14,
                      link_bandwidth=1e11, link_latency=3e-6, expert_launch=2e-6, layer_overhead=0.0, tile_tokens=8)


def test_the_timer_runs_each_gpus_rows_and_times_each_distinct_share_once(monkeypatch, rng):
    """Every (step, GPU) with rows runs the executor's expert kernel on exactly those rows (fractions
    rounded), one row per selection, holding the weights of exactly the experts with rows (as a rank
    holds its slots); none is run for a GPU without rows (0 s); a row-count vector seen before is not
    timed again; a shape mismatch is named."""
    from moegps.executor import expert_timer

    ran = []
    real = expert_timer.expert_compute

    def spy(x, w_gate_up, w_down, ids, gates, dense=False):
        # which of the timer's experts these slots are: match each slot's weights to the model's
        held = [int(((timer.w_gate_up - w).abs().amax((1, 2)) == 0).nonzero()) for w in w_gate_up]
        assert torch.equal(w_down, timer.w_down[held])
        rows = [0] * TINY.n_experts
        for slot, n in enumerate(torch.bincount(ids.reshape(-1), minlength=len(held)).tolist()):
            rows[held[slot]] = n
        assert min(rows[e] for e in held) > 0  # only experts with rows are held, as on a rank
        assert ids.shape[1] == 1 and x.shape == (ids.shape[0], TINY.hidden) and w_gate_up.shape[1:] == (96, 32)
        ran.append(rows)
        return real(x, w_gate_up, w_down, ids, gates, dense=dense)

    monkeypatch.setattr(expert_timer, "expert_compute", spy)
    timer = KernelExpertTimer(TINY, device="cpu")
    per_gpu = rng.integers(0, 5, size=(4, 3, 6)).astype(np.float64)
    per_gpu[1, 2] = 0.0  # a GPU with no rows at one step
    per_gpu[3] = per_gpu[0]  # a step that repeats another's shares exactly
    per_gpu[2, 0, 1] += 0.4  # a replica's fraction, rounded away
    seconds = timer.gpu_seconds(per_gpu)
    assert seconds.shape == (4, 3) and seconds[1, 2] == 0.0
    assert (seconds[per_gpu.sum(-1) > 0] > 0).all()
    np.testing.assert_array_equal(seconds[3], seconds[0])
    distinct = {tuple(r) for r in np.rint(per_gpu).astype(int).reshape(-1, 6).tolist() if sum(r)}
    assert set(map(tuple, ran)) == distinct and timer.measured == len(distinct) and timer.calls == 12
    before = len(ran)
    np.testing.assert_array_equal(timer.gpu_seconds(per_gpu[::-1]), seconds[::-1])
    assert len(ran) == before and timer.calls == 24  # all seen before: nothing run again
    with pytest.raises(ValueError, match="7 experts.*tiny has 6"):
        timer.gpu_seconds(np.ones((2, 7)))


def test_simulate_takes_the_busiest_gpus_measured_time(rng):
    """With a timer as the table, each layer's expert part is the busiest GPU's measured time of the
    rows the placement sends it (a hand-made timer: 1 ms a row plus 10 ms an expert held with rows,
    against a max over GPUs worked out here from route_tokens' per-GPU rows); the layer's fixed
    overhead, which a timed call holds, is not added again; the rest is unchanged."""

    class RowTimer:
        def gpu_seconds(self, per_gpu):
            per_gpu = np.rint(per_gpu)
            return 1e-3 * per_gpu.sum(-1) + 1e-2 * (per_gpu > 0).sum(-1)

    trace = random_trace(rng, n_requests=6, n_layers=2, n_experts=6, top_k=2, skew=1.5, decode_steps=3)
    batches = make_batches(trace, 3, cfg=ReplayConfig(batch_size=2))
    system = _system().replace(layer_overhead=float(rng.uniform(1e-5, 1e-4)))
    for plan in (static_plan(batches), oracle_plan(batches, lambda loads: contiguous_share(2, 6, 3))):
        measured = simulate(batches, plan, TINY, system, table=RowTimer())
        modelled = simulate(batches, plan, TINY, system)
        assert (measured.parts["overhead"] == 0).all() and np.allclose(modelled.parts["overhead"], system.layer_overhead)
        for layer in range(2):
            share = plan.share[plan.placement_of_step, layer]
            counts = np.zeros((batches.n_steps, 3, 6))
            for j in range(batches.experts.shape[-1]):  # each of a token's k selections
                np.add.at(counts, (batches.step, batches.source, batches.experts[:, layer, j]), 1.0)
            _, per_gpu = cost.route_tokens(counts, share)
            want = (1e-3 * np.rint(per_gpu).sum(-1) + 1e-2 * (np.rint(per_gpu) > 0).sum(-1)).max(-1)
            np.testing.assert_allclose(measured.parts["expert"][:, layer], want)
        np.testing.assert_allclose(measured.parts["dispatch"], modelled.parts["dispatch"])


def test_the_simulator_command_times_experts_with_the_kernels(tmp_path):
    """The simulator's config with ``expert_time=kernels`` replays with the timer (here the CPU's torch
    loop on the bundled model's expert shape) and its rows say so, and the shares it timed read back as
    calibration cases; the default stays the roofline; a value that is neither is an error naming the field."""
    import dataclasses
    from pathlib import Path

    from moegps.configs import validate
    from moegps.simulator.calibrate import cases_from_kernel_bench
    from moegps.simulator.__main__ import SimulateConfig, simulate as run

    trace = str(Path(__file__).resolve().parents[1] / "traces" / "mixtral-tiny" / "mmlu-64")
    rows = {}
    for how in ("roofline", "kernels"):
        config = dataclasses.asdict(SimulateConfig(trace=trace, limit=4, predictors=["global_profile"],
                                                   system="h200_8gpu", expert_time=how))
        _, results, rows[how], timer = run(config)
        assert all(r.parts["expert"].sum() > 0 for r in results)
    assert {r["config.expert_time"] for r in rows["kernels"]} == {"kernels:cpu"}
    # the shares it timed, as calibration cases: each share's rows and time come back from the CSV
    shares_csv = tmp_path / "expert_shares.csv"
    timer.shares().to_csv(shares_csv, index=False)
    cases = cases_from_kernel_bench(shares_csv)
    assert len(cases) == timer.measured > 0
    for case in cases:
        rows_e = tuple(int(r) for r in case.tokens_per_gpu_expert[0])
        assert case.measured_ms["moe_ms"] == pytest.approx(timer.seconds(rows_e) * 1e3)
        assert case.info["shape"].n_experts == timer.shape.n_experts and case.info["shape"].top_k == 1
    assert {r["config.expert_time"] for r in rows["roofline"]} == {"roofline"}
    assert [r["dispatch_ms"] for r in rows["kernels"]] == pytest.approx([r["dispatch_ms"] for r in rows["roofline"]])
    with pytest.raises(Exception, match="expert_time"):
        validate({"expert_time": "measured"}, SimulateConfig, "simulator")


def test_the_plot_reads_the_simulators_printed_plan_table(tmp_path):
    """benchmarks/simulator/plot_expert_time.py reads the speedups the simulator command prints (the
    runs of a lent GPU whose files did not come back): the same numbers as the rows it wrote, and a log
    without the table is named."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from moegps.results import read_results

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("plot_expert_time", root / "benchmarks/simulator/plot_expert_time.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    printed = subprocess.run([sys.executable, "-m", "moegps.simulator", "trace=random", "limit=8",
                              "predictors=[global_profile]", "replay.batch_size=2", f"out={tmp_path}/run"],
                             capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    log = tmp_path / "run.log"
    log.write_text(printed)
    read = plot.plan_speedups(log)
    rows = read_results(tmp_path / "run" / "rows.parquet").set_index("config.plan")["total_ms"]
    assert list(read) == list(rows.index) and read["static"] == 1.0
    assert [read[plan] for plan in rows.index] == pytest.approx(list(rows["static"] / rows), abs=5e-4)
    # a measured run's speedups come from its parts: a fixed overhead in its totals (runs before the timed
    # calls stopped adding it) does not count
    header = printed[printed.index("plan "):printed.index("wrote ")].splitlines()[0]
    parts = {"static": [5.0, 1.0, 1.0, 2.0, 0.0, 0.0], "global_profile": [3.0, 1.5, 1.5, 2.0, 0.25, 0.0]}
    lines = [f"{plan} family {sum(v) + 0.7:.2f} " + " ".join(f"{x:.2f}" for x in v) + " 9.999" for plan, v in parts.items()]
    (tmp_path / "measured.log").write_text("expert time measured on cpu: ...\n" + "\n".join([header, *lines, "wrote x"]))
    assert plot.plan_speedups(tmp_path / "measured.log") == pytest.approx({"static": 1.0, "global_profile": 9.0 / 8.25})
    (tmp_path / "empty.log").write_text("nothing here\n")
    with pytest.raises(ValueError, match="empty.log: no plan table"):
        plot.plan_speedups(tmp_path / "empty.log")


def test_the_guide_times_experts_with_the_kernels_when_asked(tmp_path):
    """The guide's ``expert_time=kernels`` hands every replay the timer (here the CPU's torch loop on the
    bundled model's shape): the expert part differs from the roofline's, dispatch does not; asking for
    the kernels and a benchmark table at once is an error naming both fields. The shares it timed are
    written as ``expert_shares.csv``, which calibration reads back share by share."""
    from pathlib import Path

    import pandas as pd

    from moegps.configs import ConfigError
    from moegps.simulator.calibrate import cases_from_kernel_bench
    from moegps.simulator.guide import GuideConfig, run_guide
    from moegps.simulator.pipeline import write_expert_shares

    trace = str(Path(__file__).resolve().parents[1] / "traces" / "mixtral-tiny" / "mmlu-64")
    base = dict(trace=trace, limit=4, gpus=[2], link_gbps=[64.0], batch_sizes=[2], system="h200_8gpu",
                distribution=["global_profile"], token=["token_table"], token_placement_from=None)
    modelled_table, modelled = run_guide(GuideConfig(**base), progress=False)
    measured_table, measured = run_guide(GuideConfig(**base, expert_time="kernels"), progress=False)
    assert write_expert_shares(modelled_table.attrs["expert_shares"], tmp_path) == ""
    assert not (tmp_path / "expert_shares.csv").exists()
    assert "expert_shares.csv" in write_expert_shares(measured_table.attrs["expert_shares"], tmp_path)
    shares = pd.concat(measured_table.attrs["expert_shares"], ignore_index=True)
    cases = cases_from_kernel_bench(tmp_path / "expert_shares.csv")
    assert len(cases) == len(shares) > 1
    assert [c.tokens_per_gpu_expert.sum() for c in cases] == list(shares["tokens"])
    assert [c.measured_ms["moe_ms"] for c in cases] == pytest.approx(list(shares["ours_us"] / 1e3))
    plans = [r for r in measured if r["config.plan"] != "oracle"]  # the bound picks by total time, each step
    assert [r["dispatch_ms"] for r in plans] == pytest.approx(
        [r["dispatch_ms"] for r in modelled if r["config.plan"] != "oracle"])
    assert all(m["expert_ms"] > 0 for m in measured)
    assert [m["expert_ms"] for m in measured] != pytest.approx([r["expert_ms"] for r in modelled])
    with pytest.raises(ConfigError, match="'expert_time'.*'expert_table'"):
        run_guide(GuideConfig(**base, expert_time="kernels", expert_table="bench.csv"), progress=False)
