"""Score every predictor out of sample: accuracy and overhead side by side, per phase.

Library: ``evaluate(data, predictors, ...) -> pandas.DataFrame`` (one row per predictor and
phase; ``data`` a :class:`moegps.workloads.TrainTest` or one trace to split). Command line (hydra;
``moegps/conf/evaluate.yaml``)::

    python -m moegps.predictors.evaluate trace=deepseek            # the real DeepSeek-V2-Lite trace
    python -m moegps.predictors.evaluate train=a.parquet test=b.parquet   # fit on one trace, score on another
    python -m moegps.predictors.evaluate trace=/path/to/trace.parquet batch_requests=16 split=random seed=3
    python -m moegps.predictors.evaluate trace=random              # offline smoke run

writes ``predictors.parquet``, ``predictors.csv``, ``predictors.md`` (a compact table per phase),
``predictors.png`` (accuracy vs overhead, per phase) and ``config.yaml`` to ``out`` (default ``outputs/predictors/<trace name>``).

Protocol. Predictors are fitted on training requests only and scored on test requests
(:func:`moegps.workloads.train_test`): a ``train=`` and a ``test=`` trace, or one trace split by
whole requests in arrival order (``split=random``: a seeded draw); the output states which. Token
predictors refuse a test trace whose token ids live in another id space. Test requests are served
in request-id (arrival) order by a static-batching server, ``batch_requests`` per batch, the last
batch partial when they do not divide evenly (see :mod:`.batching`): each distribution predictor is called once per
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

from ..configs import (ConfigError, all_or_first_n, check_arguments, checked, fraction, nonnegative, one_of, optional, positive,
                       hydra_command, register, validate)
from ..files import atomic_path
from ..trace import DECODE, PREFILL, RoutingTrace
from ..workloads import TrainTest, check_token_space, train_test
from .base import DistributionPredictor, TokenPredictor, normalize
from .batching import BatchStream, batch_context, batch_stream
from .metrics import distribution_errors, recall_at_k
from .plot import predictors_figure

PHASE_NAMES = {PREFILL: "prefill", DECODE: "decode"}


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


def batching_note(batch_requests: int) -> str:
    """How the evaluation serves test requests, for its output."""
    return (f"test requests served in request-id (arrival) order, {batch_requests} per batch, the last batch "
            "partial when they do not divide evenly")


def evaluate(
    data: TrainTest | RoutingTrace,
    predictors: dict[str, DistributionPredictor | TokenPredictor],
    test_fraction: float = 0.2,
    seed: int = 0,
    batch_requests: int = 8,
    window: int = 8,
    latency_batches: int = 30,
    progress: bool = True,
    split: str = "arrival",
) -> pd.DataFrame:
    """Fit each predictor on the train requests, score it on the test requests; one row per (predictor, phase).

    ``data``: training and test requests (:func:`moegps.workloads.train_test`), or one trace, split
    here by request (``split``, ``test_fraction``, ``seed``).

    Columns: predictor, family, phase, the token metrics (``set_acc``, ``recall_at_k``; token
    family only), the load metrics (``tv``, ``l1``, ``kl``, ``maxload_rel_err``,
    ``imbalance_err``, ``hot_expert_hit``; for token predictors through their aggregated loads),
    ``latency_batch_s``, ``latency_token_s``, ``fit_s``, the cost fields of :class:`PredictorCost`,
    batch and token counts, and the trace's name.
    """
    from tqdm.auto import tqdm

    if isinstance(data, RoutingTrace):
        data = train_test(trace=data, test_fraction=test_fraction, split=split, seed=seed)
    train, test = data.train, data.test
    stream = batch_stream(test, batch_requests, window=window)
    phases_tok = stream.tokens.phase
    rows: list[dict[str, Any]] = []
    common = {
        "trace": data.name, "batch_requests": batch_requests, "seed": seed, **data.as_row(),
        "protocol": data.describe(), "batching": batching_note(batch_requests),
    }
    bar = tqdm(predictors.items(), disable=not progress, desc="predictors")
    for label, p in bar:
        bar.set_postfix_str(label)
        if not hasattr(p, "predict_next"):
            check_token_space(train, test, where=f"predictor {label!r}")
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
    out.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out / "predictors.parquet", "csv": out / "predictors.csv", "png": out / "predictors.png",
             "md": out / "predictors.md", "config": out / "config.yaml"}
    with atomic_path(paths["parquet"]) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(f"{table.protocol.iloc[0]}; {table.batching.iloc[0]}.\n\n" + markdown_table(table))
    with atomic_path(paths["config"]) as tmp:
        import yaml

        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    title = (f"{table.trace.iloc[0]}: {table.protocol.iloc[0]};\n{table.batch_requests.iloc[0]} requests per batch "
             "(arrival order); latency on this CPU")
    predictors_figure(table, paths["png"], title)
    return paths


@dataclass
class EvaluateConfig:
    trace: str = "random"
    train: str | None = None  # with test: fit on this trace, score on that one (trace is then unused)
    test: str | None = None
    limit: int | None = checked(None, all_or_first_n)
    test_fraction: float = checked(0.2, fraction)
    split: str = checked("arrival", one_of("arrival", "random"))  # arrival | random (seeded)
    seed: int = checked(0, nonnegative)
    batch_requests: int = checked(8, positive)
    window: int = checked(8, positive)
    latency_batches: int = checked(30, positive)
    torch_threads: int | None = checked(1, optional(positive))
    out: str = "outputs/predictors/${trace_name:${trace}}"
    predictors: dict[str, Any] = field(default_factory=dict)


register("evaluate_schema", EvaluateConfig)


def app(raw) -> None:
    """The command on a composed config (moegps/conf/evaluate.yaml): fit, score, write, print."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(raw, resolve=True)
    cfg = validate(config, EvaluateConfig, "predictors.evaluate")
    specs = {name: pcfg for name, pcfg in (cfg.predictors or {}).items() if pcfg is not None}
    for name, pcfg in specs.items():
        check_arguments(get_class(pcfg["_target_"]), pcfg, f"predictors.evaluate: predictors.{name}")
    if not specs:
        raise ConfigError("predictors.evaluate: config field 'predictors' is empty; name at least one predictor")
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)  # steadier latencies on a shared CPU
    data = train_test(trace=cfg.trace, train=cfg.train, test=cfg.test, test_fraction=cfg.test_fraction,
                      split=cfg.split, seed=cfg.seed, limit=cfg.limit)
    print(f"{data.describe()}; {batching_note(cfg.batch_requests)}")
    preds = {}
    for name, pcfg in specs.items():
        kw = {}
        if "batch_requests" in pcfg:  # the learned model trains on batches formed like the evaluation's
            kw["batch_requests"] = cfg.batch_requests
        preds[name] = instantiate(pcfg, **kw)
    table = evaluate(data, preds, cfg.test_fraction, cfg.seed, cfg.batch_requests, cfg.window, cfg.latency_batches)
    paths = write_outputs(table, Path(cfg.out), config)
    show = table[table.phase != "all"] if (table.phase == "decode").any() else table[table.phase == "all"]
    cols = ["predictor", "phase", "set_acc", "recall_at_k", "tv", "kl", "maxload_rel_err", "latency_batch_s"]
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        print(show[cols].to_string(index=False))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def main() -> None:
    hydra_command(app, "evaluate", "predictors.evaluate", errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
