"""The simulator's one pipeline: load, split, fit, batch, place, simulate, write rows.

    from moegps.simulator.pipeline import load_workload, fit_predictors, replay_plans
    work = load_workload(trace="deepseek", test_fraction=0.5)        # or train=..., test=...
    fitted = fit_predictors(work.data, {"ema": {}, "token_table": {}})
    results = replay_plans(work, fitted, system, ReplayConfig(batch_size=16), placement="balanced")

``python -m moegps.simulator`` (one replay), the guide (``moegps.simulator.guide``: many system
variants) and sweeps (``moegps.sweep``: one run per point) all go through these functions, so
they split, fit and place the same way. Predictors are fitted on the training requests only and
the test requests are replayed (:func:`moegps.workloads.train_test`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..configs import ConfigError, check_arguments
from ..files import atomic_path
from ..predictors import REGISTRY, make
from ..shapes import ModelShape
from ..trace import TokenRouting
from ..workloads import TokenSpaceError, TrainTest, check_token_space, train_test, trace_shape
from .cost import ExpertTimeTable, times_whole_calls
from .replay import (
    PlaceFn, Plan, ReplayConfig, SimResult, distribution_plan, make_batches, oracle_bound, oracle_plan,
    predict_tokens, simulate, static_plan, token_plan,
)
from .system import SystemSpec


@dataclass
class Workload:
    """Train and test requests, the model shape they are costed at, and the test routing."""

    data: TrainTest
    shape: ModelShape
    test_routing: TokenRouting

    @property
    def n_experts(self) -> int:
        return self.data.meta.n_experts


def load_workload(trace: Any = None, train: Any = None, test: Any = None, test_fraction: float = 0.5,
                  split: str = "arrival", seed: int = 0, limit: int | None = None, shape: str | None = None,
                  skew: float = 1.0, synthetic: dict | None = None) -> Workload:
    """A :class:`Workload` from trace specs (see :func:`moegps.workloads.train_test`); ``shape`` names
    the model shape to cost with (default: the trace's model, :func:`moegps.workloads.trace_shape`)."""
    data = train_test(trace=trace, train=train, test=test, test_fraction=test_fraction, split=split, seed=seed,
                      limit=limit, skew=skew, synthetic=synthetic)
    return Workload(data, trace_shape(data.meta, shape), data.test.by_token())


def fit_predictors(data: TrainTest, specs: dict[str, Any], skip_failures: bool = True) -> dict[str, Any]:
    """Each predictor of ``specs`` fitted on ``data.train``: ``{name: arguments}`` (``moegps.predictors``
    registry names), ``{name: config with _target_}`` (a ``moegps/conf/predictor`` file), or a
    predictor object. Token predictors need the test trace's ids in the training trace's id space (an
    error otherwise, always). With ``skip_failures`` a predictor that cannot be made or fit on this
    trace (e.g. needs decode steps) is left out with a warning; otherwise its error propagates."""
    from hydra.utils import get_class, instantiate  # lazy: hydra is heavy and only configs need it

    fitted = {}
    for name, spec in specs.items():
        try:
            if isinstance(spec, dict) and "_target_" in spec:
                check_arguments(get_class(spec["_target_"]), spec, f"predictor={name}")
                predictor = instantiate(spec)
            elif isinstance(spec, dict) or spec is None:
                if name in REGISTRY:
                    check_arguments(REGISTRY[name], spec or {}, f"predictor {name!r}")
                predictor = make(name, **(spec or {}))
            else:
                predictor = spec
            if hasattr(predictor, "predict"):
                check_token_space(data.train, data.test, where=f"predictor {name!r}")
            fitted[name] = predictor.fit(data.train)
        except (TokenSpaceError, ConfigError):
            raise  # never skipped: scoring ids of another space would be a silent wrong answer
        except Exception as e:
            if not skip_failures:
                raise
            warnings.warn(f"predictor {name!r} skipped: {type(e).__name__}: {e}")
    return fitted


def predictor_plans(batches, predictors: dict[str, Any], place: PlaceFn, system: SystemSpec, interval: int = 1,
                    token_placement_from: str | None = None, token_cache: dict | None = None,
                    plans: list[Plan] | None = None) -> list[Plan]:
    """One plan per fitted predictor (distribution ones first); each token predictor also routes
    tokens over the placements of plan ``token_placement_from`` when given (``name+that``).
    ``token_cache`` keeps token predictions between calls on the same batches."""
    plans = [] if plans is None else plans
    token_cache = {} if token_cache is None else token_cache
    out = []
    for name, p in predictors.items():
        if not hasattr(p, "predict"):
            out.append(distribution_plan(batches, p, place, system, interval, name))
    profile = next((pl for pl in plans + out if pl.name == token_placement_from), None)
    for name, p in predictors.items():
        if hasattr(p, "predict"):
            if name not in token_cache:
                token_cache[name] = predict_tokens(batches, p)
            out.append(token_plan(batches, p, place, system, interval, name, token_cache[name]))
            if profile is not None:
                out.append(token_plan(batches, p, place, system, interval, f"{name}+{profile.name}",
                                      token_cache[name], placement_from=profile))
    return out


def placement_choice(placement: Any, fields: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """A command's ``placement`` -> ``(algorithm name, its fields)``: a name as it is ("auto" when no
    ``moegps/conf/placement`` option was picked), or the option hydra composed from that group (a
    mapping with its ``name``; the ``placement.<field>=`` overrides are its fields), ``fields`` on top."""
    fields = dict(fields or {})
    if isinstance(placement, Mapping):  # a dict, or hydra's DictConfig
        fields = {**{k: v for k, v in dict(placement).items() if k not in ("name", "_target_")}, **fields}
        placement = placement["name"]
    return placement, fields


def replay_plans(work: Workload, predictors: dict[str, Any], system: SystemSpec, rcfg: ReplayConfig,
                 placement: str | PlaceFn = "auto", interval: int = 1, table: ExpertTimeTable | None = None,
                 token_placement_from: str | None = None, placement_fields: dict | None = None,
                 token_cache: dict | None = None, link_gbps: list[float] | None = None) -> dict[float, list[SimResult]]:
    """Replay the test requests under the static baseline, the oracle placement, each predictor's plan
    and the oracle bound (in that order). ``placement`` names the algorithm (with ``placement_fields``
    from its config). Plans are made once on ``system``; with ``link_gbps`` they are simulated on each
    bandwidth (GB/s): ``{link_gbps: results}`` (``{system's: results}`` without)."""
    batches = make_batches(work.test_routing, system.n_gpus, work.n_experts, rcfg)
    place = placement if isinstance(placement, PlaceFn) else PlaceFn(
        placement, system, work.n_experts, shape=work.shape, **(placement_fields or {}))
    plans = [static_plan(batches), oracle_plan(batches, place)]
    plans += predictor_plans(batches, predictors, place, system, interval, token_placement_from, token_cache, plans)
    out = {}
    for bw in link_gbps or [system.link_bandwidth / 1e9]:
        variant = system.replace(link_bandwidth=bw * 1e9)
        results = [simulate(batches, plan, work.shape, variant, rcfg, table) for plan in plans]
        results.append(oracle_bound(results))
        results[1].plan = "oracle_placement"
        out[bw] = results
    return out


def result_rows(results: list[SimResult], variant: dict[str, Any], system: SystemSpec, work: Workload) -> list[dict]:
    """One ``moegps.results`` row per result, with the variant, the model shape and the split."""
    base = {**variant, "model_shape": work.shape.name, **work.data.as_row(), "protocol": work.data.describe()}
    return [r.row(base, system) for r in results]


def timed_shares(expert_time) -> list:
    """``[expert_time.shares()]`` where the expert part was measured (a ``KernelExpertTimer``, ``expert_time=kernels``:
    each GPU share it timed, a pandas DataFrame), else ``[]`` (the roofline, a benchmark table)."""
    return [expert_time.shares()] if times_whole_calls(expert_time) else []


def write_expert_shares(shares: list, out: Path) -> str:
    """``out/expert_shares.csv``, the ``timed_shares`` frames in one (calibration data for one rank's calls:
    ``python -m moegps.simulator.calibrate --kernel-bench``), if there are any; the note a command prints after
    the files it wrote ("" if none)."""
    if not shares:
        return ""
    import pandas as pd

    frame = pd.concat(shares, ignore_index=True)
    with atomic_path(Path(out) / "expert_shares.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return f"; {len(frame)} timed GPU shares in {out}/expert_shares.csv"


def speedups(results: list[SimResult]) -> np.ndarray:
    """Each result's speedup over the first (the static baseline)."""
    base = results[0].total
    return np.array([base / r.total for r in results])
