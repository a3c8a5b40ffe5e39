"""Accuracy-vs-overhead figures for predictors, with labels that neither overlap nor hide each other.

Two things made the old scatter hard to read: predictors with identical predictions (the global,
phase and own-prefill profiles on a prefill-only trace) sit on one spot and their labels were drawn
on top of each other, and labels of neighbouring points collided. Here points that coincide share
one label (``"a = b = c"``), and every label is placed greedily at the first offset around its point
whose box overlaps no label already placed and no marker (a thin leader line when it had to move far).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..files import save_png

# candidate label offsets (points) around a marker, nearest first
_OFFSETS = [(5, 3), (5, -10), (-5, 3), (-5, -10), (5, 12), (5, -19), (-5, 12), (-5, -19), (5, 22), (5, -29),
            (-5, 22), (-5, -29), (14, 32), (14, -40), (-14, 32), (-14, -40), (24, 44), (24, -52), (-24, 44),
            (-24, -52)]


def coinciding_groups(x: np.ndarray, y: np.ndarray, x_factor: float = 2.0, y_rel: float = 1e-6) -> list[list[int]]:
    """Indices of points that would be drawn on one spot: ``y`` equal within ``y_rel`` (relative) and
    ``x`` within a factor ``x_factor`` (the axes are logarithmic, and latencies of one table read
    measured on a shared CPU differ by up to ~2x from call to call). Each group is sorted by ``x``;
    groups are in order of their first member."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    groups: list[list[int]] = []
    for i in np.argsort(x, kind="stable"):
        for g in groups:
            j = g[0]
            if abs(y[i] - y[j]) <= y_rel * max(abs(y[j]), 1e-300) and x[i] <= x[j] * x_factor and x[j] <= x[i] * x_factor:
                g.append(int(i))
                break
        else:
            groups.append([int(i)])
    return sorted(groups, key=lambda g: g[0])


def place_labels(ax, x, y, labels, fontsize: float = 7, marker_pts: float = 7) -> list:
    """Annotate ``labels`` at data points ``(x, y)`` so that no two label boxes overlap and no label
    covers a marker (``marker_pts``: marker size in points); returns the ``Annotation`` objects.
    Labels are placed greedily, highest point first, at the first free offset of ``_OFFSETS``;
    when none is free, at the offset with the least overlap."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the transforms the boxes are measured in
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    pts = ax.transData.transform(np.column_stack([x, y]).astype(float))
    half = marker_pts * to_px / 2
    markers = [(px - half, py - half, px + half, py + half) for px, py in pts]
    placed: list[tuple[float, float, float, float]] = []
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    out = []
    for i in np.argsort(-pts[:, 1], kind="stable"):
        best, best_cost = None, np.inf
        for dx, dy in _OFFSETS:
            text = ax.annotate(labels[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha="left" if dx >= 0 else "right")
            bb = text.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            outside = (box[2] - box[0]) * (box[3] - box[1]) - _overlap(box, frame)  # labels stay in the axes
            cost = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, m) for m in markers) + 10 * outside
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (text, box, (dx, dy)), cost
            else:
                text.remove()
            if cost == 0:
                break
        text, box, (dx, dy) = best
        if (dx, dy) not in _OFFSETS[:2]:  # not right beside its point: a leader line says which point it names
            text.remove()
            text = ax.annotate(labels[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha="left" if dx >= 0 else "right",
                               arrowprops=dict(arrowstyle="-", lw=0.5, color="grey", shrinkA=0, shrinkB=3))
        placed.append(box)
        out.append(text)
    return out


def _overlap(a, b) -> float:
    """Area of the intersection of two boxes ``(x0, y0, x1, y1)``."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def predictors_figure(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Accuracy vs overhead, one row of two panels per phase (prefill and decode when the trace has
    both, else the one phase): load error (TV) vs latency per batch (both families); recall@k vs
    latency per token (token family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [ph for ph in ("prefill", "decode") if (table.phase == ph).any()]
    phases = phases if len(phases) == 2 else ["all"]
    fig, axes = plt.subplots(len(phases), 2, figsize=(13, 5.6 * len(phases)), squeeze=False)
    for (a, b), phase in zip(axes, phases):
        t = table[table.phase == phase]
        for fam, marker, color in (("distribution", "o", "tab:blue"), ("token", "s", "tab:orange")):
            d = t[t.family == fam]
            a.scatter(d.latency_batch_s * 1e6, d.tv, marker=marker, color=color, label=fam, zorder=3)
        a.set_xscale("log")
        a.set_yscale("log")  # errors span 0.03-0.8: a linear axis squeezes the good ones together
        _pad_log(a, t.latency_batch_s * 1e6, t.tv)
        a.set_xlabel("latency per batch, median (us, this CPU)")
        a.set_ylabel("load error: total variation per layer (lower is better)")
        a.set_title(f"{phase}: next-batch load distribution (a = b: identical error, one spot)")
        a.legend(loc="lower left")
        _label_groups(a, t.latency_batch_s.to_numpy() * 1e6, t.tv.to_numpy(), list(t.predictor))
        d = t[t.family == "token"]
        b.scatter(d.latency_token_s * 1e6, d.recall_at_k, marker="s", color="tab:orange", zorder=3)
        b.set_xscale("log")
        _pad_log(b, d.latency_token_s * 1e6, None)
        b.set_xlabel("latency per token (us, this CPU)")
        b.set_ylabel("recall@k (higher is better)")
        b.set_title(f"{phase}: token-to-expert")
        _label_groups(b, d.latency_token_s.to_numpy() * 1e6, d.recall_at_k.to_numpy(), list(d.predictor))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def _label_groups(ax, x, y, names) -> list:
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y, names = x[ok], y[ok], [n for n, k in zip(names, ok) if k]
    groups = coinciding_groups(x, y)
    labels = [" = ".join(names[i] for i in g) for g in groups]
    for a, g in enumerate(groups):  # identical error elsewhere on the axis: say so rather than let it pass
        same = [h for h in groups[:a] if abs(y[h[0]] - y[g[0]]) <= 1e-6 * abs(y[g[0]])]
        if same:
            labels[a] += f" (same error as {names[same[0][0]]})"
    return place_labels(ax, x[[g[0] for g in groups]], y[[g[0] for g in groups]], labels)


def _pad_log(ax, x, y) -> None:
    """Room around the points for labels: a factor of 3 left and 6 right on a log x axis, 25% on y."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x) & (x > 0)]
    if len(x):
        ax.set_xlim(x.min() / 3, x.max() * 6)
    if y is not None:
        y = np.asarray(y, float)
        y = y[np.isfinite(y) & (y > 0)]
        if len(y):
            ax.set_ylim(y.min() / 1.25, y.max() * 1.25)
