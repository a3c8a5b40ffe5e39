"""``python -m moegps.placement``: every placement algorithm on one load source and a grid of systems.

Prints, per system (GPUs x slots per GPU) and algorithm, the imbalance (max/mean GPU load) over
layers for each phase against the balance bound, the expert copies (and bytes) it would move from
the static contiguous placement, and the share of token-expert selections crossing GPUs; then the
incremental re-placement curve (bytes moved against imbalance gained). Writes ``summary.csv``,
``per_layer.csv`` and ``incremental.csv`` beside hydra's resolved config (``conf/placement_app.yaml``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import split
from .balanced import balanced_duplication
from .hierarchical import hierarchical_duplication
from .incremental import replacement_curve
from .metrics import balance_bound, experts_moved, placement_imbalance
from .optimal import optimal
from .prefill_aware import prefill_aware
from .static import contiguous, round_robin


@dataclass
class LoadSource:
    """Loads of one source: named ``[layer, expert]`` matrices, optional per-request loads."""

    name: str
    loads: dict[str, np.ndarray]  # "all", "prefill", "decode" or domains -> [layer, expert]
    layer_ids: list[int]
    request_loads: np.ndarray | None = None  # [request, layer, expert], phase "all"
    expert_bytes: float = 3 * 4096 * 14336 * 2  # one expert's weights (default: Mixtral-8x7B, bf16)
    drift: tuple[np.ndarray, np.ndarray] | None = None  # (old, new) [layer, expert] for re-placement
    notes: list[str] = field(default_factory=list)


def _from_trace(name: str, trace) -> LoadSource:
    loads = {"all": trace.loads(by="all").counts[0].astype(float)}
    for phase in ("prefill", "decode"):
        if trace.phase_mask(phase).any():
            loads[phase] = trace.loads(by="all", phase=phase).counts[0].astype(float)
    req = trace.loads(by="request").counts.astype(float)
    half = max(1, req.shape[0] // 2)
    drift = (req[:half].sum(0), req[half:].sum(0)) if req.shape[0] > 1 else None
    return LoadSource(name, loads, list(trace.meta.layer_ids), req, drift=drift)


def load_source(cfg) -> LoadSource:
    """The loads named by ``cfg.source`` (see conf/placement_app.yaml)."""
    src = str(cfg.source)
    if src == "random":
        from ..testing import random_trace

        # prefill and decode from two draws, so the phases prefer different experts (as real ones do)
        kw = dict(n_requests=32, prompt_len=(16, 64), decode_steps=16, n_layers=4, n_experts=16, top_k=2, skew=1.2)
        tp = random_trace(np.random.default_rng(cfg.seed), **kw)
        td = random_trace(np.random.default_rng(cfg.seed + 1), **kw)
        pre = tp.loads(by="request", phase="prefill").counts.astype(float)
        dec = td.loads(by="request", phase="decode").counts.astype(float)
        req = pre + dec
        half = req.shape[0] // 2
        loads = {"all": req.sum(0), "prefill": pre.sum(0), "decode": dec.sum(0)}
        return LoadSource("random (skewed synthetic, 16 experts top-2, phases drawn apart)", loads,
                          list(tp.meta.layer_ids), req, drift=(req[:half].sum(0), req[half:].sum(0)))
    if src in ("mixtral", "olmoe"):
        from ..importers.olmoe_routing import load_expert_counts

        el = load_expert_counts("mistral" if src == "mixtral" else "olmoe", cfg.domains)
        doms = [str(d) for d in el.groups["domain"]]
        loads = {"all": el.counts.sum(0).astype(float)} | {d: el.counts[i].astype(float) for i, d in enumerate(doms)}
        drift = (el.counts[0].astype(float), el.counts[1:].sum(0).astype(float)) if len(doms) > 1 else None
        from .metrics import expert_bytes

        size = expert_bytes(4096, 14336) if src == "mixtral" else expert_bytes(2048, 1024)  # OLMoE-1B-7B
        return LoadSource(f"{el.source}", loads, list(el.layer_ids), None, size, drift,
                          [f"aggregate counts: no request-level data (no locality, no prefill/decode); "
                           f"re-placement drift = domain {doms[0]} -> the other domains"])
    if src == "deepseek":
        from ..importers.deepseek_csv import read_deepseek_csv
        from ..paths import shared_data

        from .metrics import expert_bytes

        t = read_deepseek_csv(shared_data("traces", "deepseek-v2-lite-puffin"), cfg.limit)
        source = _from_trace(f"DeepSeek-V2-Lite puffin ({len(t.requests())} prompts, prefill only)", t)
        source.expert_bytes = expert_bytes(2048, 1408)  # hidden 2048, moe_intermediate 1408
        return source
    from ..trace import RoutingTrace

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"config field 'source' is {src!r}: not random|mixtral|olmoe|deepseek and no such trace file or folder")
    return _from_trace(str(path), RoutingTrace.read(path))


def run_system(source: LoadSource, cfg, n_gpus: int, extra: int) -> tuple[list[dict], list[dict]]:
    """All algorithms for one system: (summary rows, per-layer rows)."""
    base = source.loads["all"]
    L, E = base.shape
    slots = math.ceil(E / n_gpus) + extra
    algos = list(cfg.algorithms)
    static = contiguous(L, E, n_gpus, slots)
    placements: dict[str, object] = {}
    seconds: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        placements[name] = fn()
        seconds[name] = time.perf_counter() - t0

    phased = "prefill" in source.loads and "decode" in source.loads
    for name in algos:
        if name == "contiguous":
            placements[name], seconds[name] = static, 0.0
        elif name == "round_robin":
            timed(name, lambda: round_robin(L, E, n_gpus, slots))
        elif name == "balanced":
            timed(name, lambda: balanced_duplication(base, n_gpus, slots))
        elif name == "balanced_lp":
            timed(name, lambda: split.load_proportional(balanced_duplication(base, n_gpus, slots), base))
        elif name == "balanced_restarts":
            timed(name, lambda: split.load_proportional(balanced_duplication(base, n_gpus, slots, restarts=cfg.restarts), base))
        elif name == "hierarchical":
            nodes = n_gpus // cfg.system.gpus_per_node
            if nodes > 1 and E % nodes == 0 and n_gpus % nodes == 0:
                timed(name, lambda: hierarchical_duplication(base, n_gpus, slots, nodes, nodes))
        elif name in ("prefill_aware", "decode_only", "prefill_only"):
            if phased:
                pl = np.stack([source.loads["prefill"], source.loads["decode"]])
                fit = {"prefill_aware": pl, "decode_only": pl[1:], "prefill_only": pl[:1]}[name]
                timed(name, lambda: prefill_aware(fit, n_gpus, slots))
        elif name == "locality_first":
            if source.request_loads is not None:
                srcc = split.source_counts_by_request(source.request_loads, n_gpus)
                timed(name, lambda: split.locality_first(balanced_duplication(base, n_gpus, slots), srcc))
        elif name == "optimal":
            if E * n_gpus <= cfg.milp.max_cells:
                timed(name, lambda: optimal(base, n_gpus, slots, "free", time_limit=cfg.milp.time_limit)[0])
        else:
            raise ValueError(f"config field 'algorithms' names {name!r}, expected one of {list(conf_algorithms())}")

    bound = balance_bound(base, n_gpus, slots)
    bytes_per_expert = source.expert_bytes if cfg.expert_bytes is None else cfg.expert_bytes
    srcc = split.source_counts_by_request(source.request_loads, n_gpus) if source.request_loads is not None else None
    summary, per_layer = [], []
    for name, p in placements.items():
        moved = experts_moved(static, p)
        crossing = np.nan
        if srcc is not None:
            routed = split.locality_routing(p, srcc) if name == "locality_first" else split.routed_by_shares(p, srcc)
            crossing = 100 * split.tokens_crossing(routed).sum() / max(routed.sum(), 1e-300)
        evaluations = list(source.loads.items())
        if source.request_loads is not None:  # each request alone, as one batch: what a server sees
            evaluations.append(("per_request", None))
        for phase, loads in evaluations:
            if phase == "per_request":
                req = source.request_loads  # [R, L, E]
                imb = placement_imbalance(p, req).mean(0)
                ph_bound = balance_bound(req.reshape(-1, E), n_gpus, slots).reshape(req.shape[:2]).mean(0)
            else:
                imb = placement_imbalance(p, loads)
                ph_bound = bound if phase == "all" else balance_bound(loads, n_gpus, slots)
            summary.append(dict(gpus=n_gpus, slots=slots, extra=extra, algorithm=name, split=p.split_rule, phase=phase,
                                imb_mean=imb.mean(), imb_max=imb.max(), bound_mean=ph_bound.mean(),
                                gap_pct=100 * (imb / ph_bound - 1).mean(),
                                copies=int(moved.sum()), gb_moved=moved.sum() * bytes_per_expert / 1e9,
                                crossing_pct=crossing, seconds=seconds[name]))
            for i, layer in enumerate(source.layer_ids):
                per_layer.append(dict(gpus=n_gpus, slots=slots, algorithm=name, phase=phase, layer=layer,
                                      imbalance=imb[i], bound=ph_bound[i], copies=int(moved[i])))
    return summary, per_layer


def conf_algorithms():
    return ("contiguous", "round_robin", "balanced", "balanced_lp", "balanced_restarts", "hierarchical",
            "prefill_aware", "decode_only", "prefill_only", "locality_first", "optimal")


def main(cfg) -> pd.DataFrame:
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_source(cfg)
    L, E = source.loads["all"].shape
    size = source.expert_bytes if cfg.expert_bytes is None else cfg.expert_bytes
    print(f"source: {source.name}: {L} layers {source.layer_ids}, {E} experts; phases {list(source.loads)}; "
          f"{size / 1e6:.1f} MB per expert")
    for note in source.notes:
        print(f"note: {note}")
    systems = [(g, x) for g in cfg.system.gpus for x in cfg.system.extra_slots]
    summary, per_layer, curves = [], [], []
    for g, x in tqdm(systems, desc="systems", disable=len(systems) < 3):
        s, p = run_system(source, cfg, g, x)
        summary += s
        per_layer += p
        if source.drift is not None and x > 0 and E >= g:
            old, new = source.drift
            current = balanced_duplication(old, g, math.ceil(E / g) + x)
            size = source.expert_bytes if cfg.expert_bytes is None else cfg.expert_bytes
            for row in replacement_curve(current, new, list(cfg.incremental_budgets) + [None], size):
                curves.append(dict(gpus=g, slots=current.slots_per_gpu, **row))
    df = pd.DataFrame(summary)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 2000)
    fmt = {"imb_mean": "{:.4f}", "imb_max": "{:.4f}", "bound_mean": "{:.4f}", "gap_pct": "{:.2f}",
           "gb_moved": "{:.2f}", "crossing_pct": "{:.1f}", "seconds": "{:.3f}"}
    print(df.to_string(index=False, formatters={k: v.format for k, v in fmt.items()}))
    for phase in ("all", "per_request"):
        sub = df[df.phase == phase]
        if len(sub):
            wide = sub.pivot_table(index=["gpus", "extra", "slots"], columns="algorithm", values="imb_mean", sort=False)
            wide["bound"] = sub.groupby(["gpus", "extra", "slots"], sort=False).bound_mean.first()
            print(f"\nimbalance (max/mean GPU load, mean over layers), loads: {phase}")
            print(wide.round(4).to_string())
    pl_all = pd.DataFrame(per_layer)
    one = pl_all[(pl_all.algorithm == "balanced") & (pl_all.phase == "all") & (pl_all.slots > 0)]
    one = one.merge(df[["gpus", "slots", "extra"]].drop_duplicates(), on=["gpus", "slots"])
    one = one[(one.extra == 1) & (one.bound <= 1 + 1e-9)]
    if len(one):
        ok = (one.imbalance <= 1.05 * one.bound + 1e-12).mean()
        print(f"\nbalanced duplication, one extra slot per GPU, layers where the bound is reachable: "
              f"{100 * ok:.0f}% within 5% of the bound ({len(one)} layer x system cases; worst {one.imbalance.max():.4f})")
    pl = pd.DataFrame(per_layer)
    show = cfg.per_layer is True or (cfg.per_layer == "auto" and len(systems) == 1)
    if show:
        wide = pl.pivot_table(index=["gpus", "slots", "phase", "layer"], columns="algorithm", values="imbalance")
        wide["bound"] = pl.groupby(["gpus", "slots", "phase", "layer"])["bound"].first()
        print(wide.round(4).to_string())
    if curves:
        cdf = pd.DataFrame(curves)
        cdf["gb"] = cdf["bytes"] / 1e9
        print("\nincremental re-placement (fit on the first half/domain, new loads = the rest):")
        print(cdf.drop(columns=["bytes"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        cdf.to_csv(out / "incremental.csv", index=False)
    df.to_csv(out / "summary.csv", index=False)
    pl.to_csv(out / "per_layer.csv", index=False)
    print(f"wrote {out}/summary.csv, per_layer.csv" + (", incremental.csv" if curves else ""))
    return df


if __name__ == "__main__":
    import hydra

    from ..paths import register_resolvers

    register_resolvers()
    hydra.main(version_base="1.3", config_path="../../conf", config_name="placement_app")(main)()
