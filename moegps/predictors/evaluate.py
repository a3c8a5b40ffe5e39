"""Score every predictor on one trace: accuracy and overhead side by side, per phase.

Library: ``evaluate(trace, predictors, ...) -> pandas.DataFrame`` (one row per predictor and
phase). Command line (hydra; ``conf/evaluate.yaml``)::

    python -m moegps.predictors.evaluate trace=deepseek            # the real DeepSeek-V2-Lite trace
    python -m moegps.predictors.evaluate trace=/path/to/trace.parquet batch_requests=16
    python -m moegps.predictors.evaluate trace=random              # offline smoke run

writes ``predictors.parquet``, ``predictors.csv``, ``predictors.md`` (a compact table per phase),
``predictors.png`` (accuracy vs overhead, per phase) and ``config.yaml`` to ``out`` (default ``outputs/predictors/<trace name>``).

Protocol. Requests (never tokens) are split into train and test with a seeded permutation;
predictors are fitted on the train trace only. Test requests are served in trace order by a
static-batching server (see :mod:`.batching`): each distribution predictor is called once per
batch with the loads of the batches before it; each token predictor predicts every test token
(cross-layer ones given the true experts of the previous layer), and its predictions are also
aggregated per batch so that both families get the same load metrics. Latency is the median
wall time of one call on this CPU (distribution: every call; token: ``latency_batches`` batches
per phase); per-token latency divides the summed time by the summed tokens of those calls.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..trace import DECODE, PREFILL, RoutingTrace
from .base import DistributionPredictor, TokenPredictor, normalize
from .batching import BatchStream, batch_context, batch_stream
from .metrics import distribution_errors, recall_at_k

PHASE_NAMES = {PREFILL: "prefill", DECODE: "decode"}


def split_by_request(trace: RoutingTrace, test_fraction: float = 0.2, seed: int = 0) -> tuple[RoutingTrace, RoutingTrace]:
    """(train, test) traces holding disjoint sets of whole requests; ``test_fraction`` of them in test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = trace.requests()
    if len(ids) < 2:
        raise ValueError(f"trace '{trace.meta.model}' has {len(ids)} request(s); a split needs at least 2")
    n_test = min(len(ids) - 1, max(1, int(round(test_fraction * len(ids)))))
    test_ids = np.sort(np.random.default_rng(seed).permutation(ids)[:n_test])
    is_test = np.isin(trace.request_id, test_ids)
    return trace.select(~is_test), trace.select(is_test)


def _phase_masks(phases: np.ndarray) -> dict[str, np.ndarray]:
    out = {"all": np.ones(len(phases), dtype=bool)}
    for ph, name in PHASE_NAMES.items():
        if (phases == ph).any():
            out[name] = phases == ph
    return out


def _dist_rows(pred: np.ndarray, stream: BatchStream) -> dict[str, dict[str, float]]:
    """Mean distribution errors per phase; ``pred`` ``[batch, layer, expert]`` fractions."""
    errs = distribution_errors(pred, stream.loads)  # each [batch, layer]
    rows = {}
    for name, m in _phase_masks(stream.phase).items():
        r = {k: float(v[m].mean()) for k, v in errs.items()}
        r["l1"] = 2 * r["tv"]
        r["n_batches"] = int(m.sum())
        rows[name] = r
    return rows


def _predict_tokens(p: TokenPredictor, stream: BatchStream, chunk: int = 65536) -> np.ndarray:
    out = [p.predict(stream.tokens.select(slice(s, s + chunk))) for s in range(0, len(stream.tokens), chunk)]
    return np.concatenate(out)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def evaluate(
    trace: RoutingTrace,
    predictors: dict[str, DistributionPredictor | TokenPredictor],
    test_fraction: float = 0.2,
    seed: int = 0,
    batch_requests: int = 8,
    window: int = 8,
    latency_batches: int = 30,
    progress: bool = True,
) -> pd.DataFrame:
    """Fit each predictor on the train requests, score it on the test requests; one row per (predictor, phase).

    Columns: predictor, family, phase, the token metrics (``set_acc``, ``recall_at_k``; token
    family only), the load metrics (``tv``, ``l1``, ``kl``, ``maxload_rel_err``,
    ``imbalance_err``, ``hot_expert_hit``; for token predictors through their aggregated loads),
    ``latency_batch_s``, ``latency_token_s``, ``fit_s``, the cost fields of :class:`PredictorCost`,
    batch and token counts, and the trace's name.
    """
    from tqdm.auto import tqdm

    train, test = split_by_request(trace, test_fraction, seed)
    stream = batch_stream(test, batch_requests, window=window)
    phases_tok = stream.tokens.phase
    rows: list[dict[str, Any]] = []
    common = {
        "trace": trace.meta.model, "batch_requests": batch_requests, "test_fraction": test_fraction, "seed": seed,
        "n_train_requests": len(train.requests()), "n_test_requests": len(test.requests()),
    }
    bar = tqdm(predictors.items(), disable=not progress, desc="predictors")
    for label, p in bar:
        bar.set_postfix_str(label)
        fit_s = _timed(p.fit, train)
        timing: dict[str, list[tuple[float, int]]] = {}
        token_metrics: dict[str, dict[str, float]] = {}
        if hasattr(p, "predict_next"):
            family = "distribution"
            pred = np.empty(stream.loads.shape)
            for b in range(len(stream)):
                ctx = batch_context(stream, b)
                t0 = time.perf_counter()
                pred[b] = p.predict_next(stream.loads[:b], ctx)
                dt = time.perf_counter() - t0
                timing.setdefault(PHASE_NAMES[int(stream.phase[b])], []).append((dt, ctx.n_tokens))
        else:
            family = "token"
            experts = _predict_tokens(p, stream)
            rec = recall_at_k(experts, stream.experts)  # [token, layer]
            for name, m in _phase_masks(phases_tok).items():
                token_metrics[name] = {
                    "set_acc": float((rec[m] == 1.0).mean()), "recall_at_k": float(rec[m].mean()),
                    "n_tokens": int(m.sum()),
                }
            L, E = stream.loads.shape[1:]
            flat = (stream.token_batch_id[:, None, None] * L + np.arange(L)[None, :, None]) * E + experts
            pred = normalize(np.bincount(flat.reshape(-1), minlength=stream.loads.size).reshape(stream.loads.shape))
            rng = np.random.default_rng(seed)
            for ph, name in PHASE_NAMES.items():
                bs = np.flatnonzero(stream.phase == ph)
                for b in rng.permutation(bs)[:latency_batches]:
                    tb = stream.tokens.select(stream.batch_tokens(b))
                    timing.setdefault(name, []).append((_timed(p.predict, tb), len(tb)))
        dist = _dist_rows(pred, stream)
        cost = p.cost()
        timing["all"] = [t for name in PHASE_NAMES.values() for t in timing.get(name, [])]
        for phase, drow in dist.items():
            t = np.array(timing.get(phase, []), dtype=np.float64).reshape(-1, 2)
            row = {
                "predictor": label, "family": family, "phase": phase,
                "set_acc": np.nan, "recall_at_k": np.nan, **drow,
                "latency_batch_s": float(np.median(t[:, 0])) if len(t) else np.nan,
                "latency_token_s": float(t[:, 0].sum() / max(t[:, 1].sum(), 1)) if len(t) else np.nan,
                "fit_s": fit_s, **cost.as_row(), **common,
            }
            row.update(token_metrics.get(phase, {}))
            rows.append(row)
    return pd.DataFrame(rows)


# ---- loading traces, the plot, the hydra app ------------------------------------------------


def load_trace(spec: str, limit: int | None = None, seed: int = 0) -> RoutingTrace:
    """``"deepseek"`` (the shared DeepSeek-V2-Lite CSVs), ``"random"`` (a synthetic trace), a
    folder of DeepSeek-style CSVs, or a RoutingTrace parquet file/folder."""
    from ..paths import shared_data

    if spec == "random":
        from ..testing import random_trace

        return random_trace(np.random.default_rng(seed), n_requests=limit or 400, prompt_len=(8, 64),
                            decode_steps=16, n_layers=4, n_experts=16, top_k=2)
    path = shared_data("traces", "deepseek-v2-lite-puffin") if spec == "deepseek" else Path(spec)
    if path.is_dir() and any(path.glob("*.csv")) and not any(path.glob("*.parquet")):
        from ..importers.deepseek_csv import read_deepseek_csv

        return read_deepseek_csv(path, limit)
    trace = RoutingTrace.read(path)
    if limit:
        trace = trace.with_requests(trace.requests()[:limit])
    return trace


def plot(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Accuracy vs overhead, one row of two panels per phase (prefill and decode when the trace has
    both, else the one phase): load error (TV) vs latency per batch (both families); recall@k vs
    latency per token (token family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import save_png

    phases = [ph for ph in ("prefill", "decode") if (table.phase == ph).any()]
    phases = phases if len(phases) == 2 else ["all"]
    fig, axes = plt.subplots(len(phases), 2, figsize=(13, 5.2 * len(phases)), squeeze=False)
    for (a, b), phase in zip(axes, phases):
        t = table[table.phase == phase]
        for fam, marker, color in (("distribution", "o", "tab:blue"), ("token", "s", "tab:orange")):
            d = t[t.family == fam]
            a.scatter(d.latency_batch_s * 1e6, d.tv, marker=marker, color=color, label=fam)
            for i, (_, r) in enumerate(d.sort_values("latency_batch_s").iterrows()):
                a.annotate(r.predictor, (r.latency_batch_s * 1e6, r.tv), fontsize=7, xytext=(3, 3 if i % 2 else -9),
                           textcoords="offset points")  # alternate above/below: neighbours overlap less
        a.set_xscale("log")
        a.set_yscale("log")  # errors span 0.03-0.8: a linear axis squeezes the good ones together
        a.set_xlabel("latency per batch, median (us, this CPU)")
        a.set_ylabel("load error: total variation per layer (lower is better)")
        a.set_title(f"{phase}: next-batch load distribution")
        a.legend()
        d = t[t.family == "token"]
        b.scatter(d.latency_token_s * 1e6, d.recall_at_k, marker="s", color="tab:orange")
        for i, (_, r) in enumerate(d.sort_values("recall_at_k").iterrows()):
            b.annotate(r.predictor, (r.latency_token_s * 1e6, r.recall_at_k), fontsize=7, xytext=(3, 2 if i % 2 else -9),
                       textcoords="offset points")
        b.set_xscale("log")
        b.set_xlabel("latency per token (us, this CPU)")
        b.set_ylabel("recall@k (higher is better)")
        b.set_title(f"{phase}: token-to-expert")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def markdown_table(table: pd.DataFrame) -> str:
    """A compact markdown table: one row per predictor, accuracy per phase side by side, then overhead.

    Columns: recall@k and TV for each phase present (``prefill``, ``decode``, ``all``; recall is
    token-weighted, TV batch-weighted), the median latency per batch and per token over all
    phases, fit time, FLOPs per token and fitted memory.
    """
    phases = [ph for ph in ("prefill", "decode", "all") if (table.phase == ph).any()]
    if phases == ["prefill", "all"] or phases == ["decode", "all"]:
        phases = ["all"]  # one phase: "all" says the same
    wide = table.pivot(index="predictor", columns="phase", values=["recall_at_k", "tv"])
    alls = table[table.phase == "all"].set_index("predictor")
    head = ["predictor", "family"] + [f"recall@k {ph}" for ph in phases] + [f"TV {ph}" for ph in phases] + [
        "latency/batch (us)", "latency/token (us)", "fit (s)", "FLOPs/token", "memory (B)"]
    fmt = lambda v: "" if pd.isna(v) else f"{v:.4g}"  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(table.predictor):
        r = alls.loc[name]
        cells = [name, r.family] + [fmt(wide.loc[name, ("recall_at_k", ph)]) for ph in phases] + [
            fmt(wide.loc[name, ("tv", ph)]) for ph in phases] + [
            fmt(r.latency_batch_s * 1e6), fmt(r.latency_token_s * 1e6), fmt(r.fit_s), fmt(r.flops_per_token),
            fmt(r.memory_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(table: pd.DataFrame, out: Path, config: dict[str, Any]) -> dict[str, Path]:
    from ..files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out / "predictors.parquet", "csv": out / "predictors.csv", "png": out / "predictors.png",
             "md": out / "predictors.md", "config": out / "config.yaml"}
    with atomic_path(paths["parquet"]) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown_table(table))
    with atomic_path(paths["config"]) as tmp:
        import yaml

        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    title = (f"{table.trace.iloc[0]}: {table.n_train_requests.iloc[0]} train / {table.n_test_requests.iloc[0]} test "
             f"requests, {table.batch_requests.iloc[0]} requests per batch; latency on this CPU")
    plot(table, paths["png"], title)
    return paths


@dataclass
class EvaluateConfig:
    trace: str = "random"
    limit: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    batch_requests: int = 8
    window: int = 8
    latency_batches: int = 30
    torch_threads: int = 1
    out: str = "outputs/predictors/${trace_name:${trace}}"
    predictors: dict[str, Any] = field(default_factory=dict)


def main() -> None:
    import hydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ..paths import register_resolvers

    register_resolvers()

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
    def app(cfg) -> None:
        config = OmegaConf.to_container(cfg, resolve=True)
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)  # steadier latencies on a shared CPU
        trace = load_trace(cfg.trace, cfg.limit, cfg.seed)
        preds = {}
        for name, pcfg in cfg.predictors.items():
            if pcfg is None:
                continue
            kw = {}
            if "batch_requests" in pcfg:  # the learned model trains on batches formed like the evaluation's
                kw["batch_requests"] = cfg.batch_requests
            preds[name] = instantiate(pcfg, **kw)
        table = evaluate(trace, preds, cfg.test_fraction, cfg.seed, cfg.batch_requests, cfg.window, cfg.latency_batches)
        paths = write_outputs(table, Path(cfg.out), config)
        show = table[table.phase != "all"] if (table.phase == "decode").any() else table[table.phase == "all"]
        cols = ["predictor", "phase", "set_acc", "recall_at_k", "tv", "kl", "maxload_rel_err", "latency_batch_s"]
        with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.4g}".format):
            print(show[cols].to_string(index=False))
        print(json.dumps({k: str(v) for k, v in paths.items()}))

    app()


if __name__ == "__main__":
    main()
