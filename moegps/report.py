"""Reports: tables and plots over traces and results. ``python -m moegps.report <report> ...``

One function per report, dispatched by name:

- ``routing TRACE [--out DIR] [--domains]``: how a trace routes, side by side with the real
  Mixtral-8x7B (and OLMoE) statistics of ``olmoe-routing`` (see :func:`routing_report`).

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

from .trace import RoutingTrace, atomic_path

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
    from .importers.olmoe_routing import (
        LAYER_IDS,
        available_domains,
        load_crosslayer_counts,
        load_eid2token,
        load_expert_counts,
    )

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
    trace = RoutingTrace.read(cfg.trace)
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
    fig.savefig(files["load_shares.png"], dpi=110)
    plt.close(fig)

    # 2. skew and token-id hit rate per layer, real models as bands (their layers 0, 7, 15)
    from .importers.olmoe_routing import LAYER_IDS

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
    fig.savefig(files["skew_hit_rate.png"], dpi=110)
    plt.close(fig)

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
        fig, axes = plt.subplots(1, len(mats), figsize=(4.4 * len(mats), 3.9), squeeze=False)
        for ax, (title, j) in zip(axes[0], mats):
            # lift P(b | a) / P(b): affinity beyond the next layer's own load profile
            p = j / max(j.sum(), 1)
            lift = p / np.maximum(p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True), 1e-300)
            with np.errstate(divide="ignore"):
                log_lift = np.log2(lift)
            finite = np.isfinite(log_lift) & (p > 0)
            lim = float(np.clip(np.abs(log_lift[finite]).max() if finite.any() else 1.0, 0.5, 3.0))
            im = ax.imshow(np.where(finite, log_lift, -lim), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            s = affinity_summary(j)
            ax.set_title(f"{title}\nMI {s['mi_bits']:.3f} bits, lift of max {s['lift']:.2f}", fontsize=8)
            ax.set_xlabel("expert b at the next layer")
            ax.set_ylabel("expert a")
            fig.colorbar(im, ax=ax, label="log2 P(b | a) / P(b)")
        fig.tight_layout()
        files["cross_layer.png"] = out / "cross_layer.png"
        fig.savefig(files["cross_layer.png"], dpi=110)
        plt.close(fig)
    return files


# ---- dispatcher -----------------------------------------------------------------------------------


def _routing_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m moegps.report routing", description=routing_report.__doc__.split("\n")[0])
    ap.add_argument("trace", help="a RoutingTrace parquet file or folder of shards")
    ap.add_argument("--out", default=None, help="output folder (default reports/routing/<trace name>)")
    ap.add_argument("--domains", action="store_true", help="also group by meta.recorded['request_domain']")
    ap.add_argument("--no-reference", action="store_true", help="skip the real Mixtral/OLMoE statistics")
    a = ap.parse_args(argv)
    out = a.out or str(Path("reports/routing") / Path(a.trace).stem)
    routing_report(RoutingReportConfig(trace=a.trace, out=out, domains=a.domains, reference=not a.no_reference))


REPORTS = {"routing": _routing_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in REPORTS:
        print(f"usage: python -m moegps.report {{{','.join(REPORTS)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    REPORTS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
