"""prev_layer against a brute-force loop over tokens and selections (float64), on fresh random traces."""

import numpy as np
import pytest

from moegps.predictors import make
from moegps.predictors.batching import batch_context, batch_stream
from moegps.predictors.signature import layer_transitions
from moegps.workloads import random_trace


def test_layer_transitions_match_a_loop():
    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(6)[:2] for _ in range(40 * 3)]).reshape(40, 3, 2)
    ref = np.zeros((3, 6, 6))
    for t in range(40):
        for layer in range(1, 3):
            for a in experts[t, layer - 1]:
                for b in experts[t, layer]:
                    ref[layer, a, b] += 1
    np.testing.assert_array_equal(layer_transitions(experts, 6), ref)


@pytest.mark.parametrize("prior,blend", [(0.0, 0.0), (3.0, 0.4)])
def test_prev_layer_matches_brute_force(prior, blend):
    rng = np.random.default_rng(2)
    train = random_trace(rng, n_requests=12, n_layers=3, n_experts=6, top_k=2)
    test = random_trace(rng, n_requests=4, n_layers=3, n_experts=6, top_k=2)
    p = make("prev_layer", prior=prior, blend=blend, token_prior=2.0).fit(train)
    tm = make("token_mix", prior=2.0).fit(train)
    tt = train.by_token()
    L, E, k = 3, 6, 2
    profile = np.zeros((L, E))
    for t in range(len(tt.token_id)):
        for layer in range(L):
            for e in tt.experts[t, layer]:
                profile[layer, e] += 1
    profile /= profile.sum(-1, keepdims=True)
    stream = batch_stream(test, batch_requests=2)
    for b in range(len(stream)):
        ctx = batch_context(stream, b, with_tokens=True)
        got = p.predict_next(stream.loads[:b], ctx)
        token_part = tm.predict_next(stream.loads[:b], ctx)
        want = np.empty((L, E))
        want[0] = token_part[0]
        for layer in range(1, L):
            acc = np.zeros(E)
            for src in ctx.tokens.routed[:, layer - 1].reshape(-1):
                # P(e at layer | src at layer-1) with `prior` pseudo-selections of the profile
                co = np.zeros(E)
                n_src = 0
                for t in range(len(tt.token_id)):
                    if src in tt.experts[t, layer - 1]:
                        n_src += 1
                        for e in tt.experts[t, layer]:
                            co[e] += 1.0 / k
                acc += (co + prior * profile[layer]) / max(n_src + prior, 1e-12) if n_src + prior > 0 else 0
            acc = acc / acc.sum() if acc.sum() > 0 else profile[layer]
            want[layer] = (1 - blend) * acc + blend * token_part[layer]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.sum(-1), 1.0)


def test_prev_layer_without_routing_falls_back_to_token_mix():
    rng = np.random.default_rng(3)
    train = random_trace(rng, n_requests=8, n_layers=3, n_experts=6, top_k=2)
    p = make("prev_layer").fit(train)
    stream = batch_stream(train, batch_requests=2)
    ctx = batch_context(stream, 0, with_tokens=False)
    np.testing.assert_allclose(p.predict_next(stream.loads[:0], ctx), p.token_mix.predict_next(stream.loads[:0], ctx))
    with pytest.raises(ValueError, match="prev_layer"):
        make("prev_layer", blend=2.0)
