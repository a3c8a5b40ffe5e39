"""The kernel benchmark's plot: series extraction against a shuffled table, the PNG, bad input."""

import numpy as np
import pandas as pd
import pytest

from moegps.kernels.plot import CURVES, REFERENCES, plot_bench, read_bench, series

TOKENS = [1, 8, 32, 128, 512, 2048, 8192, 16384]


def random_bench(rng, path, shapes=("mixtral-8x7b", "deepseek-v2-lite")):
    """A bench.csv of the shapes with random percentages, rows shuffled, one value missing."""
    columns = [*CURVES.values(), *REFERENCES.values()]
    rows = [{"shape": shape, "tokens": t, **{c: rng.uniform(20, 100) for c in columns}}
            for shape in shapes for t in TOKENS]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=int(rng.integers(2**31)))
    df.loc[(df["shape"] == "deepseek-v2-lite") & (df["tokens"] == 512), "pct_floor_gmm"] = np.nan
    df.to_csv(path, index=False)
    return df


def test_series_is_one_shape_in_token_order_without_gaps(rng, tmp_path):
    df = random_bench(rng, tmp_path / "bench.csv")
    tokens, pct = series(read_bench(tmp_path / "bench.csv"), "deepseek-v2-lite", "pct_floor_gmm")
    assert list(tokens) == [t for t in TOKENS if t != 512]
    expected = [df[(df["shape"] == "deepseek-v2-lite") & (df["tokens"] == t)]["pct_floor_gmm"].item()
                for t in tokens]
    np.testing.assert_allclose(pct, expected)


def test_plot_writes_a_png(rng, tmp_path):
    random_bench(rng, tmp_path / "clean.csv")
    random_bench(rng, tmp_path / "zero.csv")
    out = plot_bench(tmp_path / "clean.csv", tmp_path / "zero.csv", tmp_path / "img" / "k.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "img").iterdir()) == [out]  # no temporary file left beside it


def test_plot_of_a_shape_with_its_shared_expert_among_the_experts(rng, tmp_path):
    random_bench(rng, tmp_path / "clean.csv", shapes=("deepseek-v2-lite", "deepseek-v2-lite+shared"))
    out = plot_bench(tmp_path / "clean.csv", None, tmp_path / "k.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_csv_that_is_not_the_benchmarks_is_named(tmp_path):
    pd.DataFrame({"shape": ["mixtral-8x7b"], "tokens": [1]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match=r"x\.csv: not a moegps.kernels.bench CSV.*pct_floor"):
        read_bench(tmp_path / "x.csv")


def test_plot_with_the_runs_recorded_routing(rng, tmp_path):
    """A run's trace.csv (ours on recorded routing, rows per layer) adds a curve per layer to its shape's
    panel; shapes it has no rows for are drawn as before."""
    random_bench(rng, tmp_path / "clean.csv")
    pd.DataFrame([{"shape": "deepseek-v2-lite", "tokens": t, "routing": f"puffin layer {layer}",
                   "pct_floor": rng.uniform(20, 100)} for layer in (0, 25) for t in (512, 2048, 8192)]
                 ).to_csv(tmp_path / "trace.csv", index=False)
    out = plot_bench(tmp_path / "clean.csv", None, tmp_path / "k.png", trace=tmp_path / "trace.csv")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
