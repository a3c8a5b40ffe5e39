"""Fit a system profile's free parameters to measured timings, and report simulated-vs-measured error.

A measurement is a :class:`Case`: one MoE layer's work as the executor ran it (tokens each GPU
computed for each expert, bytes each GPU pair exchanged, tokens each GPU ran attention for) and the
measured milliseconds of some of its components (``expert_ms``, ``dispatch_ms``, ``combine_ms``,
``moe_ms``). :func:`cases_from_results` turns executor rows (``moegps.results.read_results``) into
cases with a function the caller gives (the executor knows what workload each row ran);
:func:`fit` then adjusts the chosen :class:`SystemSpec` fields (in log space, so they stay
positive) with ``scipy.optimize.least_squares`` to minimise the relative error, and
:func:`error_table` reports simulated/measured per case.

``python -m moegps.simulator.calibrate`` with no measurements runs the self-check: synthetic
measurements from known parameters (plus noise), then recovers them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from ..shapes import names as shape_names
from . import cost
from ..shapes import ModelShape, from_name
from .system import SystemSpec, load_system

DEFAULT_FREE = ("hbm_bandwidth", "matmul_flops", "expert_launch", "layer_overhead", "link_bandwidth", "link_latency")


@dataclass
class Case:
    """One measured MoE layer. Arrays are for one step; leading step dims are allowed."""

    tokens_per_gpu_expert: np.ndarray  # [..., G, E]
    pair_bytes: np.ndarray  # [..., G, G] dispatch bytes (combine = transpose)
    measured_ms: dict[str, float]  # component -> ms, e.g. {"expert_ms": 1.2, "dispatch_ms": 0.3}
    name: str = ""
    info: dict = field(default_factory=dict)


def simulate_case(case: Case, shape: ModelShape, system: SystemSpec) -> dict[str, float]:
    """The cost model's ms for each component of ``case`` (``case.info["shape"]``, when set, overrides
    ``shape``; a one-GPU case needs ``system`` with ``n_gpus=1``)."""
    shape = case.info.get("shape", shape)
    if case.pair_bytes.shape[-1] != system.n_gpus:
        system = system.replace(n_gpus=case.pair_bytes.shape[-1], gpus_per_node=case.pair_bytes.shape[-1])
    expert = cost.gpu_expert_time(case.tokens_per_gpu_expert, shape, system).max(axis=-1)
    dispatch = cost.all_to_all_time(case.pair_bytes, system)
    combine = cost.all_to_all_time(np.swapaxes(case.pair_bytes, -1, -2), system)
    out = {"expert_ms": expert, "dispatch_ms": dispatch, "combine_ms": combine,
           "moe_ms": expert + dispatch + combine + system.layer_overhead}
    return {k: float(np.sum(v) * 1e3) for k, v in out.items()}


def _with(system: SystemSpec, free: tuple[str, ...], log_params: np.ndarray) -> SystemSpec:
    return system.replace(**{name: float(np.exp(v)) for name, v in zip(free, log_params)})


def fit(cases: list[Case], shape: ModelShape, system: SystemSpec, free: Iterable[str] = DEFAULT_FREE,
        bounds_factor: float = 100.0, weights: Iterable[float] | None = None) -> tuple[SystemSpec, pd.DataFrame]:
    """Fit ``free`` fields of ``system`` to the cases' measurements; returns the fitted profile and
    :func:`error_table` of it. Each field may move ``bounds_factor`` x either way from its start.
    ``weights``: one per case, scaling its relative errors (e.g. files of different sizes weighted equally);
    all 1 by default."""
    free = tuple(free)
    weights = np.ones(len(cases)) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if weights.shape != (len(cases),):
        raise ValueError(f"fit: {weights.size} weights for {len(cases)} cases; give one per case")
    initial = {"roofline_p": 4.0}  # fields that may be unset (None) in a profile start here
    start = np.log([max(getattr(system, name) if getattr(system, name) is not None else initial[name], 1e-9)
                    for name in free])
    # fields with a zero start (e.g. no launch cost assumed) start at a small positive value
    start = np.where(np.isfinite(start), start, np.log(1e-7))

    def residuals(log_params):
        spec = _with(system, free, log_params)
        res = []
        for case, weight in zip(cases, weights):
            sim = simulate_case(case, shape, spec)
            res += [weight * (sim[k] - v) / v for k, v in case.measured_ms.items() if v > 0]
        return np.asarray(res)

    span = np.log(bounds_factor)
    result = least_squares(residuals, start, bounds=(start - span, start + span), x_scale=1.0, method="trf")
    fitted = _with(system, free, result.x)
    fitted.provenance = {**system.provenance, **{name: "calibrated to measured cases" for name in free}}
    return fitted, error_table(cases, shape, fitted)


def error_table(cases: list[Case], shape: ModelShape, system: SystemSpec) -> pd.DataFrame:
    """One row per (case, component): measured ms, simulated ms, simulated/measured, |error| %.
    Components measured as zero (e.g. no traffic when every token stays on its GPU) have no relative
    error and are left out, as in :func:`fit`."""
    rows = []
    for i, case in enumerate(cases):
        sim = simulate_case(case, shape, system)
        for key, measured in case.measured_ms.items():
            if measured <= 0:
                continue
            rows.append({"case": case.name or str(i), "component": key, "measured_ms": measured,
                         "simulated_ms": sim[key], "ratio": sim[key] / measured,
                         "abs_error_pct": abs(sim[key] / measured - 1) * 100})
    return pd.DataFrame(rows)


def cases_from_results(frame: pd.DataFrame, workload: Callable[[pd.Series], tuple[np.ndarray, np.ndarray]],
                       components: tuple[str, ...] = ("expert_ms", "dispatch_ms", "combine_ms")) -> list[Case]:
    """Executor rows -> cases. ``workload(row)`` returns the row's ``(tokens_per_gpu_expert,
    pair_bytes)``; the row's non-NaN ``components`` are the measurements."""
    cases = []
    for _, row in frame.iterrows():
        tokens, pair = workload(row)
        measured = {c: float(row[c]) for c in components if c in row and np.isfinite(row[c]) and row[c] > 0}
        if measured:
            cases.append(Case(tokens, pair, measured, name=str(row.get("run_id", len(cases)))))
    return cases


def cases_from_kernel_bench(path, method: str | None = None) -> list[Case]:
    """Measured one-GPU MoE layers from ``moegps.kernels.bench`` output (``bench.csv``):
    each row's ``tokens`` x ``k`` selections spread evenly over ``active_experts`` experts on one GPU,
    measured ``<method>_us`` as ``moe_ms`` (the fused kernel includes the routing/alignment work
    the cost model calls the per-layer overhead); the method by ``cost.kernel_bench_column``
    (balanced routing where the run timed it: the even split these cases assume). A ``trace.csv``
    (recorded routing, ``--routing-trace``) or a replay's ``expert_shares.csv`` (``expert_time=kernels``:
    one GPU's share, top-1) gives each expert its own rows (``expert_rows``) and ``ours_us``, the call on
    exactly those rows."""
    frame = pd.read_csv(path)
    recorded = "expert_rows" in frame
    column = cost.kernel_bench_column(frame, method or ("ours" if recorded else None))
    missing = {"shape", "tokens", "E", "H", "F", "k", "active_experts", column} - set(frame)
    if missing:
        raise ValueError(f"{path}: not a moegps.kernels.bench CSV, missing columns {sorted(missing)}")
    cases = []
    for _, row in frame.iterrows():
        known = row["shape"] in shape_names()
        # an even split needs a shape of the registry (the engine's +shared calls are not even); a row
        # with its experts' own rows needs only E, H, F and k, the expert roofline's sizes
        if not (known or recorded) or not np.isfinite(row[column]):
            continue
        E, k, active = int(row["E"]), int(row["k"]), int(row["active_experts"])
        shape = from_name(row["shape"] if known else "mixtral-8x7b").replace(
            name=str(row["shape"]), hidden=int(row["H"]), expert_ffn=int(row["F"]), n_experts=E, top_k=k)
        if recorded:
            tokens = np.asarray(json.loads(row["expert_rows"]), dtype=np.float64).reshape(1, E)
        else:
            tokens = np.zeros((1, E))
            tokens[0, :active] = row["tokens"] * k / active
        name = f"{row['shape']} T={int(row['tokens'])}" + (f" {row.get('routing', 'own rows')}" if recorded else "")
        cases.append(Case(tokens, np.zeros((1, 1)), {"moe_ms": row[column] / 1e3}, name=name,
                          info={"shape": shape}))
    return cases


def synthetic_cases(rng: np.random.Generator, shape: ModelShape, truth: SystemSpec, n_cases: int = 40,
                    noise: float = 0.0) -> list[Case]:
    """Cases spanning small to large token counts, balanced to skewed, measured under ``truth``
    (multiplicative noise of relative size ``noise``): the test bed for :func:`fit`."""
    G, E = truth.n_gpus, shape.n_experts
    cases = []
    for i in range(n_cases):
        tokens = int(rng.choice([1, 4, 16, 64, 256, 1024, 4096, 16384]))
        skew = rng.uniform(0, 2)
        p = rng.dirichlet(np.full(E, 1.0 / (skew + 0.1)))
        src = rng.multinomial(tokens * shape.top_k, np.full(G, 1.0 / G))
        counts = np.stack([rng.multinomial(n, p) for n in src]).astype(np.float64)  # [G_src, E]
        share = np.zeros((E, G))
        share[np.arange(E), np.arange(E) * G // E] = 1.0
        pair, per_gpu = cost.route_tokens(counts, share)
        case = Case(per_gpu, pair * shape.token_bytes, {}, name=f"synthetic{i}:{tokens}tok")
        sim = simulate_case(case, shape, truth)
        case.measured_ms = {k: sim[k] * float(np.exp(rng.normal(0, noise))) for k in ("expert_ms", "dispatch_ms", "combine_ms", "moe_ms")}
        cases.append(case)
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", default="h100_8gpu")
    parser.add_argument("--model", default="mixtral-8x7b", choices=shape_names(), help="model shape (moegps.shapes)")
    parser.add_argument("--noise", type=float, default=0.03, help="relative noise of the synthetic measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel-bench", nargs="+", metavar="CSV",
                        help="calibrate the expert roofline to moegps.kernels.bench results instead: fit on the "
                             "first file, report the error on all")
    args = parser.parse_args(argv)
    if args.kernel_bench:
        return kernel_bench_report(args.kernel_bench, args.system)
    rng = np.random.default_rng(args.seed)
    shape = from_name(args.model)
    start = load_system(args.system)
    # the "truth" differs from the profile by factors a real calibration would have to find
    truth = start.replace(hbm_bandwidth=start.hbm_bandwidth * 0.8, matmul_flops=start.matmul_flops * 0.7,
                          expert_launch=6e-6, layer_overhead=35e-6, link_bandwidth=start.link_bandwidth * 0.6,
                          link_latency=18e-6)
    cases = synthetic_cases(rng, shape, truth, noise=args.noise)
    before = error_table(cases, shape, start)
    fitted, after = fit(cases, shape, start)
    print(f"synthetic calibration on {args.system} ({len(cases)} cases, noise {args.noise:.0%})")
    print(f"{'parameter':>16} {'start':>12} {'truth':>12} {'fitted':>12}")
    for name in DEFAULT_FREE:
        print(f"{name:>16} {getattr(start, name):12.4g} {getattr(truth, name):12.4g} {getattr(fitted, name):12.4g}")
    for label, table in (("before", before), ("after", after)):
        print(f"{label}: mean |error| {table.abs_error_pct.mean():.2f}%, max {table.abs_error_pct.max():.2f}%")


def kernel_bench_report(paths: list[str], system_name: str = "h100_8gpu") -> pd.DataFrame:
    """Fit HBM bandwidth, matmul throughput, per-expert launch and per-layer overhead to the first
    kernel-benchmark file; print the error of the profile and of the fit on every file."""
    start = load_system(system_name)
    free = ("hbm_bandwidth", "matmul_flops", "expert_launch", "layer_overhead", "roofline_p")
    train = cases_from_kernel_bench(paths[0])
    fitted, _ = fit(train, from_name("mixtral-8x7b"), start, free)
    print(f"expert-roofline calibration of {system_name} to {paths[0]} ({len(train)} measured MoE layers)")
    print(f"{'parameter':>16} {'profile':>12} {'fitted':>12}")
    for name in free:
        value = getattr(start, name)
        print(f"{name:>16} {'max' if value is None else format(value, '.4g'):>12} {getattr(fitted, name):12.4g}")
    tables = []
    for path in paths:
        cases = cases_from_kernel_bench(path)
        for label, spec in (("profile", start), ("fitted", fitted)):
            t = error_table(cases, from_name("mixtral-8x7b"), spec).assign(file=str(path), params=label)
            tables.append(t)
            print(f"{label:>8} on {path}: mean |error| {t.abs_error_pct.mean():.1f}%, median "
                  f"{t.abs_error_pct.median():.1f}%, max {t.abs_error_pct.max():.1f}%")
    table = pd.concat(tables, ignore_index=True)
    last = table[(table.params == "fitted") & (table.file == str(paths[-1]))]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3g}".format):
        print(last[["case", "measured_ms", "simulated_ms", "ratio", "abs_error_pct"]].to_string(index=False))
    return table


if __name__ == "__main__":
    main()
