"""Small random traces for tests and benchmarks (real-looking shapes, fresh randomness)."""

from __future__ import annotations

import numpy as np

from .trace import RoutingTrace, TraceMeta


def random_trace(
    rng: np.random.Generator,
    n_requests: int = 4,
    prompt_len: tuple[int, int] = (3, 9),
    decode_steps: int = 3,
    n_layers: int = 2,
    n_experts: int = 8,
    top_k: int = 2,
    skew: float = 1.0,
    vocab: int = 1000,
) -> RoutingTrace:
    """A trace of ``n_requests`` requests, each a prefill of random length then ``decode_steps`` steps.

    Experts are drawn without replacement from a Zipf-like profile with exponent ``skew`` per layer
    (0 = uniform), so load matrices are uneven the way real ones are.
    """
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n_requests)
    req, step, pos = [], [], []
    for r, n in enumerate(lens):
        req += [r] * (n + decode_steps)
        step += [0] * n + list(range(1, decode_steps + 1))
        pos += list(range(n + decode_steps))
    req, step, pos = map(np.asarray, (req, step, pos))
    T = len(req)
    experts = np.empty((T, n_layers, top_k), dtype=np.int16)
    for layer in range(n_layers):
        p = 1.0 / np.arange(1, n_experts + 1) ** skew
        p = p[rng.permutation(n_experts)]
        # Gumbel top-k: distinct experts per token, marginals following p
        g = np.log(p)[None, :] + rng.gumbel(size=(T, n_experts))
        experts[:, layer] = np.argsort(-g, axis=1)[:, :top_k]
    weights = rng.dirichlet(np.ones(top_k), size=(T, n_layers)).astype(np.float32)
    weights = -np.sort(-weights, axis=-1)
    meta = TraceMeta(model="random", n_layers=n_layers, n_experts=n_experts, top_k=top_k, source="random")
    return RoutingTrace.from_token_major(
        meta, req, step, pos, rng.integers(0, vocab, size=T), experts, weights
    ).validate()
