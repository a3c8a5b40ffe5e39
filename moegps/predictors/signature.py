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

``prev_layer_ridge`` adds what the token-level chain misses: a batch that leans off the profile at
layer ``l - 1`` (a language, a domain) leans off it at layer ``l`` in ways that single tokens'
transitions do not carry. It corrects the chain with a per-layer linear map of the batch's
deviation from the profile at ``l - 1``: ``p_l = chain_l + (q_{l-1} - profile_{l-1}) @ W_l``,
``W_l`` ``[E, E]`` a ridge regression fitted on the training trace's (request, step) groups
(token-weighted, one map per phase), clipped at zero and renormalised. Same inputs and critical
path as ``prev_layer``; one more ``L * E**2`` product.
"""

from __future__ import annotations

import numpy as np

from ..trace import DECODE, PREFILL, RoutingTrace
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


def layer_counts(routed: np.ndarray, n_experts: int) -> np.ndarray:
    """``routed`` ``[token, layer, k]`` expert ids -> ``[layer, E]`` selection counts (int64).

    Layer offsets are added in int16 when ``L * E`` fits it (traces store ids as int8/int16), which
    is ~4x faster than widening every id to int64 first."""
    T, L, k = routed.shape
    dtype = np.int16 if L * n_experts <= np.iinfo(np.int16).max else np.int64
    offsets = np.repeat(np.arange(L) * n_experts, k).astype(dtype)
    flat = routed.reshape(T, L * k).astype(dtype, copy=False) + offsets
    return np.bincount(flat.reshape(-1), minlength=L * n_experts).reshape(L, n_experts)


def shrunk_transition(experts: np.ndarray, profile: np.ndarray, prior: float, top_k: int) -> np.ndarray:
    """Token-major ``experts`` ``[token, layer, k]``, ``profile`` ``[layer, E]`` -> ``[layer, E, E]``
    ``P(e at l | e' at l - 1)``, each source row shrunk towards layer ``l``'s profile with ``prior``
    pseudo-selections (empirical Bayes: rare source experts fall back to the profile); rows sum to 1."""
    co = layer_transitions(experts, profile.shape[1]).astype(np.float64)
    co /= top_k  # each source selection spreads one unit over its k successors
    row = co.sum(-1, keepdims=True)
    out = (co + prior * profile[:, None, :]) / np.maximum(row + prior, 1e-12)
    out[0] = profile[0]  # unused: layer 0 has no predecessor
    return out


@register("prev_layer")
class PrevLayer(_Distribution):
    """Layer ``l`` from the batch's layer ``l - 1`` routing counts through a fitted transition matrix."""

    name = "prev_layer"

    def __init__(self, prior: float = 10.0, blend: float = 0.0, token_prior: float = 5.0, layer0: str = "token_mix"):
        if prior < 0 or not 0 <= blend <= 1 or token_prior < 0 or layer0 not in ("token_mix", "profile"):
            raise ValueError(f"{self.name}: need prior >= 0, 0 <= blend <= 1, token_prior >= 0, layer0 in "
                             f"('token_mix', 'profile'); got {prior}, {blend}, {token_prior}, {layer0!r}")
        self.prior, self.blend, self.token_prior, self.layer0 = float(prior), float(blend), float(token_prior), layer0

    def fit(self, train: RoutingTrace):
        super().fit(train)
        self.token_mix = TokenMix(prior=self.token_prior).fit(train)
        self.transition = shrunk_transition(train.by_token().experts, self.profile, self.prior, self.top_k)
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
        if self.blend > 0:
            token_part = np.array(self.token_mix.predict_next(past_loads, context))
        elif self.layer0 == "token_mix" and context.token_ids is not None and len(context.token_ids):
            # only layer 0 reads the token table: gather [tokens, E], not [tokens, L, E]
            token_part = np.zeros((L, E))  # rows 1.. are weighted by blend = 0
            token_part[0] = normalize(self.token_mix.table[self.token_mix.vocab.index(context.token_ids), 0]
                                      .mean(axis=0, dtype=np.float64))
        else:
            token_part = np.tile(self.phase_profiles[context.phase][0], (L, 1))
        if self.layer0 == "profile":
            token_part[0] = self.phase_profiles[context.phase][0]  # no per-token work for layer 0
        return self.predict_from_counts(layer_counts(routed, E), token_part)

    def cost(self):
        L, E, k = self.n_layers, self.n_experts, self.top_k
        tm = self.token_mix.cost()
        # share of token_mix's per-token work still done: all layers with blend > 0, layer 0 only
        # with blend = 0 and layer0 = token_mix, none with blend = 0 and layer0 = profile
        share = 1.0 if self.blend > 0 else (1.0 / L if self.layer0 == "token_mix" else 0.0)
        return self._cost(
            flops_per_batch=2.0 * L * E * E, flops_per_token=L * k + share * tm.flops_per_token,
            bytes_per_batch=self.transition.nbytes, bytes_per_token=share * tm.bytes_per_token,
            memory_bytes=self.transition.nbytes + (tm.memory_bytes if share else 0),
            on_critical_path=True, inputs=("routed[l-1]", "token_ids") if share else ("routed[l-1]",),
        )


@register("prev_layer_ridge")
class PrevLayerRidge(PrevLayer):
    """``prev_layer`` plus a ridge map of the batch's layer ``l - 1`` deviation from the profile."""

    name = "prev_layer_ridge"

    def __init__(self, prior: float = 10.0, ridge: float = 0.01, token_prior: float = 5.0, layer0: str = "profile"):
        super().__init__(prior=prior, blend=0.0, token_prior=token_prior, layer0=layer0)
        if ridge <= 0:
            raise ValueError(f"prev_layer_ridge: ridge must be > 0 (the deviations sum to 0, so the least-squares "
                             f"problem is singular without it); got {ridge}")
        self.ridge = float(ridge)

    def fit(self, train: RoutingTrace):
        super().fit(train)
        L, E = self.n_layers, self.n_experts
        self.maps = np.zeros((2, L, E, E))  # [phase, layer, E, E]; row 0 of each phase unused
        # one chain per phase: a decode step routes unlike a prompt, and a pooled transition drags
        # prefill batches towards decode (on the bundled MMLU trace it was worse than the profile)
        self.transitions = np.stack([self.transition, self.transition])
        groups = train.loads(by="request_step")
        for ph in (PREFILL, DECODE):
            keep = (groups.groups["step"] == 0) == (ph == PREFILL)
            if keep.sum() < 2:
                continue
            rows = train.select(train.phase == ph)
            self.transitions[ph] = shrunk_transition(rows.by_token().experts, self.phase_profiles[ph], self.prior, self.top_k)
        for ph in (PREFILL, DECODE):
            keep = (groups.groups["step"] == 0) == (ph == PREFILL)
            if keep.sum() < 2:
                self.maps[ph] = self.maps[1 - ph]  # a phase the trace lacks borrows the other's map
                continue
            counts = groups.counts[keep].astype(np.float64)  # [group, L, E]
            n = counts[:, 0].sum(-1)  # selections per group: its weight
            q = normalize(counts)
            dev = q[:, :-1] - self.phase_profiles[ph][None, :-1]  # [group, L-1, E] input at layer l-1
            resid = q[:, 1:] - self.chain(counts, ph)  # [group, L-1, E] what the chain misses at layer l
            xw = dev * n[:, None, None]
            gram = np.einsum("gle,glf->lef", xw, dev) + self.ridge * n.mean() * np.eye(E)
            self.maps[ph, 1:] = np.linalg.solve(gram, np.einsum("gle,glf->lef", xw, resid))
        # the transition's rows sum to 1, so chain_l = q_{l-1} @ T_l and the whole prediction is one
        # affine map per layer: p_l = q_{l-1} @ (T_l + W_l) - profile_{l-1} @ W_l (then clip, renormalise)
        # float32: one [E] @ [E, E] product per layer is the whole run-time work; float32 halves it.
        # The offset rides in the product as a last input row that always holds 1.
        offset = -np.einsum("ple,plef->plf", self.phase_profiles[:, :-1], self.maps[:, 1:])  # [phase, L-1, E]
        affine = self.transitions[:, 1:] + self.maps[:, 1:]  # [phase, L-1, E, E]
        self.affine = np.concatenate([affine, offset[:, :, None, :]], axis=2).astype(np.float32)  # [phase, L-1, E+1, E]
        return self

    def chain(self, counts: np.ndarray, phase: int) -> np.ndarray:
        """``counts`` ``[..., L, E]`` -> ``[..., L-1, E]`` the phase's chain fractions for layers ``1..L-1``."""
        c = np.einsum("...le,lef->...lf", counts[..., :-1, :].astype(np.float64), self.transitions[phase, 1:])
        return normalize(np.where(c.sum(-1, keepdims=True) > 0, c, self.phase_profiles[phase][1:]))

    def predict_from_counts(self, prev_counts: np.ndarray, token_part: np.ndarray, phase: int = PREFILL) -> np.ndarray:
        """``prev_counts`` ``[layer, E]`` the batch's counts, ``token_part[0]`` layer 0's fractions ->
        ``[layer, E]``: ``chain_l + (q_{l-1} - profile_{l-1}) @ W_l``, clipped at 0, rows summing to 1."""
        # every layer of a batch holds the same number of selections (tokens * k): one scalar divides all
        L, E = self.n_layers, self.n_experts
        q = np.empty((L - 1, 1, E + 1), dtype=np.float32)
        np.multiply(prev_counts[:-1], 1.0 / max(prev_counts[0].sum(), 1), out=q[:, 0, :E], casting="unsafe")
        q[:, 0, E] = 1.0
        out = np.empty((L, E))
        out[0] = token_part[0]
        np.maximum(np.matmul(q, self.affine[phase])[:, 0], 0.0, out=out[1:])
        total = out.sum(-1, keepdims=True)
        return out / total if (total > 0).all() else normalize(out)

    def predict_next(self, past_loads, context: BatchContext):
        routed = None if context.tokens is None else context.tokens.routed
        if routed is None or len(routed) == 0:
            return self.token_mix.predict_next(past_loads, context)
        if self.layer0 == "profile":
            token_part = self.phase_profiles[context.phase]
        else:
            token_part = np.zeros((self.n_layers, self.n_experts))
            token_part[0] = normalize(self.token_mix.table[self.token_mix.vocab.index(context.token_ids), 0]
                                      .mean(axis=0, dtype=np.float64))
        return self.predict_from_counts(layer_counts(routed, self.n_experts), token_part, int(context.phase))

    def cost(self):
        # run time: the histogram of layer l-1's selections (per token), then one [E+1] @ [E+1, E]
        # float32 product per layer from one phase's maps (per batch); layer 0 as prev_layer's
        c = super().cost()
        c.flops_per_batch = 2.0 * self.affine[0].size
        c.bytes_per_batch = self.affine[0].nbytes
        c.memory_bytes = self.affine.nbytes + (c.memory_bytes - self.transition.nbytes)
        return c
