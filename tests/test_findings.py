"""Regression tests for the findings of issue 20, one per finding; each fails on commit 1a7afce.

1. placement config fields reach the placement code (or are rejected);
2. predictors are scored on a separate test trace, and the output states split and batching;
3. the placement CLI scores the fitted placement on test loads (out of sample);
4. imported traces share one token-id space, and mixed id spaces are an error for token predictors;
5. the placement CLI charges the trace's model's expert bytes;
6. the hydra configs ship inside the package (so in the wheel);
7. collect runs without transformers' past_key_values FutureWarning.
"""

from __future__ import annotations

import fnmatch
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from moegps.paths import CONF_DIR, PACKAGE_ROOT, PROJECT_ROOT, register_resolvers
from moegps.placement.metrics import placement_imbalance
from moegps.predictors import make
from moegps.predictors.evaluate import evaluate
from moegps.trace import TraceError
from moegps.workloads import check_token_space, load_trace, random_trace, train_test


def _compose(name: str, overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


# ---- 1 -------------------------------------------------------------------------------------------


def test_finding1_placement_config_fields_reach_the_placement(tmp_path):
    """A sweep's balanced placement with refine on and off gives different simulated runs (the
    field reaches the code), and a field the algorithm lacks is an error, not a row that claims it."""
    from moegps.sweep import compose_config, run_one
    from moegps.results import read_results

    base = ["trace=random", "limit=24", "predictor=global_profile", "placement=balanced", "system.extra_slots_per_gpu=1",
            "batch_size=2"]
    totals = {}
    for refine in ("true", "false"):
        out = tmp_path / refine
        run_one(compose_config([*base, f"placement.refine={refine}", f"out={out}"]))
        rows = read_results(out / "runs")
        assert set(rows["config.placement.refine"]) == {refine == "true"}
        totals[refine] = rows[rows["config.role"] == "run"]["total_ms"].item()
    assert totals["true"] != totals["false"]
    with pytest.raises(ValueError, match="no field.*'colour'"):
        run_one(compose_config([*base, "+placement.colour=red", f"out={tmp_path / 'bad'}"]))


# ---- 2 -------------------------------------------------------------------------------------------


def test_finding2_predictors_fit_on_one_trace_and_score_on_another(rng, tmp_path):
    a = random_trace(rng, n_requests=12, decode_steps=2, n_layers=2, n_experts=6)
    b = random_trace(np.random.default_rng(int(rng.integers(1 << 30))), n_requests=7, decode_steps=2, n_layers=2,
                     n_experts=6)
    a.write(tmp_path / "a.parquet")
    b.write(tmp_path / "b.parquet")
    cfg = _compose("evaluate", [f"train={tmp_path / 'a.parquet'}", f"test={tmp_path / 'b.parquet'}"])
    data = train_test(trace=cfg.trace, train=cfg.train, test=cfg.test)
    fitted_on = {}

    class Spy:  # records what it was fitted on
        def __init__(self):
            self.inner = make("global_profile")

        def fit(self, trace):
            fitted_on["requests"] = len(trace.requests())
            self.inner.fit(trace)
            return self

        def __getattr__(self, name):
            return getattr(self.inner, name)

    table = evaluate(data, {"g": Spy()}, batch_requests=3, progress=False)
    assert fitted_on["requests"] == 12
    assert (table.n_test_requests == 7).all() and (table.n_train_requests == 12).all()
    assert "a.parquet" in table.protocol.iloc[0] and "b.parquet" in table.protocol.iloc[0]
    assert "arrival" in table.batching.iloc[0] and "partial" in table.batching.iloc[0]


# ---- 3 and 5 ----------------------------------------------------------------------------------------


def _deepseek_like_trace(rng, n_requests=16):
    trace = random_trace(rng, n_requests=n_requests, prompt_len=(8, 20), decode_steps=2, n_layers=2, n_experts=64,
                         top_k=6, skew=1.2)
    trace.meta.model = "deepseek-ai/DeepSeek-V2-Lite-Chat"
    return trace


def test_finding3_placement_cli_scores_fitted_placements_on_test_loads(rng, tmp_path, capsys):
    from moegps.placement.__main__ import load_source, main
    from moegps.placement.algorithms import place

    path = tmp_path / "t.parquet"
    _deepseek_like_trace(rng).write(path)
    cfg = _compose("placement_app", [f"trace={path}", "system.gpus=[8]", "system.extra_slots=[1]",
                                     "algorithms=[contiguous,balanced]", f"out={tmp_path / 'out'}"])
    df = main(cfg)
    printed = capsys.readouterr().out
    assert "out of sample" in printed and "static, test" in printed and "bound, test (in sample)" in printed
    # independent check: balanced placement fitted on the first half of the requests, scored on the rest
    trace = load_trace(str(path))
    ids = trace.requests()
    train, test = trace.with_requests(ids[:8]), trace.with_requests(ids[8:])
    fitted = place("balanced", train.loads(by="all").counts[0].astype(float), 8, 9)
    want = placement_imbalance(fitted, test.loads(by="all").counts[0].astype(float)).mean()
    row = df[(df.algorithm == "balanced") & (df.data == "test") & (df.phase == "all")]
    assert row.imb_mean.item() == pytest.approx(want, rel=1e-12)
    in_sample = df[(df.algorithm == "balanced") & (df.data == "train") & (df.phase == "all")].imb_mean.item()
    assert in_sample < row.imb_mean.item()  # fitted loads are easier than held-out ones
    assert load_source(cfg).protocol.startswith("out of sample")


def test_finding5_placement_cli_charges_the_trace_models_expert_bytes(rng, tmp_path):
    from moegps.placement.__main__ import main

    path = tmp_path / "t.parquet"
    _deepseek_like_trace(rng).write(path)
    cfg = _compose("placement_app", [f"trace={path}", "system.gpus=[8]", "system.extra_slots=[1]",
                                     "algorithms=[balanced]", f"out={tmp_path / 'out'}"])
    df = main(cfg)
    per_expert = 3 * 2048 * 1408 * 2  # DeepSeek-V2-Lite: hidden 2048, moe_intermediate 1408, bf16 SwiGLU
    np.testing.assert_allclose(df.gb_moved, df.copies * per_expert / 1e9)


# ---- 4 -------------------------------------------------------------------------------------------


def _write_deepseek_csv(path: Path, request: int, tokens: list[str], rng) -> None:
    rows = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
    for layer in range(1, 27):
        for t in tokens:
            experts = ", ".join(str(e) for e in rng.choice(64, 6, replace=False))
            rows.append(f'{layer},0,{t},"[{experts}]"')
    path.mkdir(parents=True, exist_ok=True)
    (path / f"prompt_{request}_data.csv").write_text("\n".join(rows) + "\n")


def test_finding4_imports_share_one_token_id_space(rng, tmp_path):
    """Two separately imported DeepSeek folders number their strings differently (trace-local ids);
    as train and test they are re-encoded onto one vocabulary, and the importer reads both at once."""
    _write_deepseek_csv(tmp_path / "a", 0, ["the", "cat", "sat"], rng)
    _write_deepseek_csv(tmp_path / "a", 1, ["a", "dog"], rng)
    _write_deepseek_csv(tmp_path / "b", 0, ["zebra", "the", "dog"], rng)
    a, b = load_trace(str(tmp_path / "a")), load_trace(str(tmp_path / "b"))
    vocab_a, vocab_b = a.meta.model_config["token_vocab"], b.meta.model_config["token_vocab"]
    assert vocab_a.index("the") != vocab_b.index("the")  # the trap: trace-local ids
    data = train_test(train=str(tmp_path / "a"), test=str(tmp_path / "b"))
    vocab = data.test.meta.model_config["token_vocab"]
    for word in ("the", "dog"):  # seen in training: the training trace's id
        got = np.unique(data.test.token_id[data.test.token_id == vocab.index(word)])
        assert got.tolist() == [vocab_a.index(word)]
    strings = [vocab[i] for i in data.test.by_token().token_id]
    assert strings == ["zebra", "the", "dog"]
    check_token_space(data.train, data.test)  # one space now

    from moegps.importers.deepseek_csv import read_deepseek_csv

    both = read_deepseek_csv([tmp_path / "a", tmp_path / "b"])  # several folders: one vocabulary
    assert len(both.requests()) == 3
    other = random_trace(rng, n_requests=4, n_layers=26, n_experts=64, top_k=6)  # ids of another space
    with pytest.raises(TraceError, match="different id spaces"):
        check_token_space(a, other)
    with pytest.raises(TraceError, match="different id spaces"):
        evaluate(train_test(train=a, test=other), {"t": make("token_table")}, batch_requests=2, progress=False)
    from moegps.simulator.pipeline import fit_predictors  # the simulator's pipeline refuses it too, never skips it

    with pytest.raises(TraceError, match="different id spaces"):
        fit_predictors(train_test(train=a, test=other), {"token_table": {}, "global_profile": {}})


# ---- 6 -------------------------------------------------------------------------------------------


def test_finding6_configs_ship_in_the_package():
    assert CONF_DIR.is_relative_to(PACKAGE_ROOT)
    patterns = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moegps"]
    files = [p.relative_to(PACKAGE_ROOT).as_posix() for p in CONF_DIR.rglob("*.yaml")]
    assert len(files) > 40
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"not in the wheel's package data: {missing}"


# ---- 7 -------------------------------------------------------------------------------------------


def test_finding7_collect_uses_the_current_cache_api():
    from transformers import MixtralConfig, MixtralForCausalLM

    from moegps.collect import RouterRecorder, generate_and_record
    from moegps.models.adapters import find_routers

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2)).eval()
    recorder = RouterRecorder(find_routers(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        record, generated = generate_and_record(model, recorder, [[1, 5, 9], [1, 7]], [0, 1], 4, 0, set())
    assert [len(g) for g in generated] == [4, 4]
    assert pd.Series(record.step if hasattr(record, "step") else [0]).notna().all()
