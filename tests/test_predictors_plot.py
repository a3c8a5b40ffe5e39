"""The predictors figure: coinciding points share one label, and no two labels overlap (issue 21, finding 11)."""

import numpy as np
import pandas as pd
import pytest

from moegps.predictors.plot import coinciding_groups, predictors_figure


def test_coinciding_groups_join_only_points_on_one_spot():
    x = np.array([1.90, 1.92, 24.0, 1.95, 3.5])
    y = np.array([0.368, 0.368, 0.368, 0.3681, 0.368])
    # 0, 1 and 4: same error within a factor 2 of latency (one spot, given a shared CPU's timing
    # noise); 2: same error, 12x slower (its own spot); 3: another error
    assert coinciding_groups(x, y) == [[0, 1, 4], [2], [3]]
    assert coinciding_groups(x, y, x_factor=1.25) == [[0, 1], [2], [3], [4]]


def _crowded_table(rng) -> pd.DataFrame:
    """A table like a prefill-only evaluation: three profiles with identical error at ~2 us, plus a
    crowd of predictors within a factor of two of each other on both axes."""
    rows = [dict(predictor=n, family="distribution", latency_batch_s=l * 1e-6, tv=0.368, recall_at_k=np.nan,
                 latency_token_s=np.nan) for n, l in (("global_profile", 1.90), ("phase_profile", 1.92), ("own_prefill", 1.99),
                                                      ("step_profile", 24.0))]
    for i in range(12):
        fam = "token" if i % 2 else "distribution"
        rows.append(dict(predictor=f"predictor_{i}_{rng.integers(1000)}", family=fam,
                         latency_batch_s=rng.uniform(5, 12) * 1e-6, tv=rng.uniform(0.30, 0.40),
                         recall_at_k=rng.uniform(0.4, 0.5) if fam == "token" else np.nan,
                         latency_token_s=rng.uniform(0.1, 0.3) * 1e-6 if fam == "token" else np.nan))
    t = pd.DataFrame(rows)
    t["phase"] = "all"
    return t


@pytest.mark.parametrize("seed", [0, 1])
def test_predictors_figure_labels_do_not_overlap_and_name_coinciding_points(tmp_path, monkeypatch, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    figures = []
    monkeypatch.setattr("moegps.predictors.plot.save_png", lambda fig, path, dpi=110: figures.append(fig) or path)
    table = _crowded_table(np.random.default_rng(seed))
    predictors_figure(table, tmp_path / "p.png")
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        texts = [c for c in ax.texts]
        labels = [t.get_text() for t in texts]
        # the text's own box (an Annotation's extent also covers its leader line, which may cross labels)
        boxes = [Text.get_window_extent(t, renderer) for t in texts]
        frame = ax.get_window_extent(renderer)
        for lab, bb in zip(labels, boxes):  # inside the axes, clear of the axis labels
            assert frame.x0 - 1 <= bb.x0 and bb.x1 <= frame.x1 + 1 and frame.y0 - 1 <= bb.y0 and bb.y1 <= frame.y1 + 1, lab
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), f"labels overlap: {labels[i]!r} and {labels[j]!r}"
        if ax.get_title().startswith("all: next-batch"):
            assert "global_profile = phase_profile = own_prefill" in labels  # one label for one spot
            assert not any(lab == "phase_profile" for lab in labels)
            assert "step_profile (same error as global_profile)" in labels  # apart on x, same error: said
            assert len(labels) == len(table) - 2  # every other predictor labelled once
    plt.close(fig)
