"""The distribution-predictor benchmark's ceiling arithmetic on hand-built batches (issue 22)."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location(
    "distribution_predictors", Path(__file__).resolve().parents[1] / "benchmarks" / "distribution_predictors.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _raw(base, floor, best):
    rows = [dict(fold=0, B=4, phase=0, predictor=n, chosen=n == "cand", chosen_cheap=n == "global_profile",
                 tv=np.array(x), selections=None)
            for n, x in (("global_profile", base), ("sampling_floor", floor), ("cand", best))]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("base,floor,best,reduction,share,bar", [
    # profile 0.3, floor 0.1: 67% predictable, so the 20% bar applies; 0.2 is 1/3 below, half the gap
    ([0.4, 0.2], [0.1, 0.1], [0.25, 0.15], 1 / 3, 0.5, True),
    ([0.4, 0.2], [0.1, 0.1], [0.26, 0.26], 2 / 15, 0.2, False),
    # profile 0.1, floor 0.09: only 10% predictable, so 3/4 of the gap is the bar
    ([0.1, 0.1], [0.09, 0.09], [0.0925, 0.0925], 0.075, 0.75, True),
    ([0.1, 0.1], [0.09, 0.09], [0.095, 0.095], 0.05, 0.5, False),
])
def test_share_of_the_predictable_reduction_and_the_bar(base, floor, best, reduction, share, bar):
    t = bench.summarise(_raw(base, floor, best), np.random.default_rng(0))
    row = t[t.predictor == "best(chosen on validation)"].iloc[0]
    assert row.reduction == pytest.approx(reduction)
    assert row.share_of_predictable == pytest.approx(share)
    assert row.predictable == pytest.approx(1 - np.mean(floor) / np.mean(base))
    assert row.meets_bar == bar
    assert row.share_ci_lo <= row.share_of_predictable + 1e-12 <= row.share_ci_hi + 2e-12


def test_short_names_and_fold_choices_split_outside_parentheses():
    assert bench.short_name("prev_layer_ridge(prior=1.0,ridge=0.01,layer0=profile,token_prior=5.0)") == \
        "prev_layer_ridge(1,0.01,profile,5)"
    t = bench.summarise(_raw([0.4, 0.2], [0.1, 0.1], [0.25, 0.15]), np.random.default_rng(0))
    t.loc[t.predictor.str.startswith("best"), "chosen"] = "step_profile,token_mix(prior=1.0)"
    assert "step_profile / token_mix(1)" in bench.summary_markdown(t, "x")


def test_the_cost_bar_keeps_families_cheaper_than_token_table_at_each_batch_size():
    cost = pd.DataFrame([dict(B=1, global_profile_ms=0.01, token_mix_ms=0.05, prev_layer_ridge_ms=0.09,
                              prev_layer_ridge_given_counts_ms=0.02, token_table_ms=0.04),
                         dict(B=4, global_profile_ms=0.01, token_mix_ms=0.03, prev_layer_ridge_ms=0.2,
                              prev_layer_ridge_given_counts_ms=0.05, token_table_ms=0.04)])
    assert bench.cheaper_than_token_table(cost) == {1: {"global_profile", "prev_layer_ridge"},
                                                    4: {"global_profile", "token_mix"}}
    assert bench.family("token_mix(prior=5.0)") == "token_mix"
    # the summary reports the cheaper choice beside the unconstrained one (here: the profile itself)
    t = bench.summarise(_raw([0.4, 0.2], [0.1, 0.1], [0.25, 0.15]), np.random.default_rng(0))
    cheap = t[t.predictor == bench.BEST_CHEAP].iloc[0]
    assert cheap.chosen == "global_profile" and cheap.reduction == pytest.approx(0.0)
