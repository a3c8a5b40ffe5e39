"""``python -m moegps.placement``: every placement algorithm fitted on training loads and scored on test loads.

Loads come from a ``train=`` and a ``test=`` trace, or one ``trace=`` split by request in arrival
order (:func:`moegps.workloads.train_test`), or from the real Mixtral/OLMoE per-domain counts
(``trace=mixtral|olmoe``: fitted on the first domain, scored on the others). Per system (GPUs x
slots per GPU) and algorithm it prints, out of sample first, the imbalance (max/mean GPU load,
mean over layers) of the fitted placement on the test loads, next to the static contiguous
placement and the in-sample bound (the best any placement fitted on those test loads could do),
then the in-sample imbalance on the training loads; the expert copies (and bytes, at the size of
the trace's model) it would move from the static placement; the share of token-expert selections
crossing GPUs; and the incremental re-placement curve from the training loads' placement to the
test loads. Writes ``summary.csv``, ``per_layer.csv`` and ``incremental.csv`` beside hydra's
resolved config (``moegps/conf/placement_app.yaml``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..configs import (all_or_first_n, checked, each, fraction, hydra_command, nonnegative, one_of,
                       optional, positive, register, validate)
from ..importers.olmoe_routing import load_expert_counts
from ..shapes import from_name
from ..workloads import train_test, trace_shape
from . import split
from .algorithms import place
from .incremental import replacement_curve
from .metrics import balance_bound, experts_moved, placement_imbalance
from .static import contiguous

# the CLI's algorithm names: (moegps.placement.algorithms name, loads it is fitted on, fields from the config)
ALGORITHMS = {
    "contiguous": ("contiguous", "all", ()), "round_robin": ("round_robin", "all", ()),
    "balanced": ("balanced", "all", ()), "balanced_lp": ("balanced_lp", "all", ()),
    "balanced_restarts": ("balanced", "all", ("restarts",)), "hierarchical": ("hierarchical", "all", ()),
    "prefill_aware": ("prefill_aware", "phases", ()), "decode_only": ("prefill_aware", "decode", ()),
    "prefill_only": ("prefill_aware", "prefill", ()), "locality_first": ("balanced", "all", ()),
    "optimal": ("optimal", "all", ("time_limit",)),
}
COUNT_SOURCES = {"mixtral": ("mistral", "mixtral-8x7b"), "olmoe": ("olmoe", "olmoe-1b-7b")}


@dataclass
class SystemGrid:
    gpus: list[int] = checked([2, 4, 8, 16], each(positive))
    extra_slots: list[int] = checked([0, 1, 2], each(nonnegative))  # slots per GPU = ceil(experts / gpus) + extra
    gpus_per_node: int = checked(8, positive)  # hierarchical placement when gpus > gpus_per_node


@dataclass
class MilpLimits:
    max_cells: int = checked(64, positive)  # solve only when experts x gpus <= this
    time_limit: float = checked(10.0, positive)  # seconds per layer


@dataclass
class PlacementAppConfig:
    """moegps/conf/placement_app.yaml."""

    trace: str | None = "random"
    train: str | None = None
    test: str | None = None
    limit: int | None = checked(100, all_or_first_n)
    test_fraction: float = checked(0.5, fraction)
    split: str = checked("arrival", one_of("arrival", "random"))
    domains: list[str] | None = None
    seed: int = checked(0, nonnegative)
    system: SystemGrid = field(default_factory=SystemGrid)
    algorithms: list[str] = checked(list(ALGORITHMS), each(one_of(*ALGORITHMS)))
    restarts: int = checked(16, positive)
    milp: MilpLimits = field(default_factory=MilpLimits)
    expert_bytes: float | None = checked(None, optional(positive))
    per_layer: str = checked("auto", one_of("auto", "true", "false", "True", "False"))
    incremental_budgets: list[int] = checked([0, 1, 2, 4, 8], each(nonnegative))
    out: str = "outputs/placement"


register("placement_app_schema", PlacementAppConfig)


@dataclass
class Loads:
    """One side (train or test) of a load source: named ``[layer, expert]`` matrices, optional per-request loads."""

    loads: dict[str, np.ndarray]  # "all", "prefill", "decode" or domains -> [layer, expert]
    request_loads: np.ndarray | None = None  # [request, layer, expert], phase "all"


@dataclass
class LoadSource:
    """Training and test loads of one source, the model's expert size, and how they were split."""

    name: str
    train: Loads
    test: Loads
    layer_ids: list[int]
    expert_bytes: float  # one expert's weights, from the trace's model (moegps.shapes)
    protocol: str
    notes: list[str] = field(default_factory=list)


def _loads(trace) -> Loads:
    loads = {"all": trace.loads(by="all").counts[0].astype(float)}
    for phase in ("prefill", "decode"):
        if trace.phase_mask(phase).any():
            loads[phase] = trace.loads(by="all", phase=phase).counts[0].astype(float)
    return Loads(loads, trace.loads(by="request").counts.astype(float))


def load_source(cfg) -> LoadSource:
    """The training and test loads the config names (see moegps/conf/placement_app.yaml)."""
    spec = None if cfg.trace is None else str(cfg.trace)
    if spec in COUNT_SOURCES and cfg.train is None:
        model, shape = COUNT_SOURCES[spec]
        el = load_expert_counts(model, cfg.domains)
        doms = [str(d) for d in el.groups["domain"]]
        if len(doms) < 2:
            raise ValueError(f"trace={spec}: the counts have one domain ({doms}); fitting on one domain and scoring "
                             "on others needs at least two (config field 'domains')")
        counts = el.counts.astype(float)
        test = {"all": counts[1:].sum(0)} | {d: counts[i] for i, d in enumerate(doms) if i > 0}
        return LoadSource(f"{el.source}", Loads({"all": counts[0], doms[0]: counts[0]}), Loads(test),
                          list(el.layer_ids), from_name(shape).expert_weight_bytes,
                          f"out of sample: fitted on domain {doms[0]}, scored on domains {doms[1:]}",
                          ["aggregate counts: no request-level data (no locality, no prefill/decode)"])
    data = train_test(trace=spec, train=cfg.train, test=cfg.test, test_fraction=cfg.test_fraction,
                      split=cfg.split, seed=cfg.seed, limit=cfg.limit)
    return LoadSource(data.name, _loads(data.train), _loads(data.test), list(data.meta.layer_ids),
                      trace_shape(data.meta).expert_weight_bytes, data.describe())


def fit(name: str, source: LoadSource, cfg, n_gpus: int, slots: int):
    """Algorithm ``name`` fitted on the training loads; None where it does not apply to this source."""
    algorithm, kind, config_fields = ALGORITHMS[name]
    train = source.train.loads
    fields = {f: getattr(cfg, f) if hasattr(cfg, f) else getattr(cfg.milp, f) for f in config_fields}
    if kind == "phases" or kind in ("prefill", "decode"):
        if not ("prefill" in train and "decode" in train):
            return None
        loads = np.stack([train["prefill"], train["decode"]]) if kind == "phases" else train[kind][None]
    else:
        loads = train["all"]
    E = loads.shape[-1]
    if name == "hierarchical":
        nodes = n_gpus // cfg.system.gpus_per_node
        if not (nodes > 1 and E % nodes == 0):
            return None
        fields["gpus_per_node"] = cfg.system.gpus_per_node
    if name == "optimal" and E * n_gpus > cfg.milp.max_cells:
        return None
    if name == "locality_first" and source.train.request_loads is None:
        return None
    gpus_per_node = fields.pop("gpus_per_node", None)
    placement = place(algorithm, loads, n_gpus, slots, gpus_per_node, **fields)
    if name == "locality_first":
        placement = split.locality_first(placement, split.source_counts_by_request(source.train.request_loads, n_gpus))
    return placement


def _scores(placement, side: Loads, n_gpus: int, slots: int):
    """(evaluation name, imbalance [layer], bound [layer]) of a placement on each load set of one side."""
    for phase, loads in side.loads.items():
        yield phase, placement_imbalance(placement, loads), balance_bound(loads, n_gpus, slots)
    if side.request_loads is not None:  # each request alone, as one batch: what a server sees
        req = side.request_loads  # [R, L, E]
        E = req.shape[-1]
        yield ("per_request", placement_imbalance(placement, req).mean(0),
               balance_bound(req.reshape(-1, E), n_gpus, slots).reshape(req.shape[:2]).mean(0))


def run_system(source: LoadSource, cfg, n_gpus: int, extra: int) -> tuple[list[dict], list[dict]]:
    """All algorithms for one system: (summary rows, per-layer rows); ``data`` = test (out of sample) or train."""
    L, E = source.train.loads["all"].shape
    slots = math.ceil(E / n_gpus) + extra
    static = contiguous(L, E, n_gpus, slots)
    bytes_per_expert = source.expert_bytes if cfg.expert_bytes is None else cfg.expert_bytes
    test_requests = source.test.request_loads
    srcc = split.source_counts_by_request(test_requests, n_gpus) if test_requests is not None else None
    summary, per_layer = [], []
    for name in cfg.algorithms:
        if name not in ALGORITHMS:
            raise ValueError(f"config field 'algorithms' names {name!r}, expected one of {list(ALGORITHMS)}")
        t0 = time.perf_counter()
        p = fit(name, source, cfg, n_gpus, slots)
        seconds = time.perf_counter() - t0
        if p is None:
            continue
        moved = experts_moved(static, p)
        crossing = np.nan
        if srcc is not None:
            routed = split.locality_routing(p, srcc) if name == "locality_first" else split.routed_by_shares(p, srcc)
            crossing = 100 * split.tokens_crossing(routed).sum() / max(routed.sum(), 1e-300)
        for data, side in (("test", source.test), ("train", source.train)):
            for phase, imb, bound in _scores(p, side, n_gpus, slots):
                summary.append(dict(gpus=n_gpus, slots=slots, extra=extra, algorithm=name, split=p.split_rule,
                                    data=data, phase=phase, imb_mean=imb.mean(), imb_max=imb.max(),
                                    bound_mean=bound.mean(), gap_pct=100 * (imb / bound - 1).mean(),
                                    copies=int(moved.sum()), gb_moved=moved.sum() * bytes_per_expert / 1e9,
                                    crossing_pct=crossing if data == "test" else np.nan, seconds=seconds))
                for i, layer in enumerate(source.layer_ids):
                    per_layer.append(dict(gpus=n_gpus, slots=slots, algorithm=name, data=data, phase=phase,
                                          layer=layer, imbalance=imb[i], bound=bound[i], copies=int(moved[i])))
    return summary, per_layer


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per system and algorithm: the test-load imbalance (out of sample), static's, the in-sample bound
    on the test loads, and the training-load imbalance (in sample); phase "all"."""
    keys = ["gpus", "extra", "slots", "algorithm"]
    test = df[(df.data == "test") & (df.phase == "all")].set_index(keys)
    train = df[(df.data == "train") & (df.phase == "all")].set_index(keys)
    out = pd.DataFrame({"test": test.imb_mean, "train (in sample)": train.imb_mean.reindex(test.index)})
    static = test.xs("contiguous", level="algorithm").imb_mean if "contiguous" in test.index.get_level_values(3) else None
    out = out.reset_index()
    if static is not None:
        out["static, test"] = [static.get((g, x, s), np.nan) for g, x, s in zip(out.gpus, out.extra, out.slots)]
    out["bound, test (in sample)"] = test.bound_mean.to_numpy()
    return out


def main(raw) -> pd.DataFrame:
    """The command on a composed config (moegps/conf/placement_app.yaml); returns the summary table."""
    cfg = validate(raw, PlacementAppConfig, "placement")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_source(cfg)
    L, E = source.train.loads["all"].shape
    size = source.expert_bytes if cfg.expert_bytes is None else cfg.expert_bytes
    print(f"source: {source.name}: {L} layers {source.layer_ids}, {E} experts; loads {list(source.test.loads)}; "
          f"{size / 1e6:.1f} MB per expert")
    print(source.protocol)
    for note in source.notes:
        print(f"note: {note}")
    systems = [(g, x) for g in cfg.system.gpus for x in cfg.system.extra_slots]
    summary, per_layer, curves = [], [], []
    for g, x in tqdm(systems, desc="systems", disable=len(systems) < 3):
        s, p = run_system(source, cfg, g, x)
        summary += s
        per_layer += p
        if x > 0 and E >= g:
            current = place("balanced", source.train.loads["all"], g, math.ceil(E / g) + x)
            for row in replacement_curve(current, source.test.loads["all"], list(cfg.incremental_budgets) + [None],
                                         size):
                curves.append(dict(gpus=g, slots=current.slots_per_gpu, **row))
    df = pd.DataFrame(summary)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 2000)
    print("\nimbalance (max/mean GPU load, mean over layers): placements fitted on the training loads, "
          "scored on the test loads (out of sample), beside the static placement, the bound of a placement "
          "fitted on the test loads themselves, and the training loads (in sample)")
    print(headline(df).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    fmt = {"imb_mean": "{:.4f}", "imb_max": "{:.4f}", "bound_mean": "{:.4f}", "gap_pct": "{:.2f}",
           "gb_moved": "{:.2f}", "crossing_pct": "{:.1f}", "seconds": "{:.3f}"}
    print("\nevery load set (data: test = out of sample, train = in sample):")
    print(df.to_string(index=False, formatters={k: v.format for k, v in fmt.items()}))
    pl = pd.DataFrame(per_layer)
    show = str(cfg.per_layer).lower() == "true" or (cfg.per_layer == "auto" and len(systems) == 1)
    if show:
        wide = pl.pivot_table(index=["gpus", "slots", "data", "phase", "layer"], columns="algorithm",
                              values="imbalance")
        wide["bound"] = pl.groupby(["gpus", "slots", "data", "phase", "layer"])["bound"].first()
        print(wide.round(4).to_string())
    if curves:
        cdf = pd.DataFrame(curves)
        cdf["gb"] = cdf["bytes"] / 1e9
        print("\nincremental re-placement (from the training loads' balanced placement to the test loads):")
        print(cdf.drop(columns=["bytes"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        cdf.to_csv(out / "incremental.csv", index=False)
    df.to_csv(out / "summary.csv", index=False)
    pl.to_csv(out / "per_layer.csv", index=False)
    print(f"wrote {out}/summary.csv, per_layer.csv" + (", incremental.csv" if curves else ""))
    return df


if __name__ == "__main__":
    hydra_command(main, "placement_app", "placement", errors=(ValueError, FileNotFoundError))
