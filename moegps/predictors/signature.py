"""Distribution predictors that read a signature of the batch known before the layer runs.

``prev_layer`` predicts layer ``l``'s load fractions from the batch's own routing counts at layer
``l - 1`` (which a server's load counters hold once layer ``l - 1``'s router has run, i.e. before
layer ``l``'s attention): ``p_l = normalize(c_{l-1} @ T_l)`` with ``T_l[e', e] = P(e at l | e' at
l-1)`` counted on the training trace and shrunk towards layer ``l``'s profile with ``prior``
pseudo-selections per row (empirical Bayes: rare source experts fall back to the profile). Layer 0
has no previous layer and gets :class:`~.distribution.TokenMix`'s answer from the batch's token ids.
``blend`` mixes in TokenMix at every layer: ``p = (1 - blend) * chain + blend * token_mix``.

It sits **on the critical path**: layer ``l``'s answer exists only after layer ``l - 1``'s router,
so it can steer per-layer decisions taken between layers (how to split a replicated expert's tokens,
which replica to send to) but not a placement that must be in memory before the batch starts.
Cost per batch: a histogram of layer ``l - 1``'s selections (already kept by the server) and one
``[E] @ [E, E]`` product per layer, i.e. ``L * E**2`` multiply-adds whatever the batch size.
"""

from __future__ import annotations

import numpy as np

from ..trace import RoutingTrace
from .base import BatchContext, normalize, register
from .distribution import TokenMix, _Distribution


def layer_transitions(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Token-major ``experts`` ``[token, layer, k]`` -> ``[layer, E, E]`` co-selection counts.

    ``out[l, a, b]`` counts (token, i, j) with expert ``a`` the i-th choice at layer ``l - 1`` and
    ``b`` the j-th choice at layer ``l`` (row ``l = 0`` is zero).
    """
    T, L, k = experts.shape
    E = n_experts
    out = np.zeros((L, E, E), dtype=np.int64)
    for layer in range(1, L):
        a = experts[:, layer - 1, :].astype(np.int64)[:, :, None]
        b = experts[:, layer, :].astype(np.int64)[:, None, :]
        flat = np.broadcast_to(a * E + b, (T, k, k)).reshape(-1)
        out[layer] = np.bincount(flat, minlength=E * E).reshape(E, E)
    return out


@register("prev_layer")
class PrevLayer(_Distribution):
    """Layer ``l`` from the batch's layer ``l - 1`` routing counts through a fitted transition matrix."""

    name = "prev_layer"

    def __init__(self, prior: float = 10.0, blend: float = 0.0, token_prior: float = 5.0):
        if prior < 0 or not 0 <= blend <= 1 or token_prior < 0:
            raise ValueError(f"prev_layer: need prior >= 0, 0 <= blend <= 1, token_prior >= 0; got {prior}, {blend}, {token_prior}")
        self.prior, self.blend, self.token_prior = float(prior), float(blend), float(token_prior)

    def fit(self, train: RoutingTrace):
        super().fit(train)
        self.token_mix = TokenMix(prior=self.token_prior).fit(train)
        co = layer_transitions(train.by_token().experts, self.n_experts).astype(np.float64)
        co /= self.top_k  # each source selection spreads one unit over its k successors
        row = co.sum(-1, keepdims=True)
        # shrink each source expert's row towards the target layer's profile (empirical Bayes)
        self.transition = (co + self.prior * self.profile[:, None, :]) / np.maximum(row + self.prior, 1e-12)
        self.transition[0] = self.profile[0]  # unused: layer 0 has no predecessor
        return self

    def predict_from_counts(self, prev_counts: np.ndarray, token_part: np.ndarray) -> np.ndarray:
        """``prev_counts`` ``[layer, E]`` the batch's counts (row ``l`` = layer ``l``'s selections),
        ``token_part`` ``[layer, E]`` TokenMix's fractions -> ``[layer, E]`` predicted fractions."""
        chain = np.einsum("le,lef->lf", prev_counts[:-1].astype(np.float64), self.transition[1:])
        chain = np.where(chain.sum(-1, keepdims=True) > 0, chain, self.profile[1:])
        out = np.empty_like(token_part)
        out[0] = token_part[0]
        out[1:] = (1 - self.blend) * normalize(chain) + self.blend * token_part[1:]
        return normalize(out)

    def predict_next(self, past_loads, context: BatchContext):
        routed = None if context.tokens is None else context.tokens.routed
        if routed is None or len(routed) == 0:
            return self.token_mix.predict_next(past_loads, context)
        L, E = self.n_layers, self.n_experts
        if self.blend == 0 and context.token_ids is not None and len(context.token_ids):
            # only layer 0 reads the token table: gather [tokens, E], not [tokens, L, E]
            token_part = np.zeros((L, E))  # rows 1.. are weighted by blend = 0
            token_part[0] = normalize(self.token_mix.table[self.token_mix.vocab.index(context.token_ids), 0]
                                      .mean(axis=0, dtype=np.float64))
        else:
            token_part = self.token_mix.predict_next(past_loads, context)
        flat = np.arange(L)[None, :, None] * E + routed.astype(np.int64)
        counts = np.bincount(flat.reshape(-1), minlength=L * E).reshape(L, E)
        return self.predict_from_counts(counts, token_part)

    def cost(self):
        L, E, k = self.n_layers, self.n_experts, self.top_k
        tm = self.token_mix.cost()
        return self._cost(
            flops_per_batch=2.0 * L * E * E, flops_per_token=L * k + tm.flops_per_token,
            bytes_per_batch=self.transition.nbytes, bytes_per_token=tm.bytes_per_token,
            memory_bytes=self.transition.nbytes + tm.memory_bytes,
            on_critical_path=True, inputs=("routed[l-1]", "token_ids"),
        )
