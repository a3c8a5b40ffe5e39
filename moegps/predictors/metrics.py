"""Accuracy metrics for both predictor families; pure functions over arrays.

Token family: per (token, layer), ``set_match`` (the predicted top-k *set* equals the true one)
and ``recall_at_k`` (share of the true k experts that were predicted). Distribution family (and
token predictors through their aggregated load): per (batch, layer), total variation
``0.5 * sum|p - q|`` (so L1 = 2 TV), ``KL(true || predicted)`` with additive smoothing, the
relative error of the predicted hottest-expert share, the absolute error in max/mean imbalance,
and whether the hottest expert was named.
"""

from __future__ import annotations

import numpy as np


def recall_at_k(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``[..., k]`` predicted and true ids (distinct per row) -> ``[...]`` float share of true ids found."""
    hits = (pred[..., :, None] == true[..., None, :]).any(axis=-2).sum(axis=-1)
    return hits / true.shape[-1]


def set_match(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``[..., k]`` -> ``[...]`` bool: the predicted set equals the true set (order ignored)."""
    return recall_at_k(pred, true) == 1.0


def distribution_errors(pred: np.ndarray, true_counts: np.ndarray, eps: float = 1e-3) -> dict[str, np.ndarray]:
    """``pred`` ``[..., expert]`` fractions vs ``true_counts`` ``[..., expert]`` -> dict of ``[...]`` arrays.

    ``kl`` smooths both sides with ``eps`` per expert (then renormalises) so an expert that the
    predictor gave 0 and the batch used costs a large but finite amount.
    """
    E = true_counts.shape[-1]
    n = true_counts.sum(axis=-1, keepdims=True)
    q = true_counts / np.maximum(n, 1)
    p = np.asarray(pred, dtype=np.float64)
    ps, qs = (p + eps) / (1 + E * eps), (q + eps) / (1 + E * eps)
    qmax, pmax = q.max(axis=-1), p.max(axis=-1)
    return {
        "tv": 0.5 * np.abs(p - q).sum(axis=-1),
        "kl": (qs * np.log(qs / ps)).sum(axis=-1),
        "maxload_rel_err": np.abs(pmax - qmax) / np.maximum(qmax, 1e-12),
        "imbalance_err": E * np.abs(pmax - qmax),  # max/mean = E * max share
        "hot_expert_hit": (p.argmax(axis=-1) == q.argmax(axis=-1)).astype(np.float64),
    }
