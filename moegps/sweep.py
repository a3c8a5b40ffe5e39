"""Sweeps: one hydra multirun over any product of configs, one results store.

``python -m moegps.sweep -m [sweep=<preset>] [predictor=a,b] [placement=x,y] [system.link_gbps=450,64]
[batch_size=4,32] [trace=...] [backend=sim|exec] [hydra/launcher=joblib|submitit_local|submitit_slurm|ray]``
(moegps/conf/sweep.yaml; presets in moegps/conf/sweep/; docs/sweeps.md).

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
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .configs import ConfigError, all_or_first_n, check_arguments, run_command, checked, fraction, nonnegative, one_of, positive, register, validate
from .executor.runner import ExecuteConfig, run
from .files import atomic_path
from .paths import CONF_DIR, PROJECT_ROOT, register_resolvers
from .results import flatten, shard_problem, write_rows
from .simulator.pipeline import fit_predictors, load_workload, placement_choice, predictor_plans, result_rows
from .simulator.replay import PlaceFn, ReplayConfig, ReplayOptions, make_batches, oracle_plan, simulate, static_plan
from .simulator.system import resolve_system
from .workloads import NAMED_TRACES, fingerprint

# config keys that say where and how a sweep runs, not what a run computes: never hashed
NOT_HASHED = ("out", "name", "force", "show")

# the executor's live model shapes on a GPU (the real model's experts) by the trace's expert count
EXEC_SHAPES = {8: "mixtral-8x7b", 64: "deepseek-v2-lite"}


@dataclass
class SweepConfig:
    """One point of a sweep (moegps/conf/sweep.yaml); the groups (predictor, placement, system) are
    checked by the code they configure, every other field here."""

    name: str = "default"
    trace: str = "deepseek"
    train: str | None = None
    test: str | None = None
    limit: int | None = checked(60, all_or_first_n)
    test_fraction: float = checked(0.5, fraction)
    split: str = checked("arrival", one_of("arrival", "random"))
    seed: int = checked(0, nonnegative)
    batch_size: int = checked(16, positive)
    backend: str = checked("sim", one_of("sim", "exec"))
    interval: int = checked(1, positive)
    shape: str | None = None
    replay: ReplayOptions = field(default_factory=ReplayOptions)
    exec: dict[str, Any] = field(default_factory=dict)  # ExecuteConfig fields, checked there (backend=exec)
    force: bool = False
    out: str = "outputs/sweep/default"
    predictor: Any = None  # moegps/conf/predictor/<name>.yaml
    placement: Any = None  # moegps/conf/placement/<name>.yaml
    system: Any = None  # moegps/conf/system/<name>.yaml


register("sweep_schema", SweepConfig)

# keys resolved_config adds beside the schema's: the chosen group options' names
CHOICE_KEYS = ("predictor_name", "placement_name")


def check_config(config: dict[str, Any]) -> None:
    """:class:`moegps.configs.ConfigError` naming the field for anything the schema refuses, or the
    predictor option's constructor (a field it lacks, a value of the wrong type)."""
    validate({k: v for k, v in config.items() if k not in CHOICE_KEYS}, SweepConfig, "sweep")
    predictor = config.get("predictor")
    if isinstance(predictor, dict) and "_target_" in predictor:
        from hydra.utils import get_class

        check_arguments(get_class(predictor["_target_"]), predictor, f"predictor={config.get('predictor_name')}")


def trace_content(config: dict[str, Any]) -> dict[str, str]:
    """Content fingerprints of the traces a run reads (``train`` and ``test``, else ``trace``): the
    same path holding other bytes is another run (:func:`moegps.workloads.fingerprint`)."""
    parts = ("train", "test") if config.get("train") is not None else ("trace",)
    return {part: fingerprint(resolve_trace_path(config[part])) for part in parts if config.get(part) is not None}


def run_key(config: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the run's config (keys sorted, without :data:`NOT_HASHED`)
    and of the content of its traces (:func:`trace_content`)."""
    body = {k: v for k, v in config.items() if k not in NOT_HASHED}
    body["trace_content"] = trace_content(config)
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_dir(out: str | Path, key: str) -> Path:
    return Path(out) / "runs" / key


def is_done(out: str | Path, key: str) -> bool:
    """Whether the run's ``rows.parquet`` holds its finished rows (readable, with every results field,
    all of this key); a truncated or foreign file is unfinished and the run is done again."""
    path = run_dir(out, key) / "rows.parquet"
    return path.is_file() and shard_problem(path, key) is None


def resolve_trace_path(spec: str | None) -> str | None:
    """``deepseek`` | ``synthetic`` | ``random`` | a path (relative paths: from the project root if not from here)."""
    if spec is None or spec in NAMED_TRACES:
        return spec
    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"sweep config field 'trace': {spec!r} is not deepseek | synthetic | random "
                                "or an existing RoutingTrace parquet file/folder or DeepSeek CSV folder")
    return str(path.resolve())


# ---- per-process caches: a worker loads each trace and fits each predictor once ------------------


def workload_key(config: dict[str, Any]) -> tuple:
    """The fields that choose a run's train and test requests and its model shape."""
    return tuple(config.get(k) for k in ("trace", "train", "test", "limit", "seed", "test_fraction", "split", "shape"))


@lru_cache(maxsize=4)
def cached_workload(trace, train, test, limit, seed, test_fraction, split, shape):
    """The run's :class:`moegps.simulator.pipeline.Workload` (train and test requests, model shape)."""
    return load_workload(trace=resolve_trace_path(trace), train=resolve_trace_path(train),
                         test=resolve_trace_path(test), test_fraction=test_fraction, split=split or "arrival",
                         seed=seed, limit=limit, shape=shape)


@lru_cache(maxsize=32)
def fitted_predictor(predictor_json: str, name: str, key: tuple):
    """A predictor from its moegps/conf/predictor config (``_target_`` + arguments), fitted on the
    workload's training requests."""
    work = cached_workload(*key)
    return fit_predictors(work.data, {name: json.loads(predictor_json)}, skip_failures=False)[name]


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
           "trace_content": ",".join(f"{k}:{v}" for k, v in trace_content(config).items()),
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
    """The simulator backend: rows for the run's plan, the static baseline and the oracle placement,
    every placement made with the fields of the run's placement config."""
    work = cached_workload(*workload_key(config))
    predictor = fitted_predictor(json.dumps(config["predictor"], sort_keys=True), config["predictor_name"],
                                 workload_key(config))
    system = resolve_system(dict(config["system"]))
    rcfg = ReplayConfig(batch_size=int(config["batch_size"]), **config["replay"])
    batches = make_batches(work.test_routing, system.n_gpus, work.n_experts, rcfg)
    try:
        _, fields = placement_choice(config["placement"])
        place = PlaceFn(config["placement_name"], system, work.n_experts, shape=work.shape, **fields)
    except ValueError as e:
        raise ValueError(f"placement={config['placement_name']}: {e}") from None
    run_plan = predictor_plans(batches, {config["predictor_name"]: predictor}, place, system,
                               int(config["interval"]))[0]
    plans = {"run": run_plan, "baseline": static_plan(batches), "oracle": oracle_plan(batches, place)}
    pcost = predictor.cost()
    work_s = plans["run"].predictor_s
    # the predictor's whole work, hidden or not (predictor_ms is only its exposed part)
    cost_columns = {**pcost.as_row(), "work_ms": float(work_s.sum() * 1e3) if work_s is not None else 0.0}
    rows = []
    for role, plan in plans.items():
        result = simulate(batches, plan, work.shape, system, rcfg)
        extra = {"predictor_cost": cost_columns} if role == "run" else {}
        rows += result_rows([result], {**_row_config(config, key, role, system), **extra}, system, work)
    return rows


def execute_run(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The executor backend: one live run in this process; its row keeps the executor's own config
    under ``config.exec.*`` and the sweep's config beside it."""
    import torch  # lazy: torch only for the live executor
    from hydra.utils import instantiate

    work = cached_workload(*workload_key(config))
    # the executor fits its placement on the training requests and replays the test ones: it reads both
    paths = {}
    for part, trace in (("train", work.data.train), ("test", work.data.test)):
        paths[part] = Path(config["out"]) / "cache" / f"{part}-{run_key({'workload': workload_key(config)})}"
        if not paths[part].exists():
            trace.write(paths[part])
    meta = work.data.meta
    ex = dict(config["exec"])
    shape = ex.pop("shape")
    if shape == "auto":  # the real model's expert shape on a GPU; a tiny one with the trace's experts on a CPU
        shape = EXEC_SHAPES.get(meta.n_experts, "mixtral-8x7b") if torch.cuda.is_available() else "tiny"
    predictor_name = config["predictor_name"]
    predictor = None if predictor_name in ("none", "oracle", "previous") else instantiate(config["predictor"])
    if predictor is not None and hasattr(predictor, "predict"):
        raise ValueError(f"predictor={predictor_name}: the executor backend takes distribution predictors only")
    placement = {"contiguous": "static"}.get(config["placement_name"], config["placement_name"])
    _, fields = placement_choice(config["placement"])
    # the exec.* fields meet ExecuteConfig's schema here (an unknown or mistyped one is named)
    ecfg = validate(dict(shape=shape, n_experts=meta.n_experts, top_k=meta.top_k, trace="",
                         train=str(paths["train"]), test=str(paths["test"]), placement_fields=fields,
                         batch_requests=int(config["batch_size"]), placement=placement, predictor=predictor_name,
                         seed=int(config["seed"]), out=str(run_dir(config["out"], key)), **ex),
                    ExecuteConfig, "sweep (exec.*)")
    row, _ = run(ecfg, write=False, predictor=predictor)
    renamed = {("config.exec." + k[len("config."):] if k.startswith("config.") else k): v for k, v in row.items()}
    renamed.update(flatten(_row_config(config, key, "run")))
    return [renamed]


def run_one(config: dict[str, Any]) -> tuple[str, bool]:
    """Run one point of a sweep unless it has finished before; returns (key, ran)."""
    check_config(config)
    key = run_key(config)
    out = Path(config["out"])
    if is_done(out, key) and not config.get("force"):
        return key, False
    stale = run_dir(out, key) / "rows.parquet"
    if stale.exists() and not config.get("force"):
        print(f"[sweep] {stale}: {shard_problem(stale, key)}; running it again", flush=True)
    folder = run_dir(out, key)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "config.yaml") as tmp:
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
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    config = OmegaConf.to_container(raw, resolve=True)
    config["predictor_name"] = choices.get("predictor")
    config["placement_name"] = config["placement"].get("name") or choices.get("placement")
    config["system"].setdefault("name", choices.get("system", "custom"))
    return config


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """One run's config from moegps/conf/sweep.yaml and ``overrides`` (e.g. ``["predictor=ema", "out=/tmp/s"]``),
    without launching: for notebooks and tests, with :func:`run_one`."""
    from hydra import compose, initialize_config_dir  # lazy: hydra is heavy, only configs need it

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sweep", overrides=list(overrides), return_hydra_config=True)
    from omegaconf import open_dict

    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return resolved_config(cfg, choices)


register_resolvers()  # at import: launcher workers unpickle configs that use it


# set by main() for the launcher's workers (they inherit the environment): the sweep's process, its
# number of runs and its start time (progress and ETA)
PARENT_ENV, TOTAL_ENV, START_ENV = "MOEGPS_SWEEP_PID", "MOEGPS_SWEEP_TOTAL", "MOEGPS_SWEEP_START"


def _end_with_parent() -> None:
    """In a launcher worker (joblib/loky), a daemon thread that ends this process once the sweep's
    process is gone: a sweep killed with kill -9 leaves no idle workers behind (they lived on for as
    long as the machine ran). Started once per worker."""
    import os
    import threading

    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    if not parent or parent == os.getpid() or getattr(_end_with_parent, "started", False):
        return
    _end_with_parent.started = True

    def watch():
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # alive, another user's (pid reused): keep watching
            time.sleep(1.0)

    threading.Thread(target=watch, name="moegps-sweep-parent-watch", daemon=True).start()


def progress_note(job_num: int | None) -> str:
    """``17/72, 12 s, eta 38 s`` for the launcher's job number (0-based), from the sweep's start."""
    import os

    total, start = int(os.environ.get(TOTAL_ENV, "0") or 0), float(os.environ.get(START_ENV, "0") or 0)
    if not total or job_num is None:
        return ""
    done = job_num + 1
    elapsed = time.time() - start
    eta = elapsed / done * (total - done)
    return f" [{done}/{total}, {elapsed:.0f} s, eta {eta:.0f} s]"


def sweep_axes(overrides: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """The plain overrides of ``python -m moegps.sweep -m <overrides>`` and its swept values per key:
    the preset's (``hydra.sweeper.params``), a command-line value replacing them (swept or not), as
    hydra's basic sweeper does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override() and not o.input_line.startswith("hydra")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sweep", overrides=plain, return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.get("params") or {})
    axes = {key: list(parser.parse_override(f"{key}={value}").sweep_iterator()) for key, value in params.items()}
    for o in parsed:
        if not o.input_line.startswith("hydra"):
            axes[o.get_key_element()] = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
    plain = [p for p in plain if p.split("=")[0].lstrip("+~") not in axes] + \
        [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line.startswith("hydra")]
    return [p for p in plain if not p.startswith("hydra")], axes


def count_runs(axes: dict[str, list]) -> int:
    """How many runs a sweep of these axes (``sweep_axes(overrides)[1]``) launches: their product."""
    return math.prod(len(values) for values in axes.values())


def preflight(plain: list[str], axes: dict[str, list]) -> None:
    """Check every swept value before the sweep starts (each with the others at their first value):
    a week-long sweep with ``batch_size=4,-4`` stops at once, naming the field, with no run written,
    instead of failing at its first bad point after many good ones. ``plain, axes = sweep_axes(...)``."""
    first = {key: values[0] for key, values in axes.items() if values}
    for key, values in axes.items():
        for value in values:
            point = {**first, key: value}
            check_config(compose_config(plain + [f"{k}={v}" for k, v in point.items()]))


def _app(raw) -> None:
    from hydra.core.hydra_config import HydraConfig

    _end_with_parent()
    config = resolved_config(raw)
    t0 = time.perf_counter()
    try:
        key, ran = run_one(config)
    except ConfigError as e:  # a setting to fix: the message names it
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher marks the job failed and the sweep exits non-zero
        raise SystemExit(str(e)) from None
    what = f"ran in {time.perf_counter() - t0:.1f} s" if ran else "finished before, skipped"
    job = HydraConfig.get().job.get("num") if HydraConfig.initialized() else None
    print(f"[sweep {config.get('name')}] {key} {config['backend']} "
          f"trace={Path(str(config['trace'])).name} "
          f"predictor={config['predictor_name']} placement={config['placement_name']} "
          f"system={config['system'].get('name')} link_gbps={_plain(config['system'].get('link_gbps'))} "
          f"batch_size={config['batch_size']}: {what}{progress_note(job)}", flush=True)


def _plain(value):
    return value.get("value") if isinstance(value, dict) else value


def main() -> None:
    import os
    import sys

    import hydra  # lazy: hydra is heavy, only the command line needs it

    np.seterr(all="ignore")
    args = sys.argv[1:]
    if "-m" in args or "--multirun" in args:
        overrides = [a for a in args if not a.startswith("-")]
        try:
            plain, axes = sweep_axes(overrides)  # composed once, for the count and the checks
        except Exception:  # noqa: BLE001 - an override hydra itself refuses: hydra says so, below
            axes = None
        if axes is not None:
            os.environ[TOTAL_ENV] = str(count_runs(axes))
            try:
                preflight(plain, axes)
            except ConfigError as e:
                raise SystemExit(str(e)) from None
            except Exception:  # noqa: BLE001 - a value hydra itself refuses: hydra says so, below
                pass
    os.environ[PARENT_ENV], os.environ[START_ENV] = str(os.getpid()), str(time.time())
    # an absolute config path: the task function lives in moegps.sweep, so that workers can unpickle it
    run_command(hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sweep")(_app), "sweep")


if __name__ == "__main__":
    # run the imported module, not __main__: launcher workers unpickle the task as moegps.sweep._app
    from moegps.sweep import main as _main

    _main()
