"""Reports: tables and plots over traces and results. ``python -m moegps.report <report> ...``

One function per report, dispatched by name:

- ``routing TRACE [--out DIR] [--domains]``: how a trace routes, side by side with the real
  Mixtral-8x7B (and OLMoE) statistics of ``olmoe-routing`` (see :func:`routing_report`).
- ``results STORE [--out DIR]``: the tables and plots of a results store (a ``moegps.sweep``
  folder): predictor accuracy against overhead, decision regions across bandwidth and batch size,
  imbalance by placement and slots, simulated against measured time (see :func:`results_report`).

The statistics are pure functions of arrays (``load_shares``, ``token_id_hit_rate``,
``cross_layer_joint``, ``affinity_summary``) so that notebooks and tests can call them directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .configs import run_command
from .files import atomic_path, save_png
from .importers.olmoe_routing import (
    LAYER_IDS, available_domains, load_crosslayer_counts, load_eid2token, load_expert_counts,
)
from .results import ResultsError, read_results
from .trace import RoutingTrace
from .workloads import load_trace

# ---- statistics (arrays in, arrays out) ---------------------------------------------------------


def token_id_hit_rate(token_id: np.ndarray, experts: np.ndarray, n_experts: int, k: int | None = None) -> float:
    """Oracle top-k hit rate of a per-token-id lookup table, in sample.

    ``token_id [rows]``, ``experts [rows, top_k]`` (one layer). For each token id, the ``k``
    (default ``top_k``) experts it chose most often cover some share of its selections; the result
    is that share over all rows: how much of a token's routing its id alone explains (an upper
    bound for a most-frequent-given-token predictor). Rows with ``token_id < 0`` are ignored;
    NaN if none remain.
    """
    keep = token_id >= 0
    if not keep.any():
        return float("nan")
    token_id, experts = token_id[keep], experts[keep]
    k = experts.shape[1] if k is None else k
    uniq, inv = np.unique(token_id, return_inverse=True)
    counts = np.bincount(
        (np.repeat(inv.reshape(-1), experts.shape[1]) * n_experts + experts.reshape(-1).astype(np.int64)),
        minlength=len(uniq) * n_experts,
    ).reshape(len(uniq), n_experts)
    return float(np.sort(counts, axis=1)[:, -k:].sum() / counts.sum())


def token_id_hit_rate_heldout(
    request_id: np.ndarray, token_id: np.ndarray, experts: np.ndarray, n_experts: int, k: int | None = None
) -> tuple[float, float]:
    """Out-of-sample version of :func:`token_id_hit_rate`: the lookup table is built on the even
    requests and scored on the odd ones, then the other way round. Returns (hit rate over the
    scored rows whose token id the table had seen, share of rows it had seen). NaN without data."""
    k = experts.shape[1] if k is None else k
    keep = token_id >= 0
    if not keep.any():
        return float("nan"), float("nan")
    request_id, token_id, experts = request_id[keep], token_id[keep], experts[keep]
    uniq, inv = np.unique(token_id, return_inverse=True)
    inv = inv.reshape(-1)
    half = (request_id % 2).astype(np.int64)
    flat = ((half * len(uniq) + inv)[:, None] * n_experts + experts.astype(np.int64)).reshape(-1)
    counts = np.bincount(flat, minlength=2 * len(uniq) * n_experts).reshape(2, len(uniq), n_experts)
    covered = seen = total = 0
    for fit in (0, 1):
        table = np.argsort(-counts[fit], axis=1, kind="stable")[:, :k]  # [token, k] most frequent experts
        known = counts[fit].sum(axis=1) > 0
        score = counts[1 - fit]
        covered += np.take_along_axis(score, table, axis=1)[known].sum()
        seen += score[known].sum()
        total += score.sum()
    if seen == 0:
        return float("nan"), 0.0
    return float(covered / seen), float(seen / total)


def hit_rate_from_counts(token_expert: np.ndarray, k: int) -> float:
    """The same statistic from aggregate counts ``token_expert[token_id, expert]`` (e.g. eid2token)."""
    counts = np.asarray(token_expert)
    return float(np.sort(counts, axis=1)[:, -k:].sum() / max(counts.sum(), 1))


def cross_layer_joint(experts_a: np.ndarray, experts_b: np.ndarray, n_experts: int, slot_aligned: bool) -> np.ndarray:
    """``[E, E]`` counts of (expert a at layer l, expert b at layer l') over tokens.

    ``experts_a``, ``experts_b``: ``[token, top_k]`` at the two layers, same tokens. ``slot_aligned``
    pairs the i-th choice with the i-th (the form of the OLMoE-paper statistics); otherwise every
    choice at ``a`` with every choice at ``b`` (set semantics, right when slot order is not router
    order).
    """
    a = experts_a.astype(np.int64)
    b = experts_b.astype(np.int64)
    if slot_aligned:
        flat = a.reshape(-1) * n_experts + b.reshape(-1)
    else:
        flat = (a[:, :, None] * n_experts + b[:, None, :]).reshape(-1)
    return np.bincount(flat, minlength=n_experts * n_experts).reshape(n_experts, n_experts)


def affinity_summary(joint: np.ndarray) -> dict[str, float]:
    """Summary of a cross-layer joint count matrix ``[E, E]``:

    - ``mi_bits``: mutual information of (a, b) in bits (0 = the next layer's choice ignores this one);
    - ``max_row_p``: mean over a (weighted by its count) of max_b P(b | a), against
    - ``max_col_p``: max_b P(b), what the same number would be without any affinity;
    - ``lift``: ``max_row_p / max_col_p``.
    """
    p = joint / max(joint.sum(), 1)
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    cond = p / np.maximum(pa[:, None], 1e-300)
    max_row = float((pa * cond.max(axis=1)).sum())
    return {"mi_bits": mi, "max_row_p": max_row, "max_col_p": float(pb.max()), "lift": max_row / float(pb.max())}


def request_domains(trace: RoutingTrace) -> dict[int, str] | None:
    """``{request_id: domain}`` from ``meta.recorded['request_domain']`` (keys may be strings), or None."""
    raw = trace.meta.recorded.get("request_domain")
    if not raw:
        return None
    return {int(k): str(v) for k, v in raw.items()}


# ---- routing report -----------------------------------------------------------------------------


@dataclass
class RoutingReportConfig:
    trace: str
    out: str = "reports/routing"
    domains: bool = False  # group by meta.recorded['request_domain'] too
    reference: bool = True  # add the real Mixtral-8x7B / OLMoE statistics (needs shared data)
    max_domains: int = 12  # plot at most this many domains (largest first)


def _trace_rows(trace: RoutingTrace, label: str, group: str) -> tuple[list[dict], dict]:
    """Per-layer statistics of one slice of a trace: summary rows and the arrays for plots."""
    m = trace.meta
    loads = trace.loads(by="all")
    shares = loads.fractions[0]  # [layer, E]
    imb = loads.imbalance()[0]
    rows, joints = [], {}
    tb = trace.by_token() if len(trace) else None
    for l in range(m.n_layers):
        sel = trace.layer == l
        row = {
            "source": label,
            "group": group,
            "layer": l,
            "layer_id": m.layer_ids[l],
            "tokens": int(np.count_nonzero(sel)),
            "max_mean": float(imb[l]),
            "min_mean": float(loads.counts[0, l].min() / max(loads.counts[0, l].mean(), 1e-300)),
            "hit_rate": token_id_hit_rate(trace.token_id[sel], trace.experts[sel], m.n_experts),
        }
        row["hit_rate_heldout"], row["heldout_seen"] = token_id_hit_rate_heldout(
            trace.request_id[sel], trace.token_id[sel], trace.experts[sel], m.n_experts
        )
        if tb is not None and l + 1 < m.n_layers:
            # plug-in MI is biased upward by about (E-1)^2 / (2 N ln 2) bits for N tokens (Miller-Madow)
            row["next_mi_bias_bits"] = (m.n_experts - 1) ** 2 / (2 * max(len(tb.experts), 1) * np.log(2))
            for slot_aligned in (True, False):
                j = cross_layer_joint(tb.experts[:, l], tb.experts[:, l + 1], m.n_experts, slot_aligned)
                s = affinity_summary(j)
                key = "slot" if slot_aligned else "set"
                row[f"next_mi_bits_{key}"] = s["mi_bits"]
                row[f"next_lift_{key}"] = s["lift"]
                joints[(l, key)] = j
        rows.append(row)
    return rows, {"shares": shares, "imbalance": imb, "joints": joints, "hits": np.array([r["hit_rate"] for r in rows])}


def _reference_rows(model: str) -> tuple[list[dict], dict]:
    """The same statistics from the real OLMoE-paper counts of ``model`` (per domain)."""

    loads = load_expert_counts(model, [d for d in available_domains(model) if d != "tulu"])
    label = {"mistral": "real Mixtral-8x7B", "olmoe": "real OLMoE-1B-7B"}[model]
    rows, joints = [], {}
    for i, domain in enumerate(loads.groups["domain"]):
        try:
            e2t = load_eid2token(model, domain)
        except FileNotFoundError:
            e2t = None
        pairs = load_crosslayer_counts(model, domain)
        for l, layer_id in enumerate(LAYER_IDS):
            c = loads.counts[i, l]
            row = {
                "source": label,
                "group": f"domain={domain}",
                "layer": l,
                "layer_id": layer_id,
                "tokens": int(c.sum() // loads.top_k),
                "max_mean": float(c.max() / c.mean()),
                "min_mean": float(c.min() / c.mean()),
                "hit_rate": hit_rate_from_counts(e2t[l].T.toarray(), loads.top_k) if e2t is not None else float("nan"),
            }
            if l + 1 < len(LAYER_IDS):
                j = pairs[(layer_id, LAYER_IDS[l + 1])]
                s = affinity_summary(j)
                row["next_mi_bits_slot"] = s["mi_bits"]
                row["next_lift_slot"] = s["lift"]
                row["next_mi_bias_bits"] = (len(c) - 1) ** 2 / (2 * row["tokens"] * np.log(2))
                joints[(str(domain), l)] = j
            rows.append(row)
    hits = np.array([r["hit_rate"] for r in rows]).reshape(len(loads.groups["domain"]), len(LAYER_IDS))
    return rows, {"loads": loads, "joints": joints, "hits": hits}


def _markdown(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(c.replace("nan", "") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def routing_report(cfg: RoutingReportConfig) -> dict[str, Path]:
    """Routing statistics of a trace, beside the real Mixtral-8x7B (and OLMoE) ones. Writes to ``cfg.out``:

    - ``routing_layers.csv`` / ``.md``: one row per (source, group, layer): max/mean and min/mean
      expert load, oracle token-id top-k hit rate, cross-layer affinity to the next MoE layer
      (mutual information in bits and lift of max P(b|a) over max P(b); ``slot`` = i-th choice to
      i-th, the form of the real statistics; ``set`` = all choice pairs);
    - ``routing_summary.md``: the same averaged over layers per (source, group), printed too;
    - ``load_shares.csv``: long table (source, group, layer, expert, share);
    - ``load_shares.png``, ``skew_hit_rate.png``, ``cross_layer.png``; ``report_config.json``.
    Groups of the trace: ``phase=prefill``, ``phase=decode`` (each when present) and, with
    ``cfg.domains``, ``domain=<d>`` from ``meta.recorded['request_domain']``.
    """
    import pandas as pd

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = load_trace(cfg.trace)
    m = trace.meta
    label = f"trace: {m.model}"

    slices: list[tuple[str, RoutingTrace]] = []
    for phase in ("prefill", "decode"):
        t = trace.select(trace.phase_mask(phase))
        if len(t):
            slices.append((f"phase={phase}", t))
    notes = []
    if cfg.domains:
        mapping = request_domains(trace)
        if mapping is None:
            notes.append("--domains: the trace has no meta.recorded['request_domain']; per-domain rows skipped")
        else:
            dom = np.array([mapping.get(int(r), "?") for r in trace.requests()])
            req = trace.requests()
            names, sizes = np.unique(dom, return_counts=True)
            for name in names[np.argsort(-sizes)][: cfg.max_domains]:
                slices.append((f"domain={name}", trace.with_requests(req[dom == name])))
            if len(names) > cfg.max_domains:
                notes.append(f"--domains: {len(names)} domains, the {cfg.max_domains} largest shown")

    rows, plots = [], {}
    for group, t in slices:
        r, p = _trace_rows(t, label, group)
        rows += r
        plots[group] = p
    refs = {}
    if cfg.reference:
        for model in ("mistral", "olmoe"):
            try:
                r, p = _reference_rows(model)
            except FileNotFoundError as e:
                notes.append(f"reference {model} skipped: {e}")
                continue
            rows += r
            refs[model] = p
    columns = ["source", "group", "layer", "layer_id", "tokens", "max_mean", "min_mean", "hit_rate", "hit_rate_heldout",
               "heldout_seen", "next_mi_bits_slot", "next_lift_slot", "next_mi_bits_set", "next_lift_set",
               "next_mi_bias_bits"]
    df = pd.DataFrame(rows).reindex(columns=columns)  # a one-layer trace has no affinity columns
    summary = (
        df.groupby(["source", "group"], sort=False)
        .agg(layers=("layer", "size"), tokens=("tokens", "max"), max_mean=("max_mean", "mean"),
             max_mean_worst=("max_mean", "max"), hit_rate=("hit_rate", "mean"),
             hit_rate_heldout=("hit_rate_heldout", "mean"),
             next_mi_bits_slot=("next_mi_bits_slot", "mean"), next_lift_slot=("next_lift_slot", "mean"),
             next_mi_bits_set=("next_mi_bits_set", "mean"), next_lift_set=("next_lift_set", "mean"),
             next_mi_bias_bits=("next_mi_bias_bits", "mean"))
        .reset_index()
    )

    share_rows = []
    for group, p in plots.items():
        for l in range(m.n_layers):
            for e in range(m.n_experts):
                share_rows.append((label, group, m.layer_ids[l], e, float(p["shares"][l, e])))
    for model, p in refs.items():
        f = p["loads"].fractions
        for i, d in enumerate(p["loads"].groups["domain"]):
            for l, layer_id in enumerate(p["loads"].layer_ids):
                for e in range(f.shape[2]):
                    share_rows.append((model, f"domain={d}", layer_id, e, float(f[i, l, e])))
    shares = pd.DataFrame(share_rows, columns=["source", "group", "layer_id", "expert", "share"])

    files = {}
    for name, frame in (("routing_layers.csv", df), ("load_shares.csv", shares)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
        files[name] = out / name
    header = (
        f"# Routing report: {m.model}\n\ntrace `{cfg.trace}`: {len(trace.requests())} requests, {trace.n_tokens} tokens, "
        f"{m.n_layers} MoE layers x {m.n_experts} experts, top-{m.top_k}; source `{m.source}`.\n\n"
        "max_mean: max/mean expert load (1 = even), averaged over layers (worst layer beside it); hit_rate: oracle "
        "top-k hit rate of a per-token-id lookup (in sample; hit_rate_heldout: table fitted on even requests, scored "
        "on odd ones and back, over tokens whose id it had seen); next_mi_bits / next_lift: cross-layer affinity to "
        "the next recorded MoE layer (mutual information in bits; lift = mean max P(b|a) / max P(b)); `slot` pairs "
        "the i-th choice with the i-th (the only form the real Mixtral/OLMoE counts have, layers 0->7 and 7->15), "
        "`set` pairs all choices (use it when slot order is not router order, as in the DeepSeek CSVs); "
        "next_mi_bias_bits: the upward bias of the plug-in MI estimate for this many tokens (subtract it before "
        "comparing sources of different sizes).\n\n"
    )
    text = header + _markdown(summary) + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
    for name, body in (("routing_summary.md", text), ("routing_layers.md", header + _markdown(df))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(body)
        files[name] = out / name
    with atomic_path(out / "report_config.json") as tmp:
        tmp.write_text(json.dumps({"report": "routing", **asdict(cfg)}, indent=2))
    files["report_config.json"] = out / "report_config.json"

    files.update(_routing_plots(out, m, plots, refs, label))
    print(text)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return files


def cross_layer_log_lift(joint: np.ndarray) -> np.ndarray:
    """``[E, E]`` log2 of P(b | a) / P(b) from a joint count matrix: affinity beyond the next layer's
    own load profile; NaN where the pair never occurred (no finite lift to show)."""
    p = joint / max(joint.sum(), 1)
    lift = p / np.maximum(p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True), 1e-300)
    with np.errstate(divide="ignore"):
        return np.where(p > 0, np.log2(np.where(p > 0, lift, 1.0)), np.nan)


def shared_lift_scale(log_lifts: list[np.ndarray], cap: float = 3.0, floor: float = 0.5) -> tuple[float, bool]:
    """One symmetric colour limit for every panel (the largest finite |log2 lift|, within
    [``floor``, ``cap``]) and whether any cell lies beyond it (then the plot says it clips)."""
    finite = np.concatenate([np.abs(x[np.isfinite(x)]) for x in log_lifts]) if log_lifts else np.zeros(0)
    largest = float(finite.max()) if finite.size else 1.0
    lim = float(np.clip(largest, floor, cap))
    return lim, bool(largest > lim)


def _routing_plots(out: Path, meta, plots: dict, refs: dict, label: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    groups = list(plots)
    # 1. load shares: one heatmap per trace group, then real Mixtral per domain
    panels = [(g, plots[g]["shares"], meta.layer_ids) for g in groups[:4]]
    if "mistral" in refs:
        ld = refs["mistral"]["loads"]
        for i, d in enumerate(ld.groups["domain"]):
            panels.append((f"real Mixtral-8x7B, {d}", ld.fractions[i], ld.layer_ids))
    ncol = min(len(panels), 4)
    nrow = int(np.ceil(len(panels) / ncol))
    vmax = max(2.0, max(float((sh * sh.shape[1]).max()) for _, sh, _ in panels))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, (title, shares, layer_ids) in zip(axes.flat, panels):
        E = shares.shape[1]
        im = ax.imshow(shares * E, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer (model numbering)")
        ticks = np.linspace(0, len(layer_ids) - 1, min(len(layer_ids), 8)).round().astype(int)
        ax.set_yticks(ticks, [str(layer_ids[t]) for t in ticks])
        fig.colorbar(im, ax=ax, label="load / mean load")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Expert load shares: {label}", fontsize=10)
    fig.tight_layout()
    files["load_shares.png"] = out / "load_shares.png"
    save_png(fig, files["load_shares.png"], dpi=110)

    # 2. skew and token-id hit rate per layer, real models as bands (their layers 0, 7, 15)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5.2))
    x = np.arange(meta.n_layers)
    shown = groups[:8]  # the table has every group; the plot keeps to a readable few
    colors = {"mistral": "tab:green", "olmoe": "tab:purple"}
    names = {"mistral": "real Mixtral-8x7B", "olmoe": "real OLMoE-1B-7B"}
    # OLMoE's fine-grained skew (2.5-7.8) would flatten the scale for traces with few experts
    bands = {k: v for k, v in refs.items() if k == "mistral" or meta.n_experts >= 32}
    for ax, key, ylabel, title in (
        (a1, "imbalance", "max / mean expert load", "Load skew per layer"),
        (a2, "hits", f"oracle token-id top-{meta.top_k} hit rate (in sample)", "How much of the routing the token id explains"),
    ):
        for g in shown:
            ax.plot(x, plots[g][key], marker="o", ms=3, label=g)
        for model, ref in bands.items():
            v = ref["loads"].imbalance() if key == "imbalance" else ref["hits"]
            if np.isfinite(v).any():
                ax.axhspan(np.nanmin(v), np.nanmax(v), color=colors[model], alpha=0.18,
                           label=f"{names[model]}, layers {LAYER_IDS}, 5 domains: {np.nanmin(v):.2f}-{np.nanmax(v):.2f}")
        ticks = np.arange(0, meta.n_layers, int(np.ceil(meta.n_layers / 13)))
        ax.set_xticks(ticks, [str(meta.layer_ids[t]) for t in ticks])
        ax.set_xlabel("MoE layer (model numbering)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "hits":
            ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1 if len(shown) < 3 else 2,
                  frameon=False)
    fig.tight_layout()
    files["skew_hit_rate.png"] = out / "skew_hit_rate.png"
    save_png(fig, files["skew_hit_rate.png"], dpi=110)

    # 3. cross-layer affinity: P(b | a) of the trace's first pair beside real Mixtral 0 -> 7
    first = groups[0] if groups else None
    mats = []
    if first is not None and (0, "slot") in plots[first]["joints"]:
        mats.append((f"{first}: layer {meta.layer_ids[0]} -> {meta.layer_ids[1]} (slot)", plots[first]["joints"][(0, "slot")]))
        mats.append((f"{first}: layer {meta.layer_ids[0]} -> {meta.layer_ids[1]} (set)", plots[first]["joints"][(0, "set")]))
    if "mistral" in refs:
        j = sum(v for (d, l), v in refs["mistral"]["joints"].items() if l == 0)
        mats.append(("real Mixtral-8x7B: layer 0 -> 7 (slot, 5 domains)", j))
    if mats:
        lifts = [cross_layer_log_lift(j) for _, j in mats]
        lim, clipped = shared_lift_scale(lifts)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#9a9a9a")
        fig, axes = plt.subplots(1, len(mats), figsize=(4.4 * len(mats), 4.1), squeeze=False)
        for ax, (title, j), log_lift in zip(axes[0], mats, lifts):
            im = ax.imshow(np.ma.masked_invalid(log_lift), cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
            s = affinity_summary(j)
            ax.set_title(f"{title}\nMI {s['mi_bits']:.3f} bits, lift of max {s['lift']:.2f}", fontsize=8)
            ax.set_xlabel("expert b at the next layer")
            ax.set_ylabel("expert a")
        # one scale for every panel (so equal colours mean equal lift), one colour bar; arrows where it clips
        fig.colorbar(im, ax=list(axes[0]), label="log2 P(b | a) / P(b)", extend="both" if clipped else "neither")
        fig.suptitle(f"cross-layer affinity, one colour scale: ±{lim:g} (log2 lift)"
                     + ("; cells beyond it clipped to the end colours" if clipped else "")
                     + "; grey: pair never seen together", fontsize=8)
        files["cross_layer.png"] = out / "cross_layer.png"
        save_png(fig, files["cross_layer.png"], dpi=110, bbox_inches="tight")
    return files


# ---- results: the tables and plots of a results store (a sweep folder) ------------------------------
#
# Every function below takes the results table (``moegps.results`` rows, e.g. of ``moegps.sweep``) and
# returns a DataFrame; the plots take those tables. Speedups are computed here, at read time, against
# the baseline row of the same run (static contiguous placement, no predictor), never stored.

PREDICTOR, PLACEMENT, FAMILY = "config.predictor.name", "config.placement.name", "config.family"
LINK, BATCH, SLOTS = "config.system.link_gbps", "config.batch_size", "config.system.extra_slots"
VARIANT = ["config.trace", "config.system.name", "config.system.n_gpus", LINK, BATCH]  # one simulated system and load
FAMILY_COLOURS = {"distribution": "#4c78a8", "token": "#f58518", "baseline": "#bab0ac", "oracle": "#54a24b"}


def load_results(path: str | Path):
    """The results store under ``path`` (a sweep folder: its ``runs/``; or any folder/file of shards),
    with derived columns: ``trace_name`` (the trace's last two path parts, e.g. ``mixtral-tiny/mmlu-64``), ``baseline_ms`` and ``speedup``
    (baseline time / time; the baseline row of the same run, ``config.role == "baseline"``),
    ``predictor_us_per_token`` (predictor time on the critical path per token, microseconds) and
    ``predictor_work_us_per_token`` (all its work per token, hidden behind GEMMs or not)."""

    path = Path(path)
    df = read_results(path / "runs" if (path / "runs").is_dir() else path)
    for col, default in (("config.role", "run"), ("config.key", ""), (FAMILY, "")):
        if col not in df:
            df[col] = default
    df["trace_name"] = df["config.trace"].astype(str).map(lambda s: "/".join(Path(s).parts[-2:])) \
        if "config.trace" in df else ""
    if "config.trace_content" in df:  # one path that held other bytes: never averaged together
        content = df["config.trace_content"].fillna("").astype(str)
        several = content.groupby(df["trace_name"]).transform("nunique") > 1
        df.loc[several, "trace_name"] = df.loc[several, "trace_name"] + " @" + content[several].str.split(":").str[-1].str[:8]
    base = df[df["config.role"] == "baseline"].groupby("config.key")["total_ms"].first()
    df["baseline_ms"] = df["config.key"].map(base)
    df["speedup"] = df["baseline_ms"] / df["total_ms"]
    tokens = df["tokens"].where(df["tokens"] > 0)
    df["predictor_us_per_token"] = df["predictor_ms"] * 1e3 / tokens
    work = df["config.predictor_cost.work_ms"] if "config.predictor_cost.work_ms" in df else df["predictor_ms"]
    df["predictor_work_us_per_token"] = work * 1e3 / tokens
    return df.reset_index(drop=True)


def _runs(df, backend: str = "sim"):
    return df[(df["config.role"] == "run") & (df["backend"] == backend)]


def predictor_table(df):
    """Accuracy against overhead, one row per (trace, predictor): family, accuracy (recall@k for token
    predictors, 1 - TV for distribution-only), load error (TV), its work per token and the part of it
    on the critical path (us, from its cost report on the simulated GPU),
    and the mean and best end-to-end speedup over the baseline across the sweep's other axes."""
    runs = _runs(df)
    g = runs.groupby(["trace_name", PREDICTOR, FAMILY], dropna=False)
    out = g.agg(accuracy=("predictor_accuracy", "mean"), load_error_tv=("predictor_error", "mean"),
                work_us_per_token=("predictor_work_us_per_token", "mean"),
                exposed_us_per_token=("predictor_us_per_token", "mean"), speedup_mean=("speedup", "mean"),
                speedup_best=("speedup", "max"), runs=("total_ms", "size")).reset_index()
    return out.rename(columns={PREDICTOR: "predictor", FAMILY: "family", "trace_name": "trace"})


def decision_table(df):
    """The MoE-GPS decision regions: per (trace, system, link bandwidth, batch size) the best
    distribution-only and the best token-to-expert configuration (predictor + placement, by total
    time), the baseline time, ``true_loads_placement_ms`` (the best over placements of the run's placement
    algorithm given each step's true loads: no predictor, no migration cost; what a perfect forecast would
    give that algorithm, and *not* a lower bound on time: it is slower than the static baseline wherever
    balancing tokens costs more than it saves, e.g. replicas whose weights every GPU must read at small
    batches), the winning family and ``gain = t_token / t_distribution - 1``."""
    import pandas as pd

    runs = _runs(df)
    refs = df[df["backend"] == "sim"]
    rows = []
    for key, sub in runs.groupby(VARIANT, dropna=False):
        row = dict(zip(["trace", "system", "gpus", "link_gbps", "batch_size"], key))
        row["trace"] = "/".join(Path(str(row["trace"])).parts[-2:])
        same = refs[(refs[VARIANT] == pd.Series(key, index=VARIANT)).all(axis=1)]
        row["baseline_ms"] = same[same["config.role"] == "baseline"]["total_ms"].min()
        row["true_loads_placement_ms"] = same[same["config.role"] == "oracle"]["total_ms"].min()
        for family in ("distribution", "token"):
            fam = sub[sub[FAMILY] == family]
            best = fam.loc[fam["total_ms"].idxmin()] if len(fam) else None
            row[f"best_{family}"] = f"{best[PREDICTOR]}+{best[PLACEMENT]}" if best is not None else ""
            row[f"{family}_ms"] = best["total_ms"] if best is not None else float("nan")
        d, t = row["distribution_ms"], row["token_ms"]
        row["gain_dist_over_token"] = t / d - 1 if np.isfinite(d) and np.isfinite(t) else float("nan")
        both = [(row[f"{f}_ms"], f) for f in ("distribution", "token") if np.isfinite(row[f"{f}_ms"])]
        row["winner_family"] = min(both)[1] if both else ""
        row["speedup_vs_baseline"] = row["baseline_ms"] / min(both)[0] if both else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def placement_table(df):
    """Imbalance by placement algorithm and expert slots: mean max/mean tokens per GPU of the runs
    (and of the same algorithm placed from each step's true loads: ``true_loads_imbalance``), per (trace, placement, extra slots per GPU, batch size)."""
    runs = _runs(df)
    keys = ["trace_name", PLACEMENT, SLOTS, BATCH]
    out = runs.groupby(keys, dropna=False).agg(imbalance=("imbalance", "mean"), imbalance_max=("imbalance", "max"),
                                               expert_ms=("expert_ms", "mean"), speedup=("speedup", "mean"),
                                               runs=("total_ms", "size")).reset_index()
    oracle = df[df["config.role"] == "oracle"].groupby(keys, dropna=False)["imbalance"].mean()
    out["true_loads_imbalance"] = out.set_index(keys).index.map(oracle)
    return out.rename(columns={"trace_name": "trace", PLACEMENT: "placement", SLOTS: "extra_slots", BATCH: "batch_size"})


PAIR = ["trace_name", PREDICTOR, PLACEMENT, BATCH]  # what a simulated and a measured row must share to be compared


def sim_vs_measured(df, pair: list[str] | None = None):
    """Simulated against measured time per configuration: exec rows paired with the sim rows that share
    ``pair`` (default trace, predictor, placement, batch size), compared on MoE time per token (the
    two backends replay different numbers of tokens). Error = simulated / measured - 1. Empty without exec rows."""
    import pandas as pd

    pair = pair or PAIR
    measured, simulated = _runs(df, "exec"), _runs(df, "sim")
    if measured.empty:
        return pd.DataFrame(columns=pair + ["measured_us_per_token", "simulated_us_per_token", "error", "device"])
    per_token = lambda t: t["moe_ms"] * 1e3 / t["tokens"]  # noqa: E731
    m = measured.assign(measured_us_per_token=per_token(measured)).groupby(pair, dropna=False).agg(
        measured_us_per_token=("measured_us_per_token", "median"), device=("device", "first"))
    s = simulated.assign(simulated_us_per_token=per_token(simulated)).groupby(pair, dropna=False).agg(
        simulated_us_per_token=("simulated_us_per_token", "median"), sim_device=("device", "first"))
    out = m.join(s, how="inner").reset_index()
    out["error"] = out["simulated_us_per_token"] / out["measured_us_per_token"] - 1
    return out


# ---- plots (each written as PNG and SVG) --------------------------------------------------------------


def _save(fig, path: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    files = []
    for ext in ("png", "svg"):
        target = path.with_suffix("." + ext)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=130, format=ext, bbox_inches="tight")
        files.append(target)
    plt.close(fig)
    return files


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predictors(table, path: Path, title: str = "") -> list[Path]:
    """Accuracy (y) against the predictor's work per token (x, log), one point per (trace, predictor);
    filled when some of that work lands on the critical path; label = mean speedup over the baseline."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    floor = 1e-4  # us per token: predictors whose run-time work is a table read of nothing per token sit here
    for _, r in table.iterrows():
        x = max(float(r.work_us_per_token) if np.isfinite(r.work_us_per_token) else 0.0, floor)
        exposed = np.isfinite(r.exposed_us_per_token) and r.exposed_us_per_token > 0
        colour = FAMILY_COLOURS.get(r.family, "grey")
        ax.scatter(x, r.accuracy, s=70, color=colour if exposed else "white", edgecolor=colour, linewidth=1.5)
        ax.annotate(f"{r.predictor} ({r.trace})\n{r.speedup_mean:.3f}x mean, {r.speedup_best:.3f}x best",
                    (x, r.accuracy), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"predictor work per token (us on the simulated GPU; {floor:g} = none)")
    ax.set_ylabel("accuracy (token: recall@k; distribution: 1 - TV)")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(floor / 3, max(floor * 10, float(np.nanmax(table.work_us_per_token.to_numpy(float), initial=floor)) * 30))
    for family in ("distribution", "token"):
        ax.scatter([], [], color=FAMILY_COLOURS[family], label=f"{family} (filled: on the critical path)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "predictor accuracy against overhead", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_decisions(table, path: Path, title: str = "") -> list[Path]:
    """Decision regions: x = link bandwidth, y = batch size; cell colour = the gain
    t(best token-to-expert) / t(best distribution-only) - 1 on one diverging scale for all panels
    (blue: distribution-only wins, orange: token-to-expert wins, deeper = by more), so cells that
    share a winner still show by how much; text = the gain and each family's best configuration
    with its speedup over the static baseline. One panel per (trace, system)."""
    plt = _plt()

    panels = list(table.groupby(["trace", "system", "gpus"], sort=True))
    gains = table.gain_dist_over_token.to_numpy(float)
    lim = max(0.01, float(np.nanmax(np.abs(gains), initial=0.0)))
    norm = plt.Normalize(-lim, lim)
    cmap = plt.get_cmap("PuOr")  # orange below 0 (token wins), purple-blue above (distribution wins)
    n_x = max(sub.link_gbps.nunique() for _, sub in panels)
    n_y = max(sub.batch_size.nunique() for _, sub in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 2.3 * n_x * len(panels) + 2), 1.4 * n_y + 2.4),
                             squeeze=False)
    for ax, (key, sub) in zip(axes[0], panels):
        xs, ys = sorted(sub.link_gbps.unique()), sorted(sub.batch_size.unique())
        for _, r in sub.iterrows():
            i, j = xs.index(r.link_gbps), ys.index(r.batch_size)
            gain = r.gain_dist_over_token
            ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, edgecolor="white",
                                       facecolor=cmap(norm(gain)) if np.isfinite(gain) else "white"))
            lines = [f"{gain:+.1%}" if np.isfinite(gain) else f"{r.winner_family} only"]
            for family, letter in (("distribution", "D"), ("token", "T")):
                if r.get(f"best_{family}"):
                    config = str(r[f"best_{family}"]).replace("+", "\n+")
                    lines.append(f"{letter}: {config} {r.baseline_ms / r[f'{family}_ms']:.3f}x")
            dark = np.isfinite(gain) and abs(gain) > 0.6 * lim
            ax.text(i, j, "\n".join(lines), ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(-0.5, len(ys) - 0.5)
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set_xlabel("link bandwidth per GPU per direction (GB/s)")
        ax.set_ylabel("batch size (requests)")
        ax.set_title(f"{key[0]} on {key[1]} ({key[2]:g} GPUs)", fontsize=8)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[0]), fraction=0.04)
    bar.set_label("t(token) / t(distribution) - 1\n> 0: distribution-only wins; < 0: token-to-expert wins", fontsize=7)
    bar.ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:+.1%}"))
    fig.suptitle((title + "\n" if title else "") + "cell: gain; D/T: best distribution-only / token-to-expert "
                 "predictor+placement and its speedup over the static baseline", fontsize=8)
    return _save(fig, path)


def plot_end_to_end(df, path: Path, title: str = "") -> list[Path]:
    """Speedup over the baseline (y) against link bandwidth (x), one line per predictor (its best
    placement at each point), one panel per batch size; colour = family."""
    plt = _plt()
    runs = _runs(df)
    batches = sorted(runs[BATCH].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(4.3 * len(batches), 3.9), squeeze=False, sharey=True)
    styles = ["-", "--", ":", "-."]
    for ax, b in zip(axes[0], batches):
        sub = runs[runs[BATCH] == b]
        # predictors whose curves coincide to within 1e-5 (far below what the plot resolves) share one
        # line and one legend entry ("ema ~ global_profile"), so that no line hides another
        curves: dict[tuple, tuple] = {}
        for (fam, pred), g in sub.groupby([FAMILY, PREDICTOR]):
            best = g.groupby(LINK)["speedup"].max()
            same = next((k for k in curves if k[0] == fam and len(k[1]) == len(best)
                         and np.allclose(k[1], best.values, rtol=1e-5, atol=0)), None)
            if same is None:
                curves[(fam, tuple(best.values))] = (best, [pred], True)
            else:
                first, preds, exact = curves[same]
                curves[same] = (first, preds + [pred], exact and np.array_equal(first.values, best.values))
        for n, ((fam, _), (best, preds, exact)) in enumerate(curves.items()):
            ax.plot(best.index, best.values, styles[n % len(styles)], marker="o", ms=3,
                    color=FAMILY_COLOURS.get(fam, "grey"), label=f"{(' = ' if exact else ' ~ ').join(preds)} ({fam})",
                    zorder=3)
        ax.axhline(1.0, color="black", lw=0.6, zorder=1)
        ax.legend(fontsize=7, loc="best")
        ax.set_xscale("log")
        links = sorted(sub[LINK].unique())
        ax.set_xticks(links, [f"{x:g}" for x in links])
        ax.minorticks_off()
        ax.set_xlabel("link bandwidth (GB/s)")
        ax.set_title(f"batch size {b:g}", fontsize=9)
    axes[0][0].set_ylabel("speedup over static baseline (best placement)")
    fig.suptitle(title or "end-to-end time by predictor across bandwidth and batch size", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_placement(table, path: Path, title: str = "") -> list[Path]:
    """Imbalance (max/mean tokens per GPU) by placement algorithm (one colour each); one bar per
    extra-slot count (hatched by count), one panel per batch size; the same algorithm placed from each
    step's true loads as a diamond on its bar (drawn on top, so it shows where it equals the bar)."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    batches = sorted(table.batch_size.unique())
    places = sorted(table.placement.unique())
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(places)}
    slots = sorted(table.extra_slots.dropna().unique()) or [np.nan]
    hatches = ["", "//", "..", "xx", "\\\\", "oo"]
    fig, axes = plt.subplots(1, len(batches), figsize=(4.3 * len(batches), 3.8), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches):
        sub = table[table.batch_size == b]
        width = 0.8 / len(slots)
        for j, s in enumerate(slots):
            part = sub[sub.extra_slots == s] if np.isfinite(s) else sub
            for i, p in enumerate(places):
                r = part[part.placement == p]
                if r.empty:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(x, r.imbalance.mean(), width, color=colours[p], edgecolor="black", linewidth=0.4,
                       hatch=hatches[j % len(hatches)])
                ax.plot([x], [r.true_loads_imbalance.mean()], marker="D", ms=5, color="black", mec="white", mew=0.8,
                        zorder=5)
        ax.set_xticks(range(len(places)), places, fontsize=8)
        ax.set_ylim(bottom=0.95)
        ax.set_title(f"batch size {b:g}", fontsize=9)
    axes[0][0].set_ylabel("max / mean tokens per GPU (1 = even)")
    handles = [Patch(facecolor="white", edgecolor="black", hatch=hatches[j % len(hatches)], label=f"{s:g} extra slots")
               for j, s in enumerate(slots) if np.isfinite(s)]
    handles.append(Line2D([], [], marker="D", color="black", mec="white", ls="", label="placed from true loads"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(title or "imbalance by placement algorithm and expert slots (simulated replay)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_sim_vs_measured(table, path: Path, title: str = "") -> list[Path]:
    """Left: simulated against measured MoE time per token (log-log, y = x dashed); right: error per config."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    a.scatter(table.measured_us_per_token, table.simulated_us_per_token, color="#4c78a8")
    lo = float(np.nanmin([table.measured_us_per_token.min(), table.simulated_us_per_token.min()])) * 0.7
    hi = float(np.nanmax([table.measured_us_per_token.max(), table.simulated_us_per_token.max()])) * 1.4
    a.plot([lo, hi], [lo, hi], "--", color="black", lw=0.8)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel(f"measured MoE time per token (us; {table.device.iloc[0]})")
    a.set_ylabel("simulated MoE time per token (us)")
    labels = [f"{r[PREDICTOR]}+{r[PLACEMENT]} b{r[BATCH]:g}" for _, r in table.iterrows()]
    b.barh(range(len(table)), table.error * 100, color=np.where(table.error > 0, "#f58518", "#4c78a8"))
    b.set_yticks(range(len(table)), labels, fontsize=7)
    b.axvline(0, color="black", lw=0.6)
    b.set_xlabel("simulated / measured - 1 (%)")
    fig.suptitle(title or "simulated against measured MoE time", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def results_report(path: str | Path, out: str | Path) -> dict[str, Path]:
    """All tables (CSV, and markdown in ``report.md``) and plots (PNG + SVG) of a results store."""

    df = load_results(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sims = df[df["backend"] == "sim"]
    devices = ", ".join(sorted(sims["device"].unique())) or "-"
    tables = {"predictors": predictor_table(df), "decision": decision_table(df),
              "placement": placement_table(df), "sim_vs_measured": sim_vs_measured(df)}
    files: dict[str, Path] = {}
    for name, table in tables.items():
        with atomic_path(out / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        files[f"{name}.csv"] = out / f"{name}.csv"
    traces = ", ".join(sorted(df["trace_name"].unique()))
    if len(tables["predictors"]):
        files["predictors.png"] = plot_predictors(tables["predictors"], out / "predictors",
                                                  f"predictor accuracy against overhead ({traces}; simulated: {devices})")[0]
    if len(tables["decision"]):
        files["decision.png"] = plot_decisions(tables["decision"], out / "decision", f"{traces}, simulated")[0]
        files["end_to_end.png"] = plot_end_to_end(df, out / "end_to_end",
                                                  f"end-to-end speedup by predictor ({traces}; {devices})")[0]
    if len(tables["placement"]):
        files["placement.png"] = plot_placement(tables["placement"], out / "placement")[0]
    if len(tables["sim_vs_measured"]):
        files["sim_vs_measured.png"] = plot_sim_vs_measured(tables["sim_vs_measured"], out / "sim_vs_measured")[0]
    lines = [f"# Results report: {path}", "",
             f"{len(df)} rows ({(df['config.role'] == 'run').sum()} runs; backends "
             f"{', '.join(f'{b}: {n}' for b, n in df['backend'].value_counts().items())}); traces: {traces}; "
             f"simulated systems: {devices}. Speedup = baseline (static contiguous placement, no predictor) / time.", ""]
    titles = {"predictors": "Predictor accuracy against overhead", "decision": "Decision regions (best of each family)",
              "placement": "Imbalance by placement and slots", "sim_vs_measured": "Simulated against measured"}
    for name, table in tables.items():
        lines += [f"## {titles[name]}", ""]
        lines += [_markdown(table) if len(table) else "(no rows: no executor results in this store)\n"]
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines))
    files["report.md"] = out / "report.md"
    return files


def _results_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m moegps.report results",
                                 description="tables and plots of a results store (a sweep folder)")
    ap.add_argument("store", help="a sweep folder (its runs/ is read) or any folder/file of results parquet shards")
    ap.add_argument("--out", default=None, help="output folder (default reports/results/<store name>)")
    a = ap.parse_args(argv)
    out = a.out or str(Path("reports/results") / Path(a.store).resolve().name)
    files = results_report(a.store, out)
    print((Path(out) / "report.md").read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))


# ---- dispatcher -----------------------------------------------------------------------------------


def _routing_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m moegps.report routing", description=routing_report.__doc__.split("\n")[0])
    ap.add_argument("trace", help="a trace spec: a RoutingTrace parquet file or folder of shards, a folder of "
                    "DeepSeek CSVs, deepseek, random or synthetic (moegps.workloads.load_trace)")
    ap.add_argument("--out", default=None, help="output folder (default reports/routing/<trace name>)")
    ap.add_argument("--domains", action="store_true", help="also group by meta.recorded['request_domain']")
    ap.add_argument("--no-reference", action="store_true", help="skip the real Mixtral/OLMoE statistics")
    a = ap.parse_args(argv)
    out = a.out or str(Path("reports/routing") / Path(a.trace).stem)
    routing_report(RoutingReportConfig(trace=a.trace, out=out, domains=a.domains, reference=not a.no_reference))


REPORTS = {"routing": _routing_main, "results": _results_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in REPORTS:
        print(f"usage: python -m moegps.report {{{','.join(REPORTS)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    # a file or setting to fix ends with its message (file and fix named), Ctrl-C with exit code 130
    run_command(lambda: REPORTS[argv[0]](argv[1:]), "report", errors=(ValueError, FileNotFoundError, ResultsError))


if __name__ == "__main__":
    main()
