"""Every command, any config override: it either runs and leaves a valid result, or fails with a
message that names the field, and then writes no results row (issue 21).

Hypothesis draws overrides for each app (wrong types, negative and zero sizes, 0 for ``limit``,
empty and malformed lists, unknown ``+keys``, and good values) and runs the app in this process on a
tiny synthetic trace, through the same function its ``python -m`` entry point calls after hydra
composed the config. Bounded examples, derandomized (CI runs the same cases every time).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import open_dict

from moegps.paths import CONF_DIR, register_resolvers

# values any field may be handed: wrong types, bad sizes, malformed lists, and good ones
VALUES = ["abc", "-4", "0", "1", "2", "0.5", "-0.5", "null", "true", "[]", "[abc]", "[-2]", "[0]", "[2]", "[fast]",
          "[64]", "1e9"]


def compose_app(config_name: str, overrides: list[str]):
    """The config hydra's entry point would hand the app (HydraConfig set, its node removed)."""
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_sweep(overrides, out):
    from moegps.sweep import compose_config, run_one

    run_one(compose_config([*overrides, f"out={out}"]))


def hydra_app(config_name, module, out_key="out"):
    def run(overrides, out):
        import importlib

        app = importlib.import_module(module).app if module != "moegps.placement.__main__" else \
            importlib.import_module(module).main
        app(compose_app(config_name, [*overrides, f"{out_key}={out}"]))
    return run


def rows_ok(out: Path, pattern: str) -> bool:
    from moegps.results import read_results

    files = list(out.rglob(pattern))
    if pattern.endswith("rows.parquet") or "rows/" in pattern:
        return bool(files) and len(read_results(files[0])) > 0
    return bool(files) and all(f.stat().st_size > 0 for f in files)


def run_collect(overrides, out):
    from moegps.collect import collect

    collect(compose_app("collect", [*overrides, f"out_dir={out}"]))


# app -> (runner, base overrides for a run of a second or less, fields drawn, what a result is)
APPS = {
    "sweep": (run_sweep, ["trace=random", "limit=8", "batch_size=2", "predictor=ema", "placement=contiguous",
                          "system.link_gbps=64"],
              ["batch_size", "limit", "test_fraction", "interval", "seed", "replay.migration_exposed",
               "replay.phase", "system.link_gbps", "predictor.decay", "split", "backend", "+batchsize",
               "+predictor.colour"], "**/rows.parquet"),
    "guide": (hydra_app("guide", "moegps.simulator.guide"),
              ["trace=random", "limit=8", "gpus=[8]", "link_gbps=[64]", "batch_sizes=[2]",
               "distribution=[global_profile]", "token=[token_table]", "token_placement_from=null"],
              ["gpus", "link_gbps", "batch_sizes", "limit", "test_fraction", "interval", "phase", "extra_slots",
               "placement", "+batchsize"], "rows.parquet"),
    "simulator": (hydra_app("simulate", "moegps.simulator.__main__"),
                  ["trace=random", "limit=8", "predictors=[global_profile]", "replay.batch_size=2"],
                  ["replay.batch_size", "limit", "interval", "test_fraction", "replay.migration_exposed",
                   "replay.source", "skew", "placement", "expert_time", "+replay.batchsize"], "rows.parquet"),
    "predictors.evaluate": (hydra_app("evaluate", "moegps.predictors.evaluate"),
                            ["trace=random", "limit=8", "latency_batches=1"] + [
                                f"~predictors.{p}" for p in (
                                    "uniform", "phase_profile", "step_profile", "last_batch", "sliding_window",
                                    "own_prefill", "learned", "learned_lightgbm", "token_mix", "most_frequent",
                                    "position_table", "cross_layer", "ffn", "sequence", "lgbm", "mlp",
                                    "token_table")],
                            ["batch_requests", "window", "limit", "test_fraction", "torch_threads",
                             "predictors.ema.decay", "+batch_size"], "predictors.parquet"),
    "placement": (hydra_app("placement_app", "moegps.placement.__main__"),
                  ["trace=random", "limit=8", "system.gpus=[2]", "system.extra_slots=[0]",
                   "algorithms=[contiguous,balanced]", "incremental_budgets=[0]"],
                  ["system.gpus", "system.extra_slots", "limit", "test_fraction", "restarts", "milp.max_cells",
                   "algorithms", "expert_bytes", "+gpus"], "summary.csv"),
    "executor": (hydra_app("execute", "moegps.executor.__main__"),
                 ["shape=tiny", "hidden=16", "ffn=16", "n_layers=1", "max_batches=1", "warmup=0", "batch_requests=2",
                  "device=cpu"],
                 ["batch_requests", "max_batches", "warmup", "n_layers", "extra_slots", "window", "device", "dtype",
                  "test_fraction", "+batchsize"], "rows/*.parquet"),
    "collect": (run_collect, ["limit=2", "batch_size=2", "max_new_tokens=2", "max_prompt_tokens=12", "progress=false",
                              "device=cpu"],
                ["limit", "batch_size", "max_new_tokens", "max_prompt_tokens", "device", "model.dtype", "seed",
                 "+batchsize"], "shard-*.parquet"),
}

SLOW_APPS = {"executor": 6, "collect": 6}  # examples for apps whose runs take longer


def check_app(name: str, field: str, value: str, tmp: Path) -> None:
    """One drawn override: a valid result, or an error naming the field and no results row."""
    runner, base, _, result = APPS[name]
    out = tmp / "out"
    override = f"{field}={value}"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            runner([*base, override], out)
    except Exception as e:  # noqa: BLE001 - every failure must name the field; that is the property
        message = str(e)
        leaf = field.lstrip("+").split(".")[-1]
        assert leaf in message, f"{name} {override}: {type(e).__name__} does not name '{leaf}': {message[:400]}"
        leftovers = [p for p in out.rglob("*.parquet") if "cache" not in p.parts] + list(out.rglob("summary.csv"))
        assert not leftovers, f"{name} {override} failed but wrote {leftovers}"
        return
    assert rows_ok(out, result), f"{name} {override}: ran but left no valid result ({result})"


@pytest.mark.parametrize("name", list(APPS))
def test_each_app_runs_on_its_base_overrides(name, tmp_path):
    """The property below is not vacuous: with no drawn override every app succeeds."""
    runner, base, _, result = APPS[name]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        runner(base, tmp_path / "out")
    assert rows_ok(tmp_path / "out", result)


@pytest.mark.parametrize("name", list(APPS))
def test_any_override_runs_or_names_the_field(name, tmp_path_factory):
    fields = APPS[name][2]

    @settings(max_examples=SLOW_APPS.get(name, 12), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(fields), value=st.sampled_from(VALUES))
    def prop(field, value):
        check_app(name, field, value, tmp_path_factory.mktemp(name.replace(".", "_")))

    prop()


@pytest.mark.parametrize("app", ["simulator", "guide"])
def test_the_simulator_and_the_guide_take_a_placement_option(app, tmp_path):
    """`placement=balanced placement.refine=false` picks moegps/conf/placement/balanced.yaml with a field
    changed (a string field of that name collided with the config group: hydra refused every value);
    none picked is "auto"; a name without an option file is an error naming the group."""
    from moegps.results import read_results

    runner, base = APPS[app][0], APPS[app][1]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        runner([*base, "placement=balanced", "placement.refine=false"], tmp_path / "a")
        runner(base, tmp_path / "b")
    assert set(read_results(tmp_path / "a" / "rows.parquet")["config.placement"]) == {"balanced"}
    assert set(read_results(tmp_path / "b" / "rows.parquet")["config.placement"]) == {"auto"}
    with pytest.raises(Exception, match="placement"):
        runner([*base, "placement=nope"], tmp_path / "c")
