"""The results report: tables on a hand-built results store with known answers, and the command end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from moegps.report import (decision_table, load_results, main, placement_table, predictor_table, results_report,
                           sim_vs_measured)
from moegps.results import make_row, write_rows


def _config(key, role, predictor, family, placement, link, batch, slots=1):
    return {"key": key, "role": role, "trace": "/x/t.parquet", "batch_size": batch, "family": family,
            "predictor": {"name": predictor}, "placement": {"name": placement},
            "system": {"name": "h100_8gpu", "n_gpus": 8, "link_gbps": link, "extra_slots": slots},
            "predictor_cost": {"work_ms": 0.5}}


def _store(tmp_path, rng):
    """Runs of 2 predictors x 2 placements x 2 links x 2 batches, random times; each run's shard has its
    baseline and oracle rows, as moegps.sweep writes them. Returns the folder and the times drawn."""
    times = {}
    preds = {"global_profile": "distribution", "token_table": "token"}
    for n, (pred, place, link, batch) in enumerate(itertools.product(preds, ["contiguous", "balanced"], [450.0, 32.0],
                                                                     [4, 32])):
        key = f"k{n:03d}"
        base = 100.0 + 10 * (link == 32.0) + batch  # the baseline depends only on the variant
        t = float(rng.uniform(50, 150))
        times[(pred, place, link, batch)] = (t, base)
        rows = [make_row(_config(key, "run", pred, preds[pred], place, link, batch), backend="sim", device="sim:h100",
                         total_ms=t, moe_ms=t / 2, tokens=1000, predictor_ms=float(rng.uniform(0, 1)),
                         predictor_accuracy=float(rng.uniform(0.2, 0.9)), imbalance=float(rng.uniform(1, 2))),
                make_row(_config(key, "baseline", "", "baseline", "contiguous", link, batch), backend="sim",
                         device="sim:h100", total_ms=base, moe_ms=base / 2, tokens=1000, imbalance=2.0),
                make_row(_config(key, "oracle", "", "oracle", place, link, batch), backend="sim", device="sim:h100",
                         total_ms=40.0, moe_ms=20.0, tokens=1000, imbalance=1.0)]
        write_rows(rows, tmp_path / "runs" / key / "rows.parquet")
    return tmp_path, times


def test_tables_have_the_known_answers(tmp_path, rng):
    store, times = _store(tmp_path, rng)
    df = load_results(store)
    runs = df[df["config.role"] == "run"]
    for _, r in runs.iterrows():
        t, base = times[(r["config.predictor.name"], r["config.placement.name"], r["config.system.link_gbps"],
                         r["config.batch_size"])]
        assert r.speedup == pytest.approx(base / t, rel=1e-12)

    pt = predictor_table(df).set_index("predictor")
    for pred in ("global_profile", "token_table"):
        mine = runs[runs["config.predictor.name"] == pred]
        assert pt.loc[pred, "accuracy"] == pytest.approx(mine.predictor_accuracy.mean())
        assert pt.loc[pred, "speedup_best"] == pytest.approx(max(base / t for (p, *_), (t, base) in times.items()
                                                                 if p == pred))
        assert pt.loc[pred, "work_us_per_token"] == pytest.approx(0.5 * 1e3 / 1000)

    dt = decision_table(df)
    assert len(dt) == 4  # 2 links x 2 batches
    for _, r in dt.iterrows():
        best = {fam: min((t, f"{p}+{pl}") for (p, pl, link, b), (t, _) in times.items()
                         if link == r.link_gbps and b == r.batch_size
                         and (p == "global_profile") == (fam == "distribution")) for fam in ("distribution", "token")}
        assert r.distribution_ms == pytest.approx(best["distribution"][0])
        assert r.best_token == best["token"][1]
        assert r.gain_dist_over_token == pytest.approx(best["token"][0] / best["distribution"][0] - 1)
        assert r.winner_family == min(best, key=lambda f: best[f][0])
        assert r.baseline_ms == pytest.approx(100.0 + 10 * (r.link_gbps == 32.0) + r.batch_size)
        assert r.true_loads_placement_ms == 40.0

    pl = placement_table(df)
    for _, r in pl.iterrows():
        mine = runs[(runs["config.placement.name"] == r.placement) & (runs["config.batch_size"] == r.batch_size)]
        assert r.imbalance == pytest.approx(mine.imbalance.mean())
        assert r.true_loads_imbalance == 1.0

    assert sim_vs_measured(df).empty  # no exec rows


def test_sim_vs_measured_pairs_on_config_and_compares_per_token(tmp_path, rng):
    store, times = _store(tmp_path, rng)
    measured = float(rng.uniform(10, 90))
    row = make_row({"key": "x1", "role": "run", "trace": "/elsewhere/x/t.parquet", "batch_size": 4,
                    "predictor": {"name": "global_profile"}, "placement": {"name": "balanced"}},
                   backend="exec", device="NVIDIA H100 x1", moe_ms=measured, total_ms=measured, tokens=500)
    write_rows([row], store / "runs" / "x1" / "rows.parquet")
    table = sim_vs_measured(load_results(store))
    assert len(table) == 1
    sims = [t / 2 * 1e3 / 1000 for (p, pl, link, b), (t, _) in times.items()
            if p == "global_profile" and pl == "balanced" and b == 4]
    r = table.iloc[0]
    assert r.simulated_us_per_token == pytest.approx(np.median(sims))
    assert r.measured_us_per_token == pytest.approx(measured * 1e3 / 500)
    assert r.error == pytest.approx(np.median(sims) / (measured * 1e3 / 500) - 1)
    files = results_report(store, tmp_path / "report")
    for name in ("predictors", "decision", "end_to_end", "placement", "sim_vs_measured"):
        for ext in ("png", "svg"):
            assert (tmp_path / "report" / f"{name}.{ext}").stat().st_size > 1000
    assert "sim_vs_measured.png" in files


def test_command_writes_tables_and_plots(tmp_path, rng, capsys):
    store, _ = _store(tmp_path / "store", rng)
    main(["results", str(store), "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert "Decision regions" in text and "no executor results" in text
    decision = pd.read_csv(tmp_path / "out" / "decision.csv")
    assert set(decision.winner_family) <= {"distribution", "token"}
    assert (tmp_path / "out" / "decision.svg").is_file() and not (tmp_path / "out" / "sim_vs_measured.png").exists()
    with pytest.raises(FileNotFoundError, match="no results"):
        load_results(tmp_path / "empty_does_not_exist")
