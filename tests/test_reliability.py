"""Regression tests for the findings of issue 21 ("nothing silent"), one or more per finding; each
fails on commit 1a7afce. The property-based config test over every app is tests/test_config_properties.py.

1. bad sizes and limit=0 refused, naming the field;        8. paths relative to the data root;
2. +key refused where a schema exists;                      9. clean interrupts, workers end with the sweep;
3. untyped fields named (types, lists, device, dtype);      10. the unpickler's work is bounded;
4. empty traces refused;                                    11. plots: one colour scale, visible ticks,
5. sweep runs keyed by the trace's content;                     decision cells that differ;
6. truncated rows/shards: rerun, or named with the fix;     12. true-loads placement named as what it is,
7. collect's manifest counts its shards; one writer per         percent printed as percent, sweep n/N;
   folder;                                                  13. the docs' notebook command is installed.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.errors import HydraException

from moegps.configs import INTERRUPTED, ConfigError, run_command
from moegps.paths import PROJECT_ROOT, data_root
from moegps.trace import RoutingTrace, TraceError
from moegps.workloads import load_trace, random_trace
from test_config_properties import compose_app

SWEEP = ["trace=random", "limit=8", "batch_size=2", "predictor=global_profile", "placement=contiguous",
         "system.link_gbps=64"]


def sweep_once(out: Path, *overrides: str) -> tuple[str, bool]:
    from moegps.sweep import compose_config, run_one

    return run_one(compose_config([*SWEEP, *overrides, f"out={out}"]))


def no_rows(out: Path) -> bool:
    return not list(Path(out).rglob("rows*.parquet")) and not list(Path(out).rglob("rows/*.parquet"))


def write_trace(path: Path, rng, n_requests: int = 6) -> RoutingTrace:
    trace = random_trace(rng, n_requests=n_requests, prompt_len=(4, 8), decode_steps=3, n_layers=2, n_experts=8)
    trace.write(path)
    return trace


# ---- 1. wrong settings that became results --------------------------------------------------------


@pytest.mark.parametrize("size", ["-4", "0"])
def test_finding1_guide_and_sweep_refuse_bad_batch_sizes(size, tmp_path):
    from moegps.simulator.guide import app

    with pytest.raises(ConfigError, match="'batch_size' is"):
        sweep_once(tmp_path / "sweep", f"batch_size={size}")
    with pytest.raises(ConfigError, match="'batch_sizes' is"):
        app(compose_app("guide", ["trace=random", "limit=8", f"batch_sizes=[{size}]", f"out={tmp_path / 'guide'}"]))
    assert no_rows(tmp_path)


def test_finding1_limit_zero_is_an_error_everywhere(tmp_path):
    """limit=0 read as "all" in predictors, guide and sweep, as "no prompts" in collect."""
    from moegps.collect import collect
    from moegps.predictors.evaluate import app as evaluate
    from moegps.simulator.guide import app as guide

    with pytest.raises(ConfigError, match="'limit' is 0"):
        sweep_once(tmp_path / "s", "limit=0")
    with pytest.raises(ConfigError, match="'limit' is 0"):
        guide(compose_app("guide", ["trace=random", "limit=0", f"out={tmp_path / 'g'}"]))
    with pytest.raises(ConfigError, match="'limit' is 0"):
        evaluate(compose_app("evaluate", ["trace=random", "limit=0", f"out={tmp_path / 'e'}"]))
    with pytest.raises(ConfigError, match="'limit' is 0"):
        collect(compose_app("collect", ["limit=0", f"out_dir={tmp_path / 'c'}"]))
    with pytest.raises(ValueError, match="'limit' is 0"):
        load_trace("random", limit=0)
    assert no_rows(tmp_path) and not list(tmp_path.rglob("shard-*"))


# ---- 2. +key ----------------------------------------------------------------------------------------


def test_finding2_plus_key_is_refused_with_the_field_it_meant(tmp_path):
    from moegps.collect import collect

    with pytest.raises(ConfigError, match=r"unknown config field 'batchsize' \(did you mean 'batch_size'\?\)"):
        collect(compose_app("collect", ["+batchsize=4", "limit=1", f"out_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="unknown config field 'batchsize'"):
        sweep_once(tmp_path / "s", "+batchsize=4")
    assert not list(tmp_path.rglob("shard-*")) and no_rows(tmp_path)


def test_finding2_train_tiny_refuses_plus_key():
    from moegps.configs import validate
    from moegps.models.train_tiny import TrainConfig

    with pytest.raises(ConfigError, match="unknown config field 'batchsize'"):
        validate({"batchsize": 4}, TrainConfig, "train_tiny")


# ---- 3. untyped configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("app,overrides,field", [
    ("evaluate", ["batch_requests=abc"], "batch_requests"),
    ("placement_app", ["system.gpus=[abc]"], "gpus"),
    ("placement_app", ["system.gpus=[-2]"], "gpus"),
    ("placement_app", ["system.gpus=[0]"], "gpus"),
    ("guide", ["link_gbps=[fast]"], "link_gbps"),
    ("guide", ["gpus=[]"], "gpus"),
])
def test_finding3_bad_types_and_sizes_name_the_field(app, overrides, field, tmp_path):
    import importlib

    module = {"evaluate": "moegps.predictors.evaluate", "placement_app": "moegps.placement.__main__",
              "guide": "moegps.simulator.guide"}[app]
    run = getattr(importlib.import_module(module), "main" if app == "placement_app" else "app")
    with pytest.raises((ConfigError, HydraException)) as err:
        run(compose_app(app, ["trace=random", "limit=8", *overrides, f"out={tmp_path}"]))
    assert field in str(err.value)
    assert no_rows(tmp_path) and not list(tmp_path.rglob("summary.csv"))


def test_finding3_predictor_field_of_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="predictor=ema: field 'decay' is 'abc', expected a number"):
        sweep_once(tmp_path, "predictor=ema", "predictor.decay=abc")
    assert no_rows(tmp_path)


def test_finding3_device_and_dtype_are_named(tmp_path):
    import torch

    from moegps.collect import collect

    with pytest.raises(ConfigError, match="'model.dtype' is 'float8'"):
        collect(compose_app("collect", ["model.dtype=float8", "limit=1", f"out_dir={tmp_path}"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'device' is 'cuda'"):
            collect(compose_app("collect", ["device=cuda", "limit=1", f"out_dir={tmp_path}"]))


# ---- 4. empty traces -------------------------------------------------------------------------------


def test_finding4_empty_trace_is_refused_by_every_consumer(tmp_path, rng, capsys):
    from moegps.placement.__main__ import main as placement
    from moegps.report import main as report

    trace = random_trace(rng, n_requests=3)
    empty = trace.select(np.zeros(len(trace), dtype=bool))
    path = tmp_path / "empty.parquet"
    empty.write(path)
    with pytest.raises(TraceError, match="holds no rows"):
        load_trace(str(path))
    with pytest.raises(SystemExit) as exit_:
        report(["routing", str(path), "--out", str(tmp_path / "report")])
    assert "holds no rows" in str(exit_.value.code)
    assert not (tmp_path / "report" / "routing_layers.csv").exists()
    with pytest.raises(TraceError, match="holds no rows"):
        placement(compose_app("placement_app", [f"trace={path}", f"out={tmp_path / 'p'}"]))
    assert not list(tmp_path.rglob("summary.csv"))
    with pytest.raises(TraceError, match="holds no rows"):
        sweep_once(tmp_path / "s", f"trace={path}")
    assert no_rows(tmp_path / "s")


# ---- 5. runs keyed by what produced them -----------------------------------------------------------


def test_finding5_sweep_reruns_when_the_trace_at_a_path_changes(tmp_path, rng):
    from moegps.results import read_results

    path = tmp_path / "t.parquet"
    write_trace(path, rng, 10)
    key_a, ran = sweep_once(tmp_path / "s", f"trace={path}")
    assert ran and sweep_once(tmp_path / "s", f"trace={path}") == (key_a, False)  # same bytes: skipped
    write_trace(path, rng, 10)  # other routing, same path
    key_b, ran = sweep_once(tmp_path / "s", f"trace={path}")
    assert ran and key_b != key_a
    rows = read_results(tmp_path / "s" / "runs")
    assert rows.groupby("config.key")["config.trace_content"].nunique().eq(1).all()
    assert rows["config.trace_content"].nunique() == 2  # each row says which bytes produced it


# ---- 6. truncated files ------------------------------------------------------------------------------


def test_finding6_truncated_rows_are_unfinished_and_named_on_read(tmp_path):
    from moegps.report import main as report
    from moegps.results import ResultsError, read_results
    from moegps.sweep import is_done

    key, _ = sweep_once(tmp_path)
    rows = tmp_path / "runs" / key / "rows.parquet"
    good = pd.read_parquet(rows)
    rows.write_bytes(rows.read_bytes()[: rows.stat().st_size // 2])
    assert not is_done(tmp_path, key)
    with pytest.raises(ResultsError, match=f"{rows}.*delete it and rerun"):
        read_results(tmp_path / "runs")
    with pytest.raises(SystemExit) as exit_:
        report(["results", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert str(rows) in str(exit_.value.code)
    assert sweep_once(tmp_path) == (key, True)  # rerun, not "finished before"
    again = pd.read_parquet(rows)
    pd.testing.assert_frame_equal(again.drop(columns=["run_id"]), good.drop(columns=["run_id"]))


@pytest.fixture(scope="module")
def small_collect(tmp_path_factory, shared):
    """A finished 4-request collect folder (2 shards) of the bundled model on local MMLU."""
    from moegps.collect import collect

    out = tmp_path_factory.mktemp("collect") / "run"
    collect(compose_app("collect", ["limit=4", "batch_size=2", "max_new_tokens=2", "max_prompt_tokens=12",
                                    "progress=false", "device=cpu", f"out_dir={out}"]))
    return out


COLLECT_SMALL = ["batch_size=2", "max_new_tokens=2", "max_prompt_tokens=12", "progress=false", "device=cpu"]


def test_finding6_truncated_collect_shard_is_named_with_the_fix(small_collect, tmp_path):
    import shutil

    from moegps.collect import CollectError, collect

    out = tmp_path / "run"
    shutil.copytree(small_collect, out)
    shard = sorted(out.glob("shard-*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CollectError, match=f"{shard.name}: not a readable parquet shard.*Delete it"):
        collect(compose_app("collect", ["limit=4", *COLLECT_SMALL, f"out_dir={out}"]))


# ---- 7. collect's manifest and lock ------------------------------------------------------------------


def test_finding7_manifest_counts_what_the_shards_hold(small_collect, tmp_path):
    import shutil

    from moegps.collect import collect

    out = tmp_path / "run"
    shutil.copytree(small_collect, out)
    collect(compose_app("collect", ["limit=2", *COLLECT_SMALL, f"out_dir={out}"]))  # a smaller limit
    manifest = json.loads((out / "manifest.json").read_text())
    held = len(RoutingTrace.read(out).requests())
    assert held == 4 and manifest["requests_done"] == held and manifest["complete"]
    assert manifest["requests_beyond_limit"] == 2
    assert manifest["shards"] == sorted(p.name for p in out.glob("shard-*.parquet"))


def test_finding7_one_collect_per_folder(small_collect):
    from moegps.collect import CollectError, FolderLock, collect

    with FolderLock(small_collect):  # another collect holds the folder
        with pytest.raises(CollectError, match="another collect .*pid .* is writing to this folder"):
            collect(compose_app("collect", ["limit=4", *COLLECT_SMALL, f"out_dir={small_collect}"]))


# ---- 8. portable paths ---------------------------------------------------------------------------------


def test_finding8_metadata_and_manifest_carry_no_absolute_data_path(small_collect):
    trace = RoutingTrace.read(small_collect)
    stored = json.dumps(trace.meta.__dict__, default=str) + (small_collect / "manifest.json").read_text()
    assert str(data_root()) not in stored and str(PROJECT_ROOT) not in stored
    assert trace.meta.dataset == "mmlu: $MOEGPS_DATA/mmlu/test"
    assert trace.meta.model_config["source"] == "moegps/models/bundled/mixtral-tiny"


def test_finding8_a_folder_from_before_portable_paths_still_resumes(small_collect, tmp_path):
    import shutil

    from moegps.collect import collect

    out = tmp_path / "run"
    shutil.copytree(small_collect, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"]["dataset"]["path"] = str(data_root() / "mmlu" / "test")  # the old, absolute form
    (out / "manifest.json").write_text(json.dumps(manifest))
    collect(compose_app("collect", ["limit=4", *COLLECT_SMALL, f"out_dir={out}"]))  # no "other settings" refusal
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["dataset"]["path"] == "$MOEGPS_DATA/mmlu/test"


# ---- 9. interrupts -----------------------------------------------------------------------------------------


def test_finding9_ctrl_c_in_collect_ends_cleanly_and_the_rerun_resumes(small_collect, tmp_path, capsys):
    from moegps.collect import collect

    def ctrl_c(path, n_written):
        raise KeyboardInterrupt

    cfg = compose_app("collect", ["limit=4", *COLLECT_SMALL, f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        run_command(lambda: collect(cfg, on_shard=ctrl_c), "collect")
    assert exit_.value.code == 130
    assert f"collect: {INTERRUPTED}" in capsys.readouterr().err
    assert len(list((tmp_path / "run").glob("shard-*.parquet"))) == 1  # the first batch, whole
    assert not list((tmp_path / "run").glob(".*.tmp"))
    collect(cfg)  # the same command again finishes the rest
    resumed, whole = RoutingTrace.read(tmp_path / "run"), RoutingTrace.read(small_collect)
    assert len(resumed) == len(whole) and np.array_equal(resumed.experts, whole.experts)


def test_finding9_ctrl_c_in_the_sweep_command_exits_130(tmp_path, capsys, monkeypatch):
    import moegps.sweep as sweep

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_one", interrupted)
    monkeypatch.setattr(sys, "argv", ["moegps.sweep", *SWEEP, f"out={tmp_path}", "hydra.run.dir=" + str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        sweep.main()
    assert exit_.value.code == 130 and f"sweep: {INTERRUPTED}" in capsys.readouterr().err


def test_finding1_a_multirun_with_one_bad_value_stops_before_any_run(tmp_path, capsys, monkeypatch):
    """Every swept value is checked first: no good point runs (and writes rows) before a bad one fails."""
    import moegps.sweep as sweep

    base = [o for o in SWEEP if not o.startswith("batch_size")]
    monkeypatch.setattr(sys, "argv", ["moegps.sweep", "-m", *base, "batch_size=4,-4", f"out={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        sweep.main()
    assert "config field 'batch_size' is -4" in str(exit_.value.code)
    assert not tmp_path.exists() or no_rows(tmp_path)


def test_finding9_sweep_workers_end_when_the_sweep_process_is_gone():
    """A launcher worker watches the sweep's process (kill -9 of the sweep left them idle for good)."""
    parent = subprocess.Popen(["sleep", "60"])
    code = "import time; from moegps.sweep import _end_with_parent; _end_with_parent(); time.sleep(60)"
    env = {**os.environ, "MOEGPS_SWEEP_PID": str(parent.pid)}
    worker = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        time.sleep(3)  # imports done, watching
        assert worker.poll() is None  # alive while the sweep is
        parent.kill()
        parent.wait()
        worker.wait(timeout=10)
    finally:
        parent.kill()
        worker.kill()
    assert worker.returncode == 1


# ---- 10. the unpickler's work -------------------------------------------------------------------------------


def test_finding10_repeated_references_do_not_stall_the_unpickler():
    from moegps import safe_pickle

    nested: list = []
    for _ in range(8):
        nested = [nested] * 14  # 14^8 = 1.5e9 paths through 9 lists
    data = pickle.dumps(nested, protocol=2)
    assert len(data) < 300

    def too_slow(*_):
        raise TimeoutError("the restricted unpickler walked every path (1a7afce: over a minute)")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(5)
    try:
        t0 = time.perf_counter()
        loaded = safe_pickle.loads(data)
        assert time.perf_counter() - t0 < 1.0
        for _ in range(8):  # the same shape (compared by reference: == would walk every path)
            assert len(loaded) == 14 and all(x is loaded[0] for x in loaded)
            loaded = loaded[0]
        assert loaded == []
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_finding10_a_bounded_walk_still_refuses_bad_types():
    from moegps import safe_pickle

    shared = [1, 2, {"a": 3}]
    with pytest.raises(safe_pickle.UnsafePickleError, match="float"):
        safe_pickle.loads(pickle.dumps([shared, shared, [shared, 1.5]]))


# ---- 11. plots ----------------------------------------------------------------------------------------------


def test_finding11_cross_layer_panels_share_one_scale_and_say_where_they_clip(rng):
    from moegps.report import cross_layer_log_lift, shared_lift_scale

    weak = rng.integers(50, 60, size=(8, 8)).astype(float)  # nearly independent: |lift| small
    strong = np.eye(8) * 1000 + rng.integers(1, 3, size=(8, 8))  # strong affinity: large lift
    strong[0, 1] = 0  # a pair never seen together
    lifts = [cross_layer_log_lift(weak), cross_layer_log_lift(strong)]
    assert np.isnan(lifts[1][0, 1]) and np.isfinite(lifts[0]).all()
    lim, clipped = shared_lift_scale(lifts)
    assert lim == 3.0 and clipped  # the strong panel's diagonal lies beyond the cap: said, one scale for both
    assert shared_lift_scale(lifts[:1]) == (max(0.5, float(np.abs(lifts[0]).max())), False)


def decision_rows(gains: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"trace": "t", "system": "s", "gpus": 8, "link_gbps": [450, 64, 450, 64][:len(gains)],
                         "batch_size": [4, 4, 32, 32][:len(gains)], "baseline_ms": 10.0,
                         "best_distribution": "global_profile+contiguous", "distribution_ms": 10.0,
                         "best_token": "token_table+balanced", "token_ms": [10 * (1 + g) for g in gains],
                         "gain_dist_over_token": gains, "winner_family": "distribution",
                         "speedup_vs_baseline": 1.0})


def test_finding11_decision_cells_that_share_a_winner_still_differ(tmp_path):
    """The default sweep's plot showed identical cells ("distribution wins, static, 1.000x"): the cell
    colour now follows the gain, and the text names each family's best with its speedup."""
    import matplotlib.colors
    import matplotlib.pyplot as plt

    from moegps import report

    captured = {}
    real_save = report._save

    def keep(fig, path):
        captured["fig"] = fig
        return real_save(fig, path)

    report._save = keep
    try:
        report.plot_decisions(decision_rows([0.02, 0.10, 0.25, 0.40]), tmp_path / "decision")
    finally:
        report._save = real_save
    ax = captured["fig"].axes[0]
    colours = {matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches}
    texts = [t.get_text() for t in ax.texts]
    assert len(colours) == 4  # four gains, four colours
    assert all("T: token_table\n+balanced" in t and "D: global_profile\n+contiguous 1.000x" in t for t in texts)
    assert (tmp_path / "decision.png").stat().st_size > 0
    plt.close("all")


def test_finding11_placement_bars_have_a_colour_per_algorithm_and_a_visible_true_loads_mark(tmp_path):
    import matplotlib.colors

    from moegps import report

    table = pd.DataFrame({"batch_size": 4, "placement": ["contiguous", "balanced", "round_robin"],
                          "extra_slots": 0.0, "imbalance": [2.0, 1.2, 1.5], "true_loads_imbalance": [2.0, 1.1, 1.5]})
    captured = {}
    real_save = report._save
    report._save = lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path)
    try:
        report.plot_placement(table, tmp_path / "placement")
    finally:
        report._save = real_save
    ax = captured["fig"].axes[0]
    assert len({matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches}) == 3
    marks = [line for line in ax.lines if line.get_marker() == "D"]
    assert len(marks) == 3 and all(m.get_zorder() > max(p.get_zorder() for p in ax.patches) for m in marks)


def test_finding11_coinciding_lines_share_one_entry_instead_of_hiding_each_other(tmp_path):
    """ema's curve lay exactly under global_profile's: one line now, labelled with both."""
    import matplotlib.pyplot as plt

    from moegps import report

    links = [32.0, 64.0, 450.0]
    rows = [{"config.role": "run", "backend": "sim", report.FAMILY: fam, report.PREDICTOR: pred, report.LINK: link,
             report.BATCH: 4, "speedup": value(link)}
            for fam, pred, value in (("distribution", "ema", lambda link: 1.0),
                                     ("distribution", "global_profile", lambda link: 1.0),
                                     ("token", "token_table", lambda link: 0.9 + link / 5000))
            for link in links]
    captured = {}
    real_save = report._save
    report._save = lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path)
    try:
        report.plot_end_to_end(pd.DataFrame(rows), tmp_path / "e2e")
    finally:
        report._save = real_save
    labels = [t.get_text() for t in captured["fig"].axes[0].get_legend().get_texts()]
    assert labels == ["ema = global_profile (distribution)", "token_table (token)"]
    plt.close("all")


# ---- 12. names and units ------------------------------------------------------------------------------------


def test_finding12_true_loads_placement_is_named_for_what_it_is(tmp_path):
    """The sweep's 'oracle' rows place each step from its true loads with the run's algorithm: no
    predictor and no migration cost, yet not a bound on time (it was slower than the baseline in
    every row of the default sweep); the report's column says so instead of 'oracle_placement_ms'."""
    from moegps.report import decision_table, load_results

    sweep_once(tmp_path, "placement=balanced", "system.extra_slots_per_gpu=1")
    table = decision_table(load_results(tmp_path))
    assert "oracle_placement_ms" not in table and "true_loads_placement_ms" in table
    rows = load_results(tmp_path)
    assert table.true_loads_placement_ms.item() == rows[rows["config.role"] == "oracle"]["total_ms"].item()


def test_finding12_guide_prints_the_gain_in_percent():
    from moegps.simulator.guide import printed_table

    shown = printed_table(pd.DataFrame({"trace": ["t"], "gain_dist_over_token": [0.234]}))
    assert "gain_dist_over_token" not in shown and shown["gain_pct"].item() == pytest.approx(23.4)


def test_finding12_sweep_prints_progress_and_eta(monkeypatch):
    from moegps import sweep

    def count(overrides):
        return sweep.count_runs(sweep.sweep_axes(overrides)[1])

    assert count(["sweep=default"]) == 72
    assert count(["sweep=smoke", "batch_size=4,8,16"]) == 24
    assert count(["predictor=ema"]) == 24  # a plain value replaces the preset's swept list
    monkeypatch.setenv(sweep.TOTAL_ENV, "72")
    monkeypatch.setenv(sweep.START_ENV, str(time.time() - 30))
    note = sweep.progress_note(16)
    assert note.startswith(" [17/72, 30 s, eta ") and note.endswith(" s]")
    assert 95 <= float(note.split("eta ")[1].split(" s")[0]) <= 100  # 30 s / 17 runs x 55 left


# ---- 13. docs -------------------------------------------------------------------------------------------


def test_finding13_the_docs_notebook_command_is_installed_by_the_dev_extra():
    import re
    import tomllib
    from importlib.metadata import distribution

    dev = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    dev_names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in dev}
    commands = set()
    for name in dev_names:
        try:
            commands |= {e.name for e in distribution(name).entry_points if e.group == "console_scripts"}
        except Exception:  # noqa: BLE001 - an optional dev package not installed here
            continue
    docs = "\n".join(p.read_text() for p in [*(PROJECT_ROOT / "docs").glob("*.md"), PROJECT_ROOT / "README.md"])
    for sub in set(re.findall(r"`jupyter ([a-z]+)", docs)):
        assert f"jupyter-{sub}" in commands, f"docs say 'jupyter {sub}', which the dev extra does not install"
    assert "nbconvert" not in docs or "nbconvert" in dev_names
