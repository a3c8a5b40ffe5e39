"""Sweeps: a small multirun through each local launcher, rows checked against direct simulator calls,
resume after an interruption, the run key, and the cluster launchers' configs resolving."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from moegps.paths import PROJECT_ROOT
from moegps.results import read_results
from moegps.sweep import compose_config, run_key

SMALL = ["trace=random", "limit=16", "batch_size=4", "shape=null"]


def _sweep(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moegps.sweep", "-m", *SMALL, f"out={out}", *overrides],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_run_key_hashes_what_a_run_computes(rng):
    a = {"trace": "random", "batch_size": int(rng.integers(1, 64)), "predictor": {"_target_": "x", "decay": 0.5},
         "out": "/a", "name": "one"}
    b = dict(reversed(list(a.items())))  # same config, other key order, other folder and sweep name
    b.update(out="/b", name="two")
    assert run_key(a) == run_key(b)
    assert run_key(a) != run_key({**a, "batch_size": a["batch_size"] + 1})
    assert run_key(a) != run_key({**a, "predictor": {"_target_": "x", "decay": 0.6}})


def test_multirun_rows_match_direct_simulation_and_resume(tmp_path):
    from moegps.workloads import load_trace, split_by_request, trace_shape
    from moegps.simulator.replay import (PlaceFn, ReplayConfig, distribution_plan, make_batches, simulate,
                                         static_plan, token_plan)
    from moegps.simulator.system import load_system
    from moegps.predictors import make

    out = tmp_path / "sweep"
    proc = _sweep(out, "predictor=global_profile,token_table", "placement=contiguous,balanced",
                  "system.link_gbps=450,32")  # the default launcher: joblib, 2 workers
    assert proc.stdout.count(": ran in") == 8
    table = read_results(out / "runs")
    assert len(table) == 8 * 3 and set(table["config.role"]) == {"run", "baseline", "oracle"}
    runs = table[table["config.role"] == "run"]
    assert len(runs.groupby(["config.predictor.name", "config.placement.name", "config.system.link_gbps"])) == 8

    # every run folder: config.yaml whose hash is the folder's name, rows keyed the same
    for folder in (out / "runs").iterdir():
        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
        assert run_key(config) == folder.name
        assert set(read_results(folder / "rows.parquet")["config.key"]) == {folder.name}

    # the rows are what the simulator gives when called directly (independent of the sweep's caching)
    trace = load_trace("random", limit=16, seed=0)
    train, test = split_by_request(trace, 0.5)  # arrival order: the last 8 requests replayed
    shape = trace_shape(trace.meta)
    for link in (450.0, 32.0):
        system = load_system("h100_8gpu").replace(link_bandwidth=link * 1e9)
        rcfg = ReplayConfig(batch_size=4)
        batches = make_batches(test, system.n_gpus, trace.meta.n_experts, rcfg)
        # the fields of moegps/conf/placement/<name>.yaml reach the placement (balanced: refine, restarts)
        for placement, fields in (("contiguous", {}), ("balanced", {"refine": True, "restarts": 0})):
            place = PlaceFn(placement, system, trace.meta.n_experts, shape=shape, **fields)
            for name in ("global_profile", "token_table"):
                p = make(name).fit(train)
                plan = (token_plan if hasattr(p, "predict") else distribution_plan)(batches, p, place, system, 1, name)
                want = simulate(batches, plan, shape, system, rcfg).total * 1e3
                got = runs[(runs["config.predictor.name"] == name) & (runs["config.placement.name"] == placement)
                           & (runs["config.system.link_gbps"] == link)]["total_ms"]
                assert got.to_numpy() == pytest.approx([want], rel=1e-9)
        base = table[(table["config.role"] == "baseline") & (table["config.system.link_gbps"] == link)]["total_ms"]
        assert np.allclose(base, simulate(batches, static_plan(batches), shape, system, rcfg).total * 1e3, rtol=1e-9)

    # interrupt: one run lost its rows (killed before the final rename, a temp file left behind)
    lost = sorted((out / "runs").iterdir())[3]
    (lost / "rows.parquet").rename(lost / ".rows.parquet.tmp-killed")
    before = {f: f.stat().st_mtime_ns for f in (out / "runs").glob("*/rows.parquet")}
    proc = _sweep(out, "predictor=global_profile,token_table", "placement=contiguous,balanced",
                  "system.link_gbps=450,32", "hydra/launcher=basic")
    assert proc.stdout.count(": ran in") == 1 and proc.stdout.count("finished before, skipped") == 7
    assert lost.name in [line.split()[2] for line in proc.stdout.splitlines() if ": ran in" in line]
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    again = read_results(out / "runs")
    assert len(again) == len(table)
    row = lambda t: t[(t["config.key"] == lost.name)].sort_values("config.role")["total_ms"].to_numpy()  # noqa: E731
    assert row(again) == pytest.approx(row(table), rel=1e-12)


def test_submitit_local_launcher_runs_the_cluster_path(tmp_path):
    out = tmp_path / "sweep"
    _sweep(out, "predictor=ema", "placement=contiguous", "system.link_gbps=450,64", "hydra/launcher=local_submitit")
    table = read_results(out / "runs")
    runs = table[table["config.role"] == "run"]
    assert sorted(runs["config.system.link_gbps"]) == [64.0, 450.0]
    assert (out / ".submitit").is_dir()  # the jobs went through submitit
    # less bandwidth is never faster in the simulator
    t = runs.set_index("config.system.link_gbps")["total_ms"]
    assert t[64.0] >= t[450.0]


@pytest.mark.parametrize("launcher", ["local", "slurm", "local_submitit"])
def test_launcher_configs_resolve(launcher):
    from hydra import compose, initialize_config_dir

    from moegps.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert {"local": "JoblibLauncher", "slurm": "SlurmLauncher", "local_submitit": "LocalLauncher"}[launcher] in target
    if launcher == "slurm":
        assert cfg.hydra.launcher.array_parallelism == 64


def test_default_sweep_is_the_promised_product():
    from hydra import compose, initialize_config_dir

    from moegps.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sweep", return_hydra_config=True)
    assert (PROJECT_ROOT / cfg.trace).exists()  # a shipped trace
    params = cfg.hydra.sweeper.params
    sizes = [len(str(params[k]).split(",")) for k in ("predictor", "placement", "system.link_gbps", "batch_size")]
    assert sizes[0] >= 3 and sizes[1] >= 3 and sizes[2] >= 4 and sizes[3] >= 2


def test_bad_backend_and_placement_are_named(tmp_path):
    from moegps.sweep import run_one

    with pytest.raises(ValueError, match="backend"):
        run_one(compose_config([*SMALL, f"out={tmp_path}", "backend=gpu"]))
    with pytest.raises(ValueError, match="placement=optimal"):
        run_one(compose_config([*SMALL, f"out={tmp_path}", "placement=optimal"]))
    with pytest.raises(FileNotFoundError, match="trace"):
        run_one(compose_config([f"out={tmp_path}", "trace=no/such/trace.parquet"]))
