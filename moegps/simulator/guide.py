"""The predictor-selection guide: which predictor family, and which predictor, wins end to end where.

``python -m moegps.simulator.guide [trace=deepseek|synthetic|<trace>] [system=h100_8gpu] [link_gbps=[...]]
[batch_sizes=[...]] [gpus=[...]] [skews=[...]] [train=A test=B] ...`` (moegps/conf/guide.yaml) fits every
predictor on the training requests (``train=``, or the first requests of ``trace=`` by id: see
:func:`moegps.workloads.train_test`), replays the test requests under each of them, the static baseline
and the oracle through the simulator's pipeline (:mod:`.pipeline`), for every system variant (GPU count x
link bandwidth) and batch size (and routing skew, for the synthetic trace), and writes:

- ``rows.parquet``: one ``moegps.results`` row per (variant, plan);
- ``decision.csv``: per variant, the best distribution-only and token-to-expert predictor, their
  times, the baseline and the oracle, the winner and the gain ``t_token / t_distribution - 1``;
- ``decision.png``: decision regions (winning family per bandwidth x batch size, or skew), each
  cell labelled with that gain;
- ``expert_shares.csv`` with ``expert_time=kernels``: each GPU share timed on this device's kernels
  (calibration data for one rank's calls: ``python -m moegps.simulator.calibrate --kernel-bench``).

The MoE-GPS setting: ``system=a100_4gpu_moegps batch_sizes=[1] phase=prefill attention=tp
link_gbps=[600,200,64,32]`` (see docs/simulator.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..configs import (ConfigError, all_or_first_n, checked, each, fraction, hydra_command, nonnegative, one_of, optional,
                       positive, register, validate)
from ..files import atomic_path, save_png
from ..placement.algorithms import place
from ..predictors import REGISTRY
from ..results import write_rows
from .cost import load_kernel_bench
from .pipeline import (Workload, fit_predictors, load_workload, placement_choice, replay_plans, result_rows,
                       timed_shares, write_expert_shares)
from .replay import ReplayConfig, SimResult, make_batches, simulate, static_plan
from .system import SystemSpec, SystemSpecError, hydra_system, resolve_system

DEFAULT_DISTRIBUTION = ["uniform", "global_profile", "phase_profile", "step_profile", "last_batch", "ema", "token_mix"]
DEFAULT_TOKEN = ["most_frequent", "token_table", "position_table", "cross_layer", "ffn"]


@dataclass
class GuideConfig:
    trace: str = "deepseek"  # "deepseek" | "synthetic" | a RoutingTrace parquet file/folder | CSV folder
    train: str | None = None  # with test: fit on this trace, replay that one (trace is then unused)
    test: str | None = None
    limit: int | None = checked(None, all_or_first_n)  # first N requests (null = all)
    # model shape to cost the routing with (moegps.shapes); None: the trace's model, else by its expert count.
    # Named "shape" (as in moegps.sweep) because a "model=" override would select the moegps/conf/model/ group.
    shape: str | None = None
    system: Any = "h100_8gpu"  # a profile name, or its fields (the hydra app passes moegps/conf/system/<name>.yaml's)
    extra_slots: int | None = checked(None, optional(nonnegative))  # override the profile's extra expert slots per GPU (0 = no replicas)
    gpus: list[int] = checked([8], each(positive))
    link_gbps: list[float] = checked([900.0, 450.0, 200.0, 64.0, 32.0], each(positive))  # GB/s
    batch_sizes: list[int] = checked([1, 4, 16, 64], each(positive))  # requests per batch (slots when not static)
    batching: str = checked("static", one_of("static", "continuous", "chunked", "packed"))  # ReplayConfig.batching
    chunk: int = checked(256, positive)  # prompt tokens a step (chunked), or tokens a step (packed)
    answers: str = checked("trace", one_of("trace", "uniform"))  # ReplayConfig.answers (uniform: drawn lengths)
    attention_context: bool = False  # ReplayConfig.attention_context (KV-cache reads and attention FLOPs by position)
    history_tokens: int = checked(0, nonnegative)  # ReplayConfig.history_tokens (cached context before the trace)
    skews: list[float] = checked([1.0], each(nonnegative))  # synthetic trace only
    synthetic: dict[str, Any] = field(default_factory=dict)  # synthetic_trace arguments, e.g. {prompt_len: [512, 512]}
    phase: str = checked("all", one_of("prefill", "decode", "all"))
    attention: str = checked("dp", one_of("dp", "tp"))
    source: str = checked("token", one_of("token", "request"))
    placement: Any = "auto"  # "auto", or the moegps/conf/placement option picked (placement=balanced)
    interval: int = checked(1, positive)
    test_fraction: float = checked(0.5, fraction)
    split: str = checked("arrival", one_of("arrival", "random"))  # arrival (the last requests by id are replayed) | random (drawn with seed)
    seed: int = checked(0, nonnegative)
    distribution: list[str] = checked(list(DEFAULT_DISTRIBUTION), each(one_of(*REGISTRY), nonempty=False))
    token: list[str] = checked(list(DEFAULT_TOKEN), each(one_of(*REGISTRY), nonempty=False))
    token_placement_from: str | None = "global_profile"  # also try each token predictor over this plan's placement
    predictor_args: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ffn": {"epochs": 2}})
    out: str = "outputs/guide"
    expert_table: str | None = None  # moegps.kernels.bench bench.csv: measured expert time instead of the roofline
    expert_table_shape: str | None = None  # which shape rows of that table; None: the trace's model shape
    expert_time: str = checked("roofline", one_of("roofline", "kernels"))  # kernels: each GPU's share timed on this device
    study: str = checked("predictors", one_of("predictors", "placement"))  # "predictors" (the decision sweep) | "placement" (prefill-aware placement study)


register("guide_schema", GuideConfig)


def workload(cfg: GuideConfig, skew: float = 1.0) -> Workload:
    """The guide's workload: train and test requests of its trace(s) and the shape to cost them at."""
    return load_workload(trace=cfg.trace, train=cfg.train, test=cfg.test, test_fraction=cfg.test_fraction,
                         split=cfg.split, seed=cfg.seed, limit=cfg.limit, shape=cfg.shape, skew=skew,
                         synthetic=cfg.synthetic)


# ---- the sweep ----------------------------------------------------------------------------------


def replay_columns(cfg: GuideConfig) -> dict[str, Any]:
    """The replay settings every table and results row of a guide run carries, so that runs differing only
    there are told apart by their rows, not only by their config.json."""
    return {"source": cfg.source, "phase": cfg.phase, "attention": cfg.attention, "batching": cfg.batching,
            "chunk": cfg.chunk, "answers": cfg.answers, "attention_context": cfg.attention_context,
            "history_tokens": cfg.history_tokens}


def replay_config(cfg: GuideConfig, batch: int) -> ReplayConfig:
    """The replay the guide's fields describe, at one of its batch sizes."""
    return ReplayConfig(batch_size=batch, **replay_columns(cfg))


def _expert_table(cfg: GuideConfig, work: Workload):
    """The expert part's measurements, if any: each GPU's share timed on this device's kernels
    (``expert_time=kernels``), or the kernels' benchmark times for the workload's model shape."""
    if cfg.expert_time == "kernels":
        if cfg.expert_table:
            raise ConfigError("config fields 'expert_time' = kernels and 'expert_table' both measure the expert part: "
                              "set one")
        # lazy: torch and the kernels, which the roofline needs none of (DESIGN.md, import rule 5)
        from ..executor.expert_timer import KernelExpertTimer
        return KernelExpertTimer(work.shape)
    if not cfg.expert_table:
        return None
    # a shape chosen by expert count is named 'mixtral-8x7b (by expert count)': its registry name is the first word
    return load_kernel_bench(cfg.expert_table, cfg.expert_table_shape or work.shape.name.split(" ")[0])


def _base_system(cfg: GuideConfig) -> SystemSpec:
    base = resolve_system(cfg.system)
    return base if cfg.extra_slots is None else base.replace(extra_slots_per_gpu=int(cfg.extra_slots))


def _variant_system(base: SystemSpec, gpus: int, link_gbps: float) -> SystemSpec:
    try:
        return _variant(base, gpus, link_gbps)
    except SystemSpecError as e:  # the variant is the guide's doing: name the fields that made it
        raise SystemSpecError(f"{e} (config fields 'gpus' = {gpus}, 'link_gbps' = {link_gbps}, 'extra_slots' "
                              f"= {base.extra_slots_per_gpu}: choose more GPUs or fewer extra slots)") from None


def _variant(base: SystemSpec, gpus: int, link_gbps: float) -> SystemSpec:
    if base.topology == "mesh2d":
        if gpus != base.n_gpus:
            raise ValueError(f"{base.name}: a mesh profile keeps its {base.n_gpus} devices; set gpus=[{base.n_gpus}]")
        return base.replace(link_bandwidth=link_gbps * 1e9)
    per_node = gpus if base.topology == "full_mesh" else min(base.gpus_per_node, gpus)
    return base.replace(n_gpus=gpus, gpus_per_node=per_node, link_bandwidth=link_gbps * 1e9)


def run_guide(cfg: GuideConfig, progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The whole sweep; returns the decision table and the results rows. With ``expert_time=kernels``
    the table's ``attrs["expert_shares"]`` holds the GPU shares timed (``pipeline.timed_shares``' frames)."""
    from tqdm import tqdm

    base = _base_system(cfg)
    placement, fields = placement_choice(cfg.placement)
    rows, decisions, shares = [], [], []
    for skew in cfg.skews if cfg.trace == "synthetic" and cfg.train is None else [float("nan")]:
        work = workload(cfg, skew)
        table = _expert_table(cfg, work)
        preds = fit_predictors(work.data, {n: cfg.predictor_args.get(n, {}) for n in cfg.distribution + cfg.token})
        token_cache: dict[str, np.ndarray] = {}
        combos = [(g, b) for g in cfg.gpus for b in cfg.batch_sizes]
        for gpus, batch in tqdm(combos, desc=f"guide {work.data.name}", disable=not progress):
            system0 = _variant_system(base, gpus, cfg.link_gbps[0])
            rcfg = replay_config(cfg, batch)
            by_bw = replay_plans(work, preds, system0, rcfg, placement, cfg.interval, table,
                                 cfg.token_placement_from, placement_fields=fields, token_cache=token_cache,
                                 link_gbps=cfg.link_gbps)
            for bw, results in by_bw.items():
                variant = {"trace": work.data.name, "skew": skew, "gpus": gpus, "link_gbps": bw,
                           "batch_size": batch, **replay_columns(cfg), "placement": placement, "interval": cfg.interval, "system": base.name,
                           "extra_slots": base.extra_slots_per_gpu, "model_shape": work.shape.name}
                rows += result_rows(results, variant, _variant_system(base, gpus, bw), work)
                decisions.append({**decide(variant, results), "protocol": work.data.describe()})
        shares += timed_shares(table)  # kept as frames: the next skew's timer replaces this one and its weights
    frame = pd.DataFrame(decisions)
    frame.attrs["expert_shares"] = shares
    return frame, rows


def decide(variant: dict[str, Any], results: list[SimResult]) -> dict[str, Any]:
    """One decision-table row from a variant's results (families: baseline, distribution, token, oracle)."""
    by = {r.plan: r for r in results}
    out = dict(variant)
    out["baseline_ms"] = by["static"].total * 1e3
    out["oracle_ms"] = by["oracle"].total * 1e3
    for family in ("distribution", "token"):
        fam = [r for r in results if r.family == family]
        if fam:
            best = min(fam, key=lambda r: r.total)
            out[f"best_{family}"] = best.plan
            out[f"{family}_ms"] = best.total * 1e3
            out[f"{family}_accuracy"] = best.accuracy
        else:
            out[f"best_{family}"], out[f"{family}_ms"], out[f"{family}_accuracy"] = "", np.nan, np.nan
    d, t = out["distribution_ms"], out["token_ms"]
    out["gain_dist_over_token"] = t / d - 1 if np.isfinite(d) and np.isfinite(t) else np.nan
    best_plan = min((r for r in results if r.family in ("baseline", "distribution", "token")), key=lambda r: r.total)
    out["winner"] = best_plan.plan
    out["winner_family"] = best_plan.family
    out["speedup_vs_baseline"] = out["baseline_ms"] / (best_plan.total * 1e3)
    return out


# ---- the placement study -----------------------------------------------------------------------


def placement_study(cfg: GuideConfig, progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The 2025 study's question on our traces: how much faster is the MoE part with a placement made
    from the training requests' loads (per phase) than with the static one, held fixed over the
    replay of the test requests?

    Placements: static contiguous; balanced duplication from all loads, from prefill loads only, from
    decode loads only; prefill-aware (``objective="max"`` and ``"weighted"`` by the phases' shares
    of tokens). One row per (variant, placement, phase) with MoE and total time and the speedup on
    MoE time over static.
    """
    base = _base_system(cfg)
    work = workload(cfg, cfg.skews[0] if cfg.skews else 1.0)
    table_times = _expert_table(cfg, work)
    train, n_experts = work.data.train, work.n_experts
    loads = {ph: train.loads(by="all", phase=ph).counts[0].astype(np.float64) for ph in ("prefill", "decode")}
    all_loads = loads["prefill"] + loads["decode"]
    has = {ph: loads[ph].sum() > 0 for ph in loads}
    share_tokens = np.array([loads["prefill"].sum(), loads["decode"].sum()], dtype=np.float64)
    rows, table = [], []
    for gpus in cfg.gpus:
        system = _variant_system(base, gpus, cfg.link_gbps[0])
        slots = system.slots_per_gpu(n_experts)
        candidates = {"static": None, "balanced_all": place("balanced", all_loads, gpus, slots)}
        for ph in ("prefill", "decode"):
            if has[ph]:
                candidates[f"balanced_{ph}"] = place("balanced", loads[ph], gpus, slots)
        if all(has.values()):
            phase_loads = np.stack([loads["prefill"], loads["decode"]])
            candidates["prefill_aware_max"] = place("prefill_aware", phase_loads, gpus, slots, objective="max")
            candidates["prefill_aware_weighted"] = place("prefill_aware", phase_loads, gpus, slots,
                                                         phase_weights=share_tokens / share_tokens.sum(),
                                                         objective="weighted")
        for batch in cfg.batch_sizes:
            rcfg = replay_config(cfg, batch)
            batches = make_batches(work.test_routing, gpus, n_experts, rcfg)
            results = {}
            for name, placement in candidates.items():
                plan = static_plan(batches, None if placement is None else placement.share(), name)
                results[name] = simulate(batches, plan, work.shape, system, rcfg, table_times)
            for name, res in results.items():
                variant = {"trace": work.data.name, "gpus": gpus, "link_gbps": cfg.link_gbps[0], "batch_size": batch,
                           **replay_columns(cfg), "system": base.name, "model_shape": work.shape.name,
                           "study": "placement", "extra_slots": base.extra_slots_per_gpu}
                rows += result_rows([res], {**variant, "placement": name}, system, work)
                for phase_name, mask in (("all", np.ones(batches.n_steps, bool)), ("prefill", batches.phase == 0),
                                         ("decode", batches.phase == 1)):
                    if not mask.any():
                        continue
                    moe = lambda r: sum(r.parts[c][mask].sum() for c in ("dispatch", "expert", "combine", "overhead"))  # noqa: E731
                    expert = lambda r: r.parts["expert"][mask].sum()  # noqa: E731
                    table.append({**variant, "placement": name, "phase": phase_name,
                                  "expert_ms": expert(res) * 1e3, "moe_ms": moe(res) * 1e3,
                                  "total_ms": res.step_time[mask].sum() * 1e3,
                                  "imbalance": float(res.imbalance[mask].mean()),
                                  "expert_speedup": expert(results["static"]) / expert(res),
                                  "moe_speedup": moe(results["static"]) / moe(res),
                                  "protocol": work.data.describe()})
    frame = pd.DataFrame(table)
    frame.attrs["expert_shares"] = timed_shares(table_times)
    return frame, rows


# ---- outputs ------------------------------------------------------------------------------------

_COLOURS = {"distribution": "#4c78a8", "token": "#f58518", "baseline": "#bab0ac"}


def plot_decisions(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Decision regions: x = link bandwidth, y = batch size (or skew when several), one panel per
    GPU count (and skew/batch otherwise); cell colour = winning family, label = token/dist - 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    y_axis = "skew" if table["skew"].nunique() > 1 else "batch_size"
    # synthetic traces are named by their skew, so with a skew axis the panels go by GPUs and batch only
    panel_keys = ["gpus", "batch_size"] if y_axis == "skew" else ["trace", "gpus"]
    panels = list(table.groupby(panel_keys, sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 4.8 * len(panels)), 4.8), squeeze=False)
    for ax, (key, sub) in zip(axes[0], panels):
        xs = sorted(sub.link_gbps.unique())
        ys = sorted(sub[y_axis].unique())
        for _, r in sub.iterrows():
            i, j = xs.index(r.link_gbps), ys.index(r[y_axis])
            ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, color=_COLOURS[r.winner_family], alpha=0.85))
            gain = r.gain_dist_over_token
            winner = str(r.winner).replace("+", "\n+")
            ax.text(i, j, f"{gain:+.1%}\n{winner}" if np.isfinite(gain) else winner,
                    ha="center", va="center", fontsize=6.5)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(-0.5, len(ys) - 0.5)
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set_xlabel("link bandwidth per GPU per direction (GB/s)")
        ax.set_ylabel("routing skew (Zipf exponent)" if y_axis == "skew" else "batch size (requests)")
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, key if isinstance(key, tuple) else (key,))),
                     fontsize=8)
    handles = [Patch(color=c, label=f"{f} wins") for f, c in _COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle((title + "\n" if title else "") + "cell: t(best token-to-expert) / t(best distribution-only) - 1\n"
                 "and the plan that wins end to end", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.9))
    return save_png(fig, path)


PREFILL_AWARE_CLAIM = 1.25  # the 2025 data-movement study (arXiv 2510.05497): up to 1.25x on MoE computation
_PHASE_COLOURS = {"all": "#4c78a8", "prefill": "#f58518", "decode": "#54a24b"}


def _short(placement: str) -> str:
    return placement.replace("balanced_", "bal.\n").replace("prefill_aware_", "pf-aware\n")


def plot_placement(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """The placement study as bars: per (GPUs, batch size) panel, each placement's speedup of expert
    time over static contiguous placement on all, prefill and decode steps; dashed line at 1.25x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in dict.fromkeys(table["placement"]) if n != "static"]
    phases = [ph for ph in _PHASE_COLOURS if ph in set(table["phase"])]
    gpus, batches = sorted(table["gpus"].unique()), sorted(table["batch_size"].unique())
    fig, axes = plt.subplots(len(gpus), len(batches), figsize=(2.9 * len(batches) + 0.6, 2.6 * len(gpus) + 1.2),
                             squeeze=False, sharey=True)
    width = 0.8 / len(phases)
    for i, g in enumerate(gpus):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            sub = table[(table["gpus"] == g) & (table["batch_size"] == b)].set_index(["placement", "phase"])
            for k, ph in enumerate(phases):
                values = [sub["expert_speedup"].get((n, ph), np.nan) for n in names]
                ax.bar(np.arange(len(names)) + (k - (len(phases) - 1) / 2) * width, values, width,
                       color=_PHASE_COLOURS[ph], label=f"{ph} steps")
            ax.axhline(1.0, color="grey", lw=0.7)
            ax.axhline(PREFILL_AWARE_CLAIM, color="crimson", ls="--", lw=1)
            ax.set_xticks(range(len(names)), [_short(n) for n in names], fontsize=6)
            ax.set_title(f"{g} GPUs, batch {b}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("expert time: static / placement", fontsize=7)
    low, high = np.nanmin(table["expert_speedup"]), np.nanmax(table["expert_speedup"])
    axes[0][0].set_ylim(max(0.0, min(low, 1.0) - 0.1), max(high, PREFILL_AWARE_CLAIM) + 0.08)
    axes[0][0].annotate("2025 study: 1.25x", (0.02, PREFILL_AWARE_CLAIM), xycoords=("axes fraction", "data"),
                        color="crimson", va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(phases), fontsize=7)
    fig.suptitle((title or "placement study: speedup of expert time over static contiguous placement")
                 + "\nbal. = balanced duplication on the training split's all / prefill / decode loads; "
                 "pf-aware = prefill-aware (max or token-weighted objective)", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return save_png(fig, path)


def write_outputs(table: pd.DataFrame, rows: list[dict[str, Any]], out: Path, config: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rows": write_rows(rows, out / "rows.parquet"), "decision": out / "decision.csv",
             "plot": out / "decision.png", "config": out / "config.json"}
    with atomic_path(paths["decision"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths["config"]) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2, default=str))
    system = config.get("system")
    system = system.get("name") if isinstance(system, dict) else system
    protocol = table["protocol"].iloc[0] if "protocol" in table and len(table) else ""
    plot_decisions(table, paths["plot"], title=f"{table['trace'].iloc[0] if len(table) else config.get('trace')} on "
                   f"{system}, phase={config.get('phase')}, attention={config.get('attention')}, simulated\n{protocol}")
    return paths


SHOW = ["trace", "skew", "gpus", "link_gbps", "batch_size", "baseline_ms", "best_distribution", "distribution_ms",
        "best_token", "token_ms", "oracle_ms", "gain_pct", "winner"]


def printed_table(table: pd.DataFrame) -> pd.DataFrame:
    """The decision table as the terminal shows it: the gain in percent (``gain_pct``, as the plot
    labels it), not the fraction the CSV keeps (``gain_dist_over_token``)."""
    table = table.assign(gain_pct=100 * table["gain_dist_over_token"]) if "gain_dist_over_token" in table else table
    return table[[c for c in SHOW if c in table.columns]]


def app(raw) -> None:
    """The command on a composed config (moegps/conf/guide.yaml): simulate, write, print."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(raw, resolve=True)
    hydra_system(config)
    cfg = validate(config, GuideConfig, "simulator.guide")
    t0 = time.perf_counter()
    if cfg.study == "placement":
        table, rows = placement_study(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_rows(rows, out / "rows.parquet")
        with atomic_path(out / "placement.csv") as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(out / "config.json") as tmp:
            Path(tmp).write_text(json.dumps(config, indent=2, default=str))
        system = config.get("system")
        system = system.get("name") if isinstance(system, dict) else system
        plot_placement(table, out / "placement.png", title=f"{table['trace'].iloc[0]} on {system}, extra slots "
                       f"{table['extra_slots'].iloc[0]}, simulated: expert time, static / placement\n"
                       f"{table['protocol'].iloc[0]}")
        print(table["protocol"].iloc[0])
        with pd.option_context("display.width", 250, "display.max_rows", 500, "display.float_format", "{:.4g}".format):
            print(table.drop(columns=["system", "model_shape", "study", "protocol"]).to_string(index=False))
        print(f"wrote {out}/placement.csv, placement.png and rows.parquet in {time.perf_counter() - t0:.1f} s"
              + write_expert_shares(table.attrs["expert_shares"], out))
        return
    table, rows = run_guide(cfg)
    paths = write_outputs(table, rows, Path(cfg.out), config)
    print(table["protocol"].iloc[0])
    show = printed_table(table)
    if "skew" in show and show["skew"].isna().all():
        show = show.drop(columns="skew")
    with pd.option_context("display.width", 250, "display.max_rows", 500, "display.float_format", "{:.4g}".format):
        print(show.to_string(index=False))
    print(f"{len(rows)} runs simulated in {time.perf_counter() - t0:.1f} s; " + json.dumps({k: str(v) for k, v in paths.items()})
          + write_expert_shares(table.attrs["expert_shares"], Path(cfg.out)))



def main() -> None:
    hydra_command(app, "guide", "simulator.guide", errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
