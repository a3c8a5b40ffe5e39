"""``python -m moegps.simulator [key=value ...]`` (hydra; moegps/conf/simulate.yaml): one replay.

Fits the named predictors on the training requests (``train=``/``test=`` traces, or one ``trace=``
split by request in arrival order), replays the test requests under the static baseline, the oracle
placement, each predictor's plan and the oracle bound, and writes the results rows
(``rows.parquet``), the per-layer side table (``per_layer.parquet``) and the resolved config
(``config.json``) to ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from ..configs import all_or_first_n, checked, each, fraction, hydra_command, nonnegative, one_of, positive, register, validate
from ..files import atomic_path
from ..predictors import REGISTRY
from ..results import write_rows
from .pipeline import (fit_predictors, load_workload, placement_choice, replay_plans, result_rows, speedups,
                       timed_shares, write_expert_shares)
from .replay import ReplayConfig
from .system import hydra_system, resolve_system


@dataclass
class SimulateConfig:
    """moegps/conf/simulate.yaml."""

    trace: str = "deepseek"
    train: str | None = None
    test: str | None = None
    limit: int | None = checked(None, all_or_first_n)
    skew: float = checked(1.0, nonnegative)
    shape: str | None = None
    placement: Any = "auto"  # "auto", an algorithm's name, or its moegps/conf/placement option (a mapping)
    placement_fields: dict[str, Any] = field(default_factory=dict)
    interval: int = checked(1, positive)
    test_fraction: float = checked(0.5, fraction)
    split: str = checked("arrival", one_of("arrival", "random"))
    seed: int = checked(0, nonnegative)
    predictors: list[str] = checked(["global_profile", "ema", "token_table", "cross_layer"], each(one_of(*REGISTRY)))
    predictor_args: dict[str, Any] = field(default_factory=dict)
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(batch_size=16))
    out: str = "outputs/simulate"
    system: Any = "h100_8gpu"
    expert_time: str = checked("roofline", one_of("roofline", "kernels"))


register("simulate_schema", SimulateConfig)


def simulate(config: dict) -> tuple:
    """The replay a resolved ``simulate.yaml`` config describes: (workload, results, rows, timer), the
    timer the ``KernelExpertTimer`` that measured the expert part (``expert_time=kernels``) or None."""
    work = load_workload(trace=config["trace"], train=config.get("train"), test=config.get("test"),
                         test_fraction=config["test_fraction"], split=config.get("split", "arrival"),
                         seed=config["seed"], limit=config["limit"], shape=config["shape"], skew=config["skew"])
    system = resolve_system(config["system"])
    rcfg = ReplayConfig(**config["replay"])
    args = config.get("predictor_args") or {}
    fitted = fit_predictors(work.data, {name: args.get(name, {}) for name in config["predictors"]})
    timer = None
    if config.get("expert_time") == "kernels":
        # lazy: torch and the kernels, which the roofline needs none of (DESIGN.md, import rule 5)
        from ..executor.expert_timer import KernelExpertTimer
        timer = KernelExpertTimer(work.shape)
    placement, fields = placement_choice(config["placement"], config.get("placement_fields"))
    results = next(iter(replay_plans(work, fitted, system, rcfg, placement, config["interval"], timer,
                                     placement_fields=fields).values()))
    variant = {k: config[k] for k in ("trace", "interval", "seed")}
    variant.update(placement=placement, system=system.name, replay=config["replay"],
                   expert_time="roofline" if timer is None else f"kernels:{timer.device_name}")
    if timer is not None:
        print(f"expert time measured on {timer.device_name}: {timer.measured} distinct GPU shares timed for "
              f"{timer.calls} (step, GPU) pairs")
    return work, results, result_rows(results, variant, system, work), timer


def app(raw) -> None:
    """The command on a composed config (moegps/conf/simulate.yaml): replay, write, print."""
    config = OmegaConf.to_container(raw, resolve=True)
    hydra_system(config)
    config = dataclasses.asdict(validate(config, SimulateConfig, "simulator"))
    t0 = time.perf_counter()
    work, results, rows, timer = simulate(config)
    out = Path(config["out"])
    write_rows(rows, out / "rows.parquet")
    written = "rows.parquet, per_layer.parquet, config.json"
    if write_expert_shares(timed_shares(timer), out):  # what each GPU share took: calibration data for one rank's calls
        written += ", expert_shares.csv"
    side = pd.concat([r.per_layer(row["run_id"]) for r, row in zip(results, rows)], ignore_index=True)
    with atomic_path(out / "per_layer.parquet") as tmp:
        side.to_parquet(tmp, index=False)
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=str))
    default = dataclasses.asdict(ReplayConfig())
    changed = ", ".join(f"{k}={v}" for k, v in config["replay"].items() if default.get(k) != v)
    print(f"{work.data.describe()}; costed as {work.shape.name} on sim:{rows[0]['device'][4:]}"
          f"{f'; replay {changed}' if changed else ''} ({time.perf_counter() - t0:.1f} s)")
    print(f"{'plan':<18} {'family':<13} {'total ms':>10} {'expert':>9} {'dispatch':>9} {'combine':>9} "
          f"{'other':>8} {'pred':>7} {'migr':>8} {'speedup':>8}")
    for r, speedup in zip(results, speedups(results)):
        ms = r.totals_ms()
        print(f"{r.plan:<18} {r.family:<13} {ms['total_ms']:10.2f} {ms['expert_ms']:9.2f} {ms['dispatch_ms']:9.2f} "
              f"{ms['combine_ms']:9.2f} {ms['other_ms']:8.2f} {ms['predictor_ms']:7.3f} {ms['migration_ms']:8.2f} "
              f"{speedup:8.3f}")
    print(f"wrote {out}/{written}")


def main() -> None:
    np.seterr(all="ignore")
    hydra_command(app, "simulate", "simulator", errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
