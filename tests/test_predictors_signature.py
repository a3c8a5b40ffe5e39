"""prev_layer against a brute-force loop over tokens and selections (float64), on fresh random traces."""

import numpy as np
import pytest

from moegps.predictors import make
from moegps.predictors.batching import batch_context, batch_stream
from moegps.predictors.signature import layer_counts, layer_transitions
from moegps.workloads import random_trace


@pytest.mark.parametrize("dtype,n_experts,n_layers", [(np.int16, 6, 4), (np.int8, 100, 4), (np.int64, 6, 4),
                                                       (np.int16, 4000, 9)])
def test_layer_counts_match_a_loop(dtype, n_experts, n_layers):
    """int8 ids with L * E past int8's range are widened; L * E past int16's takes the int64 path."""
    rng = np.random.default_rng(5)
    routed = rng.integers(0, min(n_experts, np.iinfo(dtype).max), size=(37, n_layers, 3)).astype(dtype)
    want = np.zeros((n_layers, n_experts), dtype=np.int64)
    for t in range(37):
        for layer in range(n_layers):
            for e in routed[t, layer]:
                want[layer, e] += 1
    np.testing.assert_array_equal(layer_counts(routed, n_experts), want)


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


@pytest.mark.parametrize("layer0", ["profile", "token_mix"])
def test_prev_layer_ridge_matches_float64_least_squares(layer0):
    """The ridge map against lstsq on an augmented system, built from a loop over (request, step) groups."""
    rng = np.random.default_rng(4)
    train = random_trace(rng, n_requests=14, n_layers=3, n_experts=5, top_k=2)
    test = random_trace(rng, n_requests=4, n_layers=3, n_experts=5, top_k=2)
    ridge = 0.05
    p = make("prev_layer_ridge", prior=2.0, ridge=ridge, layer0=layer0).fit(train)
    # one chain per phase: prev_layer fitted on that phase's rows alone (shrunk to that phase's profile)
    chains = [make("prev_layer", prior=2.0, layer0="profile").fit(train.select(train.phase == ph)) for ph in (0, 1)]
    assert (train.phase == 1).any() and (test.phase == 1).any()  # both phases exercised
    L, E = 3, 5
    loads = train.loads(by="request_step")
    for ph in (0, 1):
        keep = (loads.groups["step"] == 0) == (ph == 0)
        if keep.sum() < 2:
            continue
        xs, ys, ws = [], [], []
        for c in loads.counts[keep]:
            q = c / c.sum(-1, keepdims=True)
            # chain alone for this group: prev_layer with the profile at layer 0
            ch = chains[ph].predict_from_counts(c, np.tile(chains[ph].profile[0], (L, 1)))
            xs.append(q[:-1] - p.phase_profiles[ph][:-1])
            ys.append(q[1:] - ch[1:])
            ws.append(c[0].sum())
        xs, ys, ws = np.array(xs), np.array(ys), np.array(ws, dtype=float)
        for layer in range(1, L):
            # ridge as least squares on [sqrt(w) X; sqrt(lam * mean w) I] against [sqrt(w) Y; 0]
            a = np.vstack([np.sqrt(ws)[:, None] * xs[:, layer - 1], np.sqrt(ridge * ws.mean()) * np.eye(E)])
            b = np.vstack([np.sqrt(ws)[:, None] * ys[:, layer - 1], np.zeros((E, E))])
            want = np.linalg.lstsq(a, b, rcond=None)[0]
            np.testing.assert_allclose(p.maps[ph, layer], want, rtol=1e-7, atol=1e-10)
    stream = batch_stream(test, batch_requests=2)
    for b in range(len(stream)):
        ctx = batch_context(stream, b, with_tokens=True)
        got = p.predict_next(stream.loads[:b], ctx)
        c = stream.loads[b]
        q = c / c.sum(-1, keepdims=True)
        ch = chains[ctx.phase].predict_from_counts(c, np.tile(chains[ctx.phase].profile[0], (L, 1)))
        want = ch[1:] + np.einsum("le,lef->lf", q[:-1] - p.phase_profiles[ctx.phase][:-1], p.maps[ctx.phase, 1:])
        want = np.maximum(want, 0)
        want /= want.sum(-1, keepdims=True)
        # the run-time product is float32 (half the time of float64): agree to float32's precision
        np.testing.assert_allclose(got[1:], want, rtol=1e-5, atol=1e-7)
        first = p.phase_profiles[ctx.phase][0] if layer0 == "profile" else p.token_mix.predict_next(stream.loads[:b], ctx)[0]
        np.testing.assert_allclose(got[0], first, rtol=1e-9)
    with pytest.raises(ValueError, match="ridge"):
        make("prev_layer_ridge", ridge=0.0)
    with pytest.raises(ValueError, match="layer0"):
        make("prev_layer", layer0="nope")
