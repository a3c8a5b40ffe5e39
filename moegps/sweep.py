"""Sweeps: one hydra multirun over any product of configs, one results store.

``python -m moegps.sweep -m [sweep=<preset>] [predictor=a,b] [placement=x,y] [system.link_gbps=450,64]
[batch_size=4,32] [trace=...] [backend=sim|exec] [hydra/launcher=joblib|submitit_local|submitit_slurm|ray]``
(conf/sweep.yaml; presets in conf/sweep/; docs/sweeps.md).

A *run* is one point of the product: (trace, predictor, placement, system with its link bandwidth,
batch size, backend). It is keyed by the hash of its resolved config (:func:`run_key`), and writes to
``<out>/runs/<key>/``:

- ``config.yaml``: the run's resolved config (what the key hashes), written first;
- ``rows.parquet``: its results rows (``moegps.results``), written atomically last, so its presence
  means the run finished. A restarted sweep skips every run whose ``rows.parquet`` exists.

The shard holds the run's own row (``config.role = "run"``) and, for the simulator backend, the rows
of the two references it is compared with on the same batches: the static baseline (contiguous
placement, no predictor; ``role = "baseline"``) and the oracle placement (each step placed from its
true loads, no predictor cost; ``role = "oracle"``). Speedups are computed at read time
(:func:`moegps.report.results_report`) against the baseline row, never stored.
``moegps.results.read_results(<out>/runs)`` reads the whole store as one pandas table.

Backends: ``sim`` replays the test split of the trace in ``moegps.simulator``; ``exec`` times the
live executor (``moegps.executor.runner.run``) in this process (one GPU, or the CPU), with its own
batches (``exec.*``); a multi-GPU executor run is launched with torchrun, not from a sweep.
Each worker process keeps the traces it loaded and the predictors it fitted, so a launcher that
reuses workers (joblib) loads and fits once per worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .paths import PROJECT_ROOT, register_resolvers
from .results import write_rows

# config keys that say where and how a sweep runs, not what a run computes: never hashed
NOT_HASHED = ("out", "name", "force", "show")

# conf/placement choice -> the simulator's placement function (moegps.simulator.replay.PlaceFn)
SIM_PLACEMENTS = {"contiguous": "static", "static": "static", "round_robin": "round_robin",
                  "balanced": "balanced", "hierarchical": "hierarchical", "auto": "auto"}


def run_key(config: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the run's config (keys sorted, without :data:`NOT_HASHED`)."""
    body = {k: v for k, v in config.items() if k not in NOT_HASHED}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_dir(out: str | Path, key: str) -> Path:
    return Path(out) / "runs" / key


def is_done(out: str | Path, key: str) -> bool:
    return (run_dir(out, key) / "rows.parquet").is_file()


def resolve_trace_path(spec: str) -> str:
    """``deepseek`` | ``synthetic`` | ``random`` | a path (relative paths: from the project root if not from here)."""
    if spec in ("deepseek", "synthetic", "random"):
        return spec
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"sweep config field 'trace': {spec!r} is not deepseek | synthetic | random "
                                "or an existing RoutingTrace parquet file/folder or DeepSeek CSV folder")
    return str(path.resolve())


# ---- per-process caches: a worker loads each trace and fits each predictor once ------------------


@lru_cache(maxsize=4)
def load_split(trace: str, limit: int | None, seed: int, test_fraction: float):
    """(trace, train, test) of a trace spec, split by whole requests (``moegps.predictors.evaluate``)."""
    from .predictors.evaluate import split_by_request
    from .simulator.guide import GuideConfig, load_workload

    full = load_workload(GuideConfig(trace=resolve_trace_path(trace), limit=limit, seed=seed), 1.0)
    train, test = split_by_request(full, test_fraction, seed)
    return full, train, test


@lru_cache(maxsize=32)
def fitted_predictor(predictor_json: str, trace: str, limit: int | None, seed: int, test_fraction: float):
    """A predictor from its conf/predictor config (``_target_`` + arguments), fitted on the train split."""
    from hydra.utils import instantiate

    _, train, _ = load_split(trace, limit, seed, test_fraction)
    return instantiate(json.loads(predictor_json)).fit(train)


# ---- one run --------------------------------------------------------------------------------------


def system_summary(system) -> dict[str, Any]:
    """The profile's numbers in the units people sweep (GB/s, TFLOP/s); the full yaml goes in config.yaml."""
    return {"name": system.name, "n_gpus": system.n_gpus, "gpus_per_node": system.gpus_per_node,
            "topology": system.topology, "link_gbps": system.link_bandwidth / 1e9,
            "inter_node_gbps": system.inter_node_bandwidth / 1e9, "hbm_gbps": system.hbm_bandwidth / 1e9,
            "matmul_tflops": system.matmul_flops / 1e12, "extra_slots": system.extra_slots_per_gpu}


def _row_config(config: dict[str, Any], key: str, role: str, system=None) -> dict[str, Any]:
    """The config columns of a row: choices by name, the swept numbers flat, the key."""
    predictor = dict(config["predictor"])
    out = {"key": key, "role": role, "sweep": config.get("name", ""), "trace": config["trace"],
           "limit": config.get("limit"), "seed": config["seed"], "batch_size": config["batch_size"],
           "backend": config["backend"], "predictor": {"name": config["predictor_name"], **predictor},
           "placement": {"name": config["placement_name"], **dict(config["placement"])},
           "interval": config["interval"]}
    out["predictor"].pop("_target_", None)
    out["placement"].pop("_target_", None)
    out["placement"]["name"] = config["placement_name"]
    if system is not None:
        out["system"] = system_summary(system)
    if config["backend"] == "sim":
        out["replay"] = dict(config["replay"])
    return out


def simulate_run(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The simulator backend: rows for the run's plan, the static baseline and the oracle placement."""
    from .simulator.guide import resolve_system, shape_for
    from .simulator.replay import (PlaceFn, ReplayConfig, distribution_plan, make_batches, oracle_plan, simulate,
                                   static_plan, token_plan)

    if config["placement_name"] not in SIM_PLACEMENTS:
        raise ValueError(f"placement={config['placement_name']}: the simulator backend sweeps "
                         f"{sorted(SIM_PLACEMENTS)} (re-placed from the predictor's forecasts); "
                         "fixed placements (prefill_aware, optimal) are studied by the simulator guide")
    split = (config["trace"], config.get("limit"), config["seed"], config["test_fraction"])
    full, _, test = load_split(*split)
    predictor = fitted_predictor(json.dumps(config["predictor"], sort_keys=True), *split)
    shape = shape_for(full.meta, config.get("shape"))
    system = resolve_system(dict(config["system"]))
    rcfg = ReplayConfig(batch_size=int(config["batch_size"]), **config["replay"])
    batches = make_batches(test, system.n_gpus, full.meta.n_experts, rcfg)
    place = PlaceFn(SIM_PLACEMENTS[config["placement_name"]], system, full.meta.n_experts, shape=shape)
    make_plan = token_plan if hasattr(predictor, "predict") else distribution_plan
    plans = {"run": make_plan(batches, predictor, place, system, int(config["interval"]), config["predictor_name"]),
             "baseline": static_plan(batches), "oracle": oracle_plan(batches, place)}
    pcost = predictor.cost()
    work = plans["run"].predictor_s
    cost_columns = {**pcost.as_row(), "work_ms": float(work.sum() * 1e3) if work is not None else 0.0}
    rows = []
    for role, plan in plans.items():
        result = simulate(batches, plan, shape, system, rcfg)
        extra = {"model_shape": shape.name}
        if role == "run":  # the predictor's whole work, hidden or not (predictor_ms is only its exposed part)
            extra["predictor_cost"] = cost_columns
        rows.append(result.row({**_row_config(config, key, role, system), **extra}, system))
    return rows


def execute_run(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The executor backend: one live run in this process; its row keeps the executor's own config
    under ``config.exec.*`` and the sweep's config beside it."""
    import torch
    from hydra.utils import instantiate

    from .executor.runner import ExecuteConfig, run
    from .trace import RoutingTrace

    trace = resolve_trace_path(config["trace"])
    if trace in ("deepseek", "synthetic", "random"):
        full, _, _ = load_split(config["trace"], config.get("limit"), config["seed"], config["test_fraction"])
        path = Path(config["out"]) / "cache" / f"trace-{run_key({'t': config['trace'], 'l': config.get('limit')})}"
        if not path.exists():
            full.write(path)
        trace = str(path)
    meta = RoutingTrace.read(trace).meta
    ex = dict(config["exec"])
    shape = ex.pop("shape")
    if shape == "auto":  # the real model's expert shape on a GPU; a tiny one with the trace's experts on a CPU
        shape = ("mixtral" if meta.n_experts == 8 else "e64") if torch.cuda.is_available() else "tiny"
    predictor_name = config["predictor_name"]
    predictor = None if predictor_name in ("none", "oracle", "previous") else instantiate(config["predictor"])
    if predictor is not None and hasattr(predictor, "predict"):
        raise ValueError(f"predictor={predictor_name}: the executor backend takes distribution predictors only")
    placement = {"contiguous": "static"}.get(config["placement_name"], config["placement_name"])
    ecfg = ExecuteConfig(shape=shape, n_experts=meta.n_experts, top_k=meta.top_k, trace=trace,
                         batch_requests=int(config["batch_size"]), placement=placement, predictor=predictor_name,
                         seed=int(config["seed"]), out=str(run_dir(config["out"], key)), **ex)
    row, _ = run(ecfg, write=False, predictor=predictor)
    renamed = {("config.exec." + k[len("config."):] if k.startswith("config.") else k): v for k, v in row.items()}
    from .results import flatten

    renamed.update(flatten(_row_config(config, key, "run")))
    return [renamed]


def run_one(config: dict[str, Any]) -> tuple[str, bool]:
    """Run one point of a sweep unless it has finished before; returns (key, ran)."""
    from .files import atomic_path

    key = run_key(config)
    out = Path(config["out"])
    if is_done(out, key) and not config.get("force"):
        return key, False
    folder = run_dir(out, key)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "config.yaml") as tmp:
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create({k: v for k, v in config.items() if k not in ("show",)}), tmp)
    backend = config["backend"]
    if backend == "sim":
        rows = simulate_run(config, key)
    elif backend == "exec":
        rows = execute_run(config, key)
    else:
        raise ValueError(f"sweep config field 'backend' is {backend!r}, expected 'sim' or 'exec'")
    write_rows(rows, folder / "rows.parquet")
    return key, True


def resolved_config(raw, choices: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hydra config as a plain dict, with the chosen group options named (predictor, placement, system)."""
    from omegaconf import OmegaConf

    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    config = OmegaConf.to_container(raw, resolve=True)
    config["predictor_name"] = choices.get("predictor")
    config["placement_name"] = config["placement"].get("name") or choices.get("placement")
    config["system"].setdefault("name", choices.get("system", "custom"))
    return config


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """One run's config from conf/sweep.yaml and ``overrides`` (e.g. ``["predictor=ema", "out=/tmp/s"]``),
    without launching: for notebooks and tests, with :func:`run_one`."""
    from hydra import compose, initialize_config_dir

    from .paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sweep", overrides=list(overrides), return_hydra_config=True)
    from omegaconf import open_dict

    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return resolved_config(cfg, choices)


register_resolvers()  # at import: launcher workers unpickle configs that use it


def _app(raw) -> None:
    config = resolved_config(raw)
    t0 = time.perf_counter()
    key, ran = run_one(config)
    what = f"ran in {time.perf_counter() - t0:.1f} s" if ran else "finished before, skipped"
    print(f"[sweep {config.get('name')}] {key} {config['backend']} trace={Path(str(config['trace'])).name} "
          f"predictor={config['predictor_name']} placement={config['placement_name']} "
          f"system={config['system'].get('name')} link_gbps={_plain(config['system'].get('link_gbps'))} "
          f"batch_size={config['batch_size']}: {what}", flush=True)


def _plain(value):
    return value.get("value") if isinstance(value, dict) else value


def main() -> None:
    import hydra

    np.seterr(all="ignore")
    from .paths import CONF_DIR

    # an absolute config path: the task function lives in moegps.sweep, so that workers can unpickle it
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sweep")(_app)()


if __name__ == "__main__":
    # run the imported module, not __main__: launcher workers unpickle the task as moegps.sweep._app
    from moegps.sweep import main as _main

    _main()
