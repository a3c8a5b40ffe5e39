"""Distribution-only predictors against the global profile at batch sizes 1, 4, 16, 64, out of sample.

Protocol (no test request is seen by fitting or selection):
- Requests are split in two halves by a seeded permutation (2-fold cross-fitting: each half is the
  test set once, the other half trains), so every request is scored once and B = 64 still has
  whole batches on a 300-prompt trace.
- Inside each training half, half of its requests are a validation split: every candidate
  (predictor x hyper-parameters) is fitted on the rest and scored there; the best per (B, phase)
  is refitted on the whole training half and scored on the test half.
- Test batches: ``--partitions`` random partitions of the test requests into groups of B (a
  static-batching server: one prefill batch, then one batch per decode step); groups short of
  B requests are dropped. Per batch, TV is the mean over layers.
- Ceiling: the sampling floor, which is also the in-batch oracle: predict the batch's own
  distribution ``q`` exactly and score it against a fresh draw of the batch's selections (each token
  draws k distinct experts from ``q``, Gumbel top-k). It is the TV no predictor beats if routing were
  a draw from the batch's distribution (routing is deterministic given the context, so a predictor
  that reads the tokens or layer ``l - 1`` could in principle go below it). The predictable reduction
  is ``1 - floor / profile``; each row reports the share of it reached, ``(profile - tv) / (profile -
  floor)``, and ``meets_bar`` (>= 20% below the profile, or >= 3/4 of the predictable reduction
  where the floor leaves less than 20% predictable). ``in-sample: prev_layer_ridge fit on test`` is
  the winning family fitted on the test requests themselves: what perfectly matched data would give
  this family, neither a predictor nor a bound.
- CI: 95% percentile bootstrap over test batches (batches of one partition share no request; at
  B = 64 partitions reuse requests, so the CI there is optimistic).

    python benchmarks/distribution_predictors.py --trace deepseek --partitions 2
    python benchmarks/distribution_predictors.py --trace traces/mixtral-tiny/mmlu-5000.parquet --limit 600 --partitions 2
    python benchmarks/distribution_predictors.py --figure results/distribution_predictors/deepseek-v2-lite \
        results/distribution_predictors/mmlu-5000 --png docs/img/distribution-predictors.png

writes ``results/distribution_predictors/<name>/{table.csv,table.md,summary.md,cost.csv}``; ``--figure``
draws the accuracy-vs-cost figure from finished folders.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from moegps.predictors import make
from moegps.predictors.batching import batch_context, batch_stream
from moegps.predictors.bench import median_time
from moegps.predictors.signature import layer_counts
from moegps.trace import PREFILL, RoutingTrace
from moegps.workloads import load_trace

SIZES = (1, 4, 16, 64)
BASELINE = "global_profile"
BEST = "best(chosen on validation)"
BEST_CHEAP = "best cheaper than token_table(chosen on validation)"
CANDIDATES = {
    "global_profile": ("global_profile", {}),
    "phase_profile": ("phase_profile", {}),
    "step_profile": ("step_profile", {}),
    **{f"token_mix(prior={p})": ("token_mix", {"prior": p}) for p in (1.0, 5.0, 25.0)},
    **{f"prev_layer(prior={p},blend={b},token_prior={t})": ("prev_layer", {"prior": p, "blend": b, "token_prior": t})
       for p in (1.0, 10.0) for b in (0.0, 0.3) for t in (5.0,)},
    **{f"prev_layer_ridge(prior={p},ridge={r},layer0={l0},token_prior={t})":
       ("prev_layer_ridge", {"prior": p, "ridge": r, "layer0": l0, "token_prior": t})
       for p in (1.0, 10.0) for r in (0.003, 0.01, 0.03) for l0, t in (("profile", 5.0), ("token_mix", 5.0))},
}


def split_requests(trace: RoutingTrace, fraction: float, seed: int) -> tuple[RoutingTrace, RoutingTrace]:
    """(rest, held) disjoint by request; ``held`` holds ``fraction`` of the requests."""
    ids = np.random.default_rng(seed).permutation(trace.requests())
    held = np.isin(trace.request_id, ids[: int(round(fraction * len(ids)))])
    return trace.select(~held), trace.select(held)


def batch_tv(predictors: dict, test: RoutingTrace, B: int, partitions: int, seed: int) -> dict[str, pd.DataFrame]:
    """Per predictor, one row per full test batch: phase, tokens, TV (mean over layers)."""
    out = {name: [] for name in predictors}
    tr = test.by_token()
    for r in range(partitions):
        stream = batch_stream(test, batch_requests=B, seed=seed * 1000 + r, tr=tr)
        full = np.array([len(m) == B for m in stream.members])
        for b in range(len(stream)):
            if not full[stream.group[b]]:
                continue
            ctx = batch_context(stream, b, with_tokens=True)
            q = stream.loads[b] / stream.loads[b].sum(-1, keepdims=True)
            for name, p in predictors.items():
                tv = 0.5 * np.abs(p.predict_next(stream.loads[:b], ctx) - q).sum(-1).mean()
                out[name].append((r, b, int(stream.phase[b]), int(stream.loads[b, 0].sum()), tv))
    return {n: pd.DataFrame(rows, columns=["partition", "batch", "phase", "selections", "tv"]) for n, rows in out.items()}


def sampling_floor(test: RoutingTrace, B: int, partitions: int, seed: int, draws: int = 2) -> pd.DataFrame:
    """Per full test batch: E TV(q, q'), q the batch's own [layer, E] distribution and q' the loads of
    the same tokens, each drawing its k distinct experts from q (Gumbel top-k, i.e. without
    replacement like a router). What no predictor can beat *if* routing were a draw from q; a router
    is deterministic given the context, so a predictor that knows the tokens can go below it."""
    rng = np.random.default_rng(seed)
    rows, tr = [], test.by_token()
    k = test.meta.top_k
    for r in range(partitions):
        stream = batch_stream(test, batch_requests=B, seed=seed * 1000 + r, tr=tr)
        full = np.array([len(m) == B for m in stream.members])
        for b in np.flatnonzero(full[stream.group]):
            q = stream.loads[b] / stream.loads[b].sum(-1, keepdims=True)  # [L, E]
            n = int(stream.n_tokens[b])
            tvs = []
            for _ in range(draws):
                g = np.log(np.maximum(q, 1e-300))[None] + rng.gumbel(size=(n,) + q.shape)
                top = np.argpartition(-g, k - 1, axis=-1)[..., :k]  # [n, L, k]
                counts = np.stack([np.bincount(top[:, l].ravel(), minlength=q.shape[1]) for l in range(q.shape[0])])
                tvs.append(0.5 * np.abs(counts / counts.sum(-1, keepdims=True) - q).sum(-1).mean())
            rows.append((r, b, int(stream.phase[b]), float(np.mean(tvs))))
    return pd.DataFrame(rows, columns=["partition", "batch", "phase", "tv"])


def bootstrap_ci(x: np.ndarray, rng: np.random.Generator, n: int = 1000) -> tuple[float, float]:
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def fit_all(specs: dict, train: RoutingTrace) -> dict:
    return {name: make(reg, **kw).fit(train) for name, (reg, kw) in specs.items()}


def per_cost_call(p, test: RoutingTrace, B: int, seed: int):
    """One ``predict_next`` call on the first full prefill batch of B test requests, as a thunk."""
    stream = batch_stream(test, batch_requests=B, seed=seed)
    ctx = batch_context(stream, 0, with_tokens=True)
    return lambda: p.predict_next(stream.loads[:0], ctx)


def interleaved_ms(calls: dict, rounds: int = 7, repeats: int = 10) -> dict[str, float]:
    """Median ms per call of each thunk, timed in interleaved rounds (on a shared, noisy CPU a
    sequential run would charge each predictor whatever load happened to fall on its turn)."""
    times = {n: [] for n in calls}
    for _ in range(rounds):
        for n, fn in calls.items():
            times[n].append(median_time(fn, repeats))
    return {n: 1e3 * float(np.median(t)) for n, t in times.items()}


def token_cost_call(p, test: RoutingTrace, B: int, seed: int):
    """A token predictor's ``predict`` on the same batch plus the per-layer histogram of its ids
    (``layer_counts``, the same histogram the signature predictors time), as a thunk."""
    stream = batch_stream(test, batch_requests=B, seed=seed)
    tokens = stream.tokens.select(stream.batch_tokens(0))
    return lambda: layer_counts(p.predict(tokens), p.n_experts)


def counts_cost_call(p, test: RoutingTrace, B: int, seed: int):
    """``predict_from_counts`` alone, as a thunk: the signature predictor's work when the server's
    per-expert counts of layer ``l - 1`` (which its MoE dispatch computes anyway) are handed to it."""
    counts = batch_stream(test, batch_requests=B, seed=seed).loads[0]
    layer0 = p.phase_profiles[PREFILL]
    return lambda: p.predict_from_counts(counts, layer0, PREFILL)


def cost_table(trace: RoutingTrace, sizes=SIZES, seed: int = 0) -> pd.DataFrame:
    """CPU ms per batch of the distribution predictors and of token_table (the cheapest token-to-expert
    predictor that reads its input), fitted on one half, timed on a prefill batch of B other requests.
    ``prev_layer_ridge_ms`` includes its histogram of the batch's routing; ``..._given_counts_ms``
    is the product alone (the counts a server already holds)."""
    ids = np.random.default_rng(seed).permutation(trace.requests())
    train = trace.select(np.isin(trace.request_id, ids[: len(ids) // 2]))
    test = trace.select(~np.isin(trace.request_id, ids[: len(ids) // 2]))
    dist = {n: make(n).fit(train) for n in ("global_profile", "phase_profile", "step_profile", "token_mix",
                                            "prev_layer")}
    dist["prev_layer_ridge"] = ridge = make("prev_layer_ridge", layer0="profile").fit(train)
    token = make("token_table").fit(train)
    rows = []
    for B in sizes:
        if B > len(ids) - len(ids) // 2:
            continue
        tokens = int(batch_stream(test, batch_requests=B, seed=seed).n_tokens[0])
        calls = {**{f"{n}_ms": per_cost_call(p, test, B, seed) for n, p in dist.items()},
                 "prev_layer_ridge_given_counts_ms": counts_cost_call(ridge, test, B, seed),
                 "token_table_ms": token_cost_call(token, test, B, seed)}
        rows.append({"B": B, "tokens": tokens, **interleaved_ms(calls)})
    return pd.DataFrame(rows)


def cheaper_than_token_table(cost: pd.DataFrame) -> dict[int, set[str]]:
    """Per B, the predictor families whose CPU cost per batch is below token_table's (the cheapest
    token-to-expert predictor): the issue's cost bar. prev_layer_ridge is charged its product alone,
    given the counts of layer l - 1 that the server's MoE dispatch computes anyway (``cost_table``)."""
    out = {}
    for _, row in cost.iterrows():
        ms = {c.removesuffix("_ms"): row[c] for c in cost.columns if c.endswith("_ms") and c != "token_table_ms"}
        ms["prev_layer_ridge"] = ms.pop("prev_layer_ridge_given_counts")
        out[int(row.B)] = {n for n, v in ms.items() if v < row.token_table_ms}
    return out


def family(candidate: str) -> str:
    return CANDIDATES[candidate][0] if candidate in CANDIDATES else candidate


def run(trace: RoutingTrace, sizes=SIZES, partitions: int = 4, seed: int = 0,
        cheap: dict[int, set[str]] | None = None) -> pd.DataFrame:
    """Test TV per (B, phase, predictor) with two validation choices: the most accurate candidate, and
    the most accurate among the families in ``cheap[B]`` (cheaper than token_table at that B)."""
    rng = np.random.default_rng(seed)
    phases = sorted(set(np.unique(trace.phase).tolist()))
    ids = np.random.default_rng(seed).permutation(trace.requests())
    halves = np.array_split(ids, 2)
    rows = []
    for fold in range(2):
        test = trace.select(np.isin(trace.request_id, halves[fold]))
        train = trace.select(np.isin(trace.request_id, halves[1 - fold]))
        fit_part, val = split_requests(train, 0.5, seed + fold)  # half: B = 64 needs whole validation batches
        on_fit = fit_all(CANDIDATES, fit_part)
        on_train = fit_all(CANDIDATES, train)
        # in-sample on purpose (fitted on the test requests, the scored batch included): a reference
        # for what the family could do with perfectly matched data, not a predictor and not a bound
        oracle = make("prev_layer_ridge", layer0="profile").fit(test)
        token_ref = make("from_tokens", token="token_table").fit(train)
        for B in sizes:
            val_tv = batch_tv(on_fit, val, B, partitions, seed + 7)
            # token_table's per-token experts counted per layer: the cheapest token-to-expert predictor's
            # load error, scored beside the distribution predictors (never a candidate for "best")
            refs = {"in-sample: prev_layer_ridge fit on test": oracle, "reference: token_table": token_ref}
            test_tv = batch_tv({**on_train, **refs}, test, B, partitions, seed + 11 + fold)
            floor = sampling_floor(test, B, partitions, seed + 11 + fold)
            for ph in phases:
                vmeans = {n: d.tv[d.phase == ph].mean() for n, d in val_tv.items()}
                vmeans = {n: v for n, v in vmeans.items() if np.isfinite(v)}
                best = min(vmeans, key=vmeans.get) if vmeans else BASELINE
                affordable = {n: v for n, v in vmeans.items() if cheap is None or family(n) in cheap.get(B, ())}
                best_cheap = min(affordable, key=affordable.get) if affordable else BASELINE
                for name, d in test_tv.items():
                    d = d[d.phase == ph]
                    if len(d):
                        rows.append(dict(fold=fold, B=B, phase=int(ph), predictor=name, chosen=name == best,
                                         chosen_cheap=name == best_cheap, tv=d.tv.to_numpy(),
                                         selections=d.selections.to_numpy()))
                f = floor[floor.phase == ph]
                if len(f):
                    rows.append(dict(fold=fold, B=B, phase=int(ph), predictor="sampling_floor", chosen=False,
                                     chosen_cheap=False, tv=f.tv.to_numpy(), selections=None))
    raw = pd.DataFrame(rows)
    return summarise(raw, rng)


def summarise(raw: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """One row per (B, phase, predictor): TV over both folds' test batches, CI, reduction vs profile,
    and the share of the predictable reduction reached: ``(profile - x) / (profile - floor)``, with a
    paired bootstrap CI (floor, profile and predictor rows are the same batches in the same order)."""
    out = []
    for (B, ph), g in raw.groupby(["B", "phase"]):
        tv = {n: np.concatenate(list(d.sort_values("fold").tv)) for n, d in g.groupby("predictor")}
        base = tv[BASELINE]
        # the validation choice may differ between folds: score each fold's own choice on its own test half
        choices = {BEST: g[g.chosen], BEST_CHEAP: g[g.chosen_cheap]}
        for label, chosen in choices.items():
            tv[label] = np.concatenate(list(chosen.sort_values("fold").tv)) if len(chosen) else base
        floor_tv = tv["sampling_floor"]
        floor = floor_tv.mean()
        predictable = 1 - floor / base.mean()
        idx = rng.integers(0, len(base), size=(1000, len(base)))
        for name, x in tv.items():
            lo, hi = bootstrap_ci(x, rng)
            red = red_lo = red_hi = share = share_lo = share_hi = np.nan
            if name != "sampling_floor" and len(x) == len(base):
                red = 1 - x.mean() / base.mean()  # rows are in the same (fold, batch) order as base's
                red_lo, red_hi = np.quantile(1 - x[idx].mean(1) / base[idx].mean(1), [0.025, 0.975])
                if len(floor_tv) == len(base):
                    share = (base.mean() - x.mean()) / (base.mean() - floor)
                    gap = base[idx].mean(1) - floor_tv[idx].mean(1)
                    share_lo, share_hi = np.quantile((base[idx].mean(1) - x[idx].mean(1)) / gap, [0.025, 0.975])
            # the bar: >= 20% below the profile; where the floor leaves less than 20% predictable,
            # >= 3/4 of the predictable reduction instead
            bar = (red >= 0.20) if predictable >= 0.20 else (share >= 0.75)
            out.append(dict(B=B, phase="prefill" if ph == PREFILL else "decode", predictor=name,
                            chosen=",".join(sorted(set(choices[name].predictor))) if name in choices else "",
                            n_batches=len(x), mean_tv=x.mean(), ci_lo=lo, ci_hi=hi, median_tv=np.median(x),
                            reduction=red, red_ci_lo=red_lo, red_ci_hi=red_hi, floor_tv=floor,
                            predictable=predictable, share_of_predictable=share, share_ci_lo=share_lo,
                            share_ci_hi=share_hi, meets_bar=bool(bar) if np.isfinite(red) else None))
    return pd.DataFrame(out)


def short_name(name: str) -> str:
    """``prev_layer_ridge(prior=1.0,ridge=0.01,layer0=profile,token_prior=5.0)`` -> ``prev_layer_ridge(1,0.01,profile,5)``."""
    if "(" not in name:
        return name
    head, args = name.rstrip(")").split("(", 1)
    vals = [a.split("=", 1)[-1] for a in args.split(",")]
    return f"{head}({','.join(v.removesuffix('.0') for v in vals)})"


def summary_markdown(table: pd.DataFrame, label: str, which: str = BEST) -> str:
    """One row per (phase, B): the profile's and the validation-chosen ``which``'s test TV with 95%
    CIs, the reduction, the sampling floor, the predictable reduction, the share of it reached, the bar."""
    lines = []
    for (ph, B), g in table.groupby(["phase", "B"], sort=False):
        base = g[g.predictor == BASELINE].iloc[0]
        best = g[g.predictor == which].iloc[0]
        # one choice per fold, joined by "," (names hold commas too: split only outside parentheses)
        chosen = " / ".join(short_name(c) for c in re.split(r",(?![^(]*\))", str(best.chosen)) if c and c != "nan")
        lines.append(f"| {label} {ph} | {B} | {base.mean_tv:.3f} [{base.ci_lo:.3f}, {base.ci_hi:.3f}] | "
                     f"{best.mean_tv:.3f} [{best.ci_lo:.3f}, {best.ci_hi:.3f}] {chosen} | "
                     f"{100 * best.reduction:.1f}% [{100 * best.red_ci_lo:.1f}, {100 * best.red_ci_hi:.1f}] | "
                     f"{best.floor_tv:.3f} | {100 * best.predictable:.0f}% | "
                     f"{100 * best.share_of_predictable:.0f}% [{100 * best.share_ci_lo:.0f}, {100 * best.share_ci_hi:.0f}] | "
                     f"{'met' if best.meets_bar else 'not met'} |")
    head = (f"| trace, phase | B | global profile TV [95% CI] | {which} [95% CI] | reduction [95% CI] "
            "| sampling floor | predictable | share of predictable reached [95% CI] | bar |\n|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(lines)


def markdown(table: pd.DataFrame) -> str:
    cols = ["B", "phase", "predictor", "chosen", "n_batches", "mean_tv", "ci_lo", "ci_hi", "reduction",
            "red_ci_lo", "red_ci_hi", "floor_tv", "predictable", "share_of_predictable", "share_ci_lo",
            "share_ci_hi", "meets_bar"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    return "\n".join(lines)


# predictors drawn in the accuracy-vs-cost figure: table name -> (cost.csv column, label)
FIGURE = {
    "global_profile": ("global_profile_ms", "global profile (MoE-GPS)"),
    "step_profile": ("step_profile_ms", "step_profile"),
    "token_mix(prior=5.0)": ("token_mix_ms", "token_mix"),
    "prev_layer(prior=10.0,blend=0.0,token_prior=5.0)": ("prev_layer_ms", "prev_layer"),
    "prev_layer_ridge(prior=10.0,ridge=0.01,layer0=profile,token_prior=5.0)": ("prev_layer_ridge_ms", "prev_layer_ridge"),
    "reference: token_table": ("token_table_ms", "token_table (token-to-expert)"),
}


def figure(folders: list[Path], png: Path) -> Path:
    """Accuracy vs cost: one panel per (trace, phase); x = CPU ms per batch (cost.csv, prefill
    batches), y = test TV relative to the global profile's at the same B; one line per predictor
    through B = 1, 4, 16, 64 (labelled at its points); grey bars: the sampling floor's relative TV
    at each B; dotted: the 20% bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moegps.files import save_png
    from moegps.predictors.plot import place_labels

    panels = []
    for folder in folders:
        table, cost = pd.read_csv(folder / "table.csv"), pd.read_csv(folder / "cost.csv")
        panels += [(folder.name, ph, table[table.phase == ph], cost) for ph in ("prefill", "decode") if (table.phase == ph).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False)
    floor_ms = 2e-3  # where cost-free predictors (the profiles) are drawn on the log axis
    for ax, (name, phase, t, cost) in zip(axes[0], panels):
        base = t[t.predictor == BASELINE].set_index("B").mean_tv
        xs, ys, labels = [], [], []
        for n, (col, label) in FIGURE.items():
            d = t[t.predictor == n].set_index("B")
            if d.empty or col not in cost:
                continue
            c = cost.set_index("B")[col].reindex(d.index)
            x = np.maximum(c.to_numpy(float), floor_ms)
            y = (d.mean_tv / base.reindex(d.index)).to_numpy()
            ax.plot(x, y, marker="o", ms=4, lw=1, label=label, zorder=3,
                    ls="--" if n.startswith("reference") else "-")
            xs += list(x)
            ys += list(y)
            labels += [f"B={b}" for b in d.index]
        for B, f in t[t.predictor == "sampling_floor"].set_index("B").floor_tv.items():
            if f / base[B] < 0.1:  # below the axis (one decode token: its top-k set is the whole batch)
                ax.text(0.99, 0.1, f"floor B={B}: {f / base[B]:.2f}", transform=ax.get_yaxis_transform(), fontsize=6,
                        color="grey", va="bottom", ha="right")
                continue
            ax.axhline(f / base[B], color="grey", lw=0.6, alpha=0.6)
            ax.text(0.99, f / base[B], f"floor B={B}", transform=ax.get_yaxis_transform(), fontsize=6, color="grey",
                    va="bottom", ha="right")
        ax.axhline(0.8, color="black", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")  # ratios span 0.15-3.6 (token_table's counted top-k is far off at large B)
        ax.set_yticks([0.1, 0.2, 0.3, 0.5, 0.8, 1, 2, 3], ["0.1", "0.2", "0.3", "0.5", "0.8", "1", "2", "3"])
        ax.minorticks_off()
        ax.set_xlabel(f"CPU ms per batch ({floor_ms:g} = no run-time work)")
        ax.set_ylabel("test TV / global profile's TV at the same B (lower is better)")
        ax.set_title(f"{name}, {phase}: dotted = the 20% bar, grey = sampling floor", fontsize=8)
        ax.set_ylim(0.1, 4.5)
        place_labels(ax, np.array(xs), np.array(ys), labels, fontsize=6, marker_pts=5)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    fig.suptitle("distribution-only predictors, default hyper-parameters: out-of-sample TV relative to the global profile "
                 "vs CPU ms per batch (timed on a prefill batch of B requests, this 2-core CPU); validation-chosen "
                 "winners: table.md", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_png(fig, png, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="deepseek")
    ap.add_argument("--limit", type=int, default=None, help="first N requests of the trace")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--figure", nargs="+", default=None, metavar="FOLDER",
                    help="only draw the accuracy-vs-cost figure from finished result folders (to --png)")
    ap.add_argument("--png", default="docs/img/distribution-predictors.png")
    a = ap.parse_args(argv)
    if a.figure:
        print(f"wrote {figure([Path(f) for f in a.figure], Path(a.png))}")
        return
    trace = load_trace(a.trace, a.limit)
    cost = cost_table(trace, a.sizes, a.seed)  # first: the second validation choice keeps to its budget
    table = run(trace, a.sizes, a.partitions, a.seed, cheap=cheaper_than_token_table(cost))
    name = Path(a.trace).stem if a.trace != "deepseek" else "deepseek-v2-lite"
    out = Path(a.out or f"results/distribution_predictors/{name}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "table.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "table.csv")
    show = table[table.predictor.isin([BASELINE, BEST, BEST_CHEAP, "sampling_floor",
                                       "in-sample: prev_layer_ridge fit on test"])]
    md = markdown(show)
    (out / "table.md").write_text(md + "\n")
    (out / "summary.md").write_text(summary_markdown(table, name) + "\n\n" + summary_markdown(table, name, BEST_CHEAP)
                                    + "\n")
    print(md)
    cost.to_csv(out / "cost.csv", index=False)
    print(cost.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
