"""The guide's sweep and the placement study, end to end on a small synthetic trace."""

import numpy as np
import pandas as pd
import pytest

from moegps.simulator.guide import GuideConfig, placement_study, plot_decisions, plot_placement, run_guide
from moegps.workloads import synthetic_trace, trace_shape


def test_synthetic_skew_is_a_knob(rng):
    flat = synthetic_trace(rng, 0.0, n_requests=20, n_layers=2).loads(by="all").imbalance().mean()
    skewed = synthetic_trace(rng, 2.5, n_requests=20, n_layers=2).loads(by="all").imbalance().mean()
    assert skewed > flat + 0.3


def test_guide_sweep_and_plot(tmp_path):
    cfg = GuideConfig(trace="synthetic", limit=16, batch_sizes=[4], link_gbps=[450.0, 32.0], skews=[1.0, 2.0],
                      distribution=["global_profile"], token=["token_table"], seed=int(np.random.default_rng().integers(1000)))
    table, rows = run_guide(cfg, progress=False)
    assert len(table) == 4  # 2 skews x 2 bandwidths
    frame = pd.DataFrame(rows)
    assert (frame.backend == "sim").all()
    for _, r in table.iterrows():
        assert r.oracle_ms <= min(r.baseline_ms, r.distribution_ms, r.token_ms) * (1 + 1e-9)
        assert r.best_token.startswith("token_table")
    for skew in (1.0, 2.0):  # a slower link never makes the baseline faster
        sub = table[table["skew"] == skew].set_index("link_gbps")
        assert sub.loc[32.0, "baseline_ms"] >= sub.loc[450.0, "baseline_ms"]
    path = plot_decisions(table, tmp_path / "d.png")
    assert path.stat().st_size > 10_000


def test_guide_replays_the_servers_batching(rng):
    """batching= reaches the replay: on one synthetic trace, continuous batching (its requests all decode the
    same number of steps) gives the static decision table, chunked prefill another one."""
    seed = int(rng.integers(1000))
    tables = {}
    for batching in ("static", "continuous", "chunked"):
        cfg = GuideConfig(trace="synthetic", limit=16, batch_sizes=[4], link_gbps=[450.0], seed=seed,
                          distribution=["global_profile"], token=["token_table"], batching=batching, chunk=32)
        tables[batching] = run_guide(cfg, progress=False)[0]
    cols = ["baseline_ms", "distribution_ms", "token_ms", "oracle_ms"]
    np.testing.assert_allclose(tables["continuous"][cols], tables["static"][cols])
    assert not np.allclose(tables["chunked"][cols], tables["static"][cols])
    # each table says how it was replayed; the attention over a cached history reaches the replay too
    assert (tables["chunked"].batching == "chunked").all() and (tables["chunked"].chunk == 32).all()
    cfg = GuideConfig(trace="synthetic", limit=16, batch_sizes=[4], link_gbps=[450.0], seed=seed,
                      distribution=["global_profile"], token=["token_table"], attention_context=True,
                      history_tokens=4096)
    longer = run_guide(cfg, progress=False)[0]
    assert (longer.history_tokens == 4096).all() and (longer.baseline_ms > tables["static"].baseline_ms).all()


def test_placement_study_rows(rng, tmp_path):
    cfg = GuideConfig(trace="synthetic", limit=24, batch_sizes=[8], skews=[1.5], seed=int(rng.integers(1000)))
    table, rows = placement_study(cfg, progress=False)
    assert {"static", "balanced_all", "balanced_prefill", "balanced_decode", "prefill_aware_max"} <= set(table.placement)
    static = table[table.placement == "static"]
    np.testing.assert_allclose(static.expert_speedup, 1.0)
    assert (table.expert_ms > 0).all()
    # the speedup column is static's expert time over each placement's, per phase
    ref = static.set_index("phase").expert_ms
    np.testing.assert_allclose(table.expert_speedup, ref.loc[table.phase].to_numpy() / table.expert_ms.to_numpy())
    assert plot_placement(table, tmp_path / "p.png").stat().st_size > 10_000


def test_guide_config_takes_a_shape_override(rng):
    """``shape=`` (not ``model=``, which names the moegps/conf/model group) picks the cost shape; the trace keeps its layers."""
    from hydra import compose, initialize_config_dir

    from moegps.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="guide", overrides=["shape=mixtral-8x7b", "attention=tp"])
    assert raw.shape == "mixtral-8x7b" and raw.attention == "tp"
    trace = synthetic_trace(rng, 1.0, n_requests=4, n_layers=3)
    shape = trace_shape(trace.meta, raw.shape)
    assert (shape.name, shape.hidden, shape.expert_ffn, shape.n_experts) == ("mixtral-8x7b", 4096, 14336, 8)


def test_headline_plot_reads_decision_tables(tmp_path, rng):
    from moegps.simulator.headline import plot_headline, read_decisions

    gains = rng.uniform(-0.05, 0.3, 8)
    frame = pd.DataFrame({"batch_size": [1, 4, 1, 4] * 2, "link_gbps": [32, 32, 900, 900] * 2,
                          "attention": ["dp"] * 4 + ["tp"] * 4, "gain_dist_over_token": gains})
    frame.to_csv(tmp_path / "decision.csv", index=False)
    table = read_decisions([f"a trace={tmp_path / 'decision.csv'}"])
    np.testing.assert_array_equal(table.gain_dist_over_token, gains)
    assert (table.label == "a trace").all()
    assert plot_headline(table, tmp_path / "h.png").stat().st_size > 10_000
    frame.drop(columns="attention").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv.*attention"):
        read_decisions([f"x={tmp_path / 'bad.csv'}"])
    with pytest.raises(ValueError, match="label=path"):
        read_decisions([str(tmp_path / "decision.csv")])


def test_simulate_command_runs_the_pipeline_out_of_sample(tmp_path):
    """``python -m moegps.simulator``'s config (moegps/conf/simulate.yaml) through the one pipeline:
    the baseline, oracle placement, each predictor and the oracle bound, each row stating the split;
    the static row equals a replay of the last half of the requests made directly."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moegps.paths import CONF_DIR, register_resolvers
    from moegps.shapes import from_name
    from moegps.simulator.__main__ import simulate
    from moegps.simulator.replay import ReplayConfig, make_batches, simulate as replay_simulate, static_plan
    from moegps.simulator.system import load_system
    from moegps.workloads import load_trace

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="simulate", overrides=["trace=random", "limit=24", "predictors=[global_profile]",
                                                          f"out={tmp_path}"], return_hydra_config=True)
    config = OmegaConf.to_container(raw, resolve=False)
    config.pop("hydra")
    config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    config["system"] = "h100_8gpu"
    work, results, rows, timer = simulate(config)
    assert timer is None  # the roofline: nothing timed
    assert [r.plan for r in results] == ["static", "oracle_placement", "global_profile", "oracle"]
    assert all(row["config.split"] == "arrival" and row["config.n_test_requests"] == 12 for row in rows)
    trace = load_trace("random", limit=24)
    test = trace.with_requests(trace.requests()[12:])
    system = load_system("h100_8gpu")
    rcfg = ReplayConfig(**config["replay"])
    batches = make_batches(test, system.n_gpus, 16, rcfg)
    shape = from_name("mixtral-8x7b", n_experts=16, top_k=2)
    want = replay_simulate(batches, static_plan(batches), shape, system, rcfg).total
    assert results[0].total == pytest.approx(want, rel=1e-12)
