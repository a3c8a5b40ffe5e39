"""Predictors on hand-built traces whose right answer is known, the metrics against brute force,
the server batching, and the evaluation's request split (no test request reaches fit)."""

import numpy as np
import pytest

from moegps.predictors import REGISTRY, BatchContext, make
from moegps.predictors.base import TokenBatch, top_k_ids
from moegps.predictors.batching import batch_context, batch_stream, token_batch
from moegps.predictors.distribution import loads_from_experts
from moegps.predictors.evaluate import evaluate
from moegps.workloads import split_by_request
from moegps.predictors.metrics import distribution_errors, recall_at_k, set_match
from moegps.workloads import random_trace
from moegps.trace import RoutingTrace, TraceMeta


def build(experts_fn, n_requests, prompt_len, decode_steps, L, E, k, rng, vocab=50):
    """A trace whose experts[token, layer] = experts_fn(request, step, position, token_id, layer)."""
    req, step, pos = [], [], []
    for r in range(n_requests):
        n = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        req += [r] * (n + decode_steps)
        step += [0] * n + list(range(1, decode_steps + 1))
        pos += list(range(n + decode_steps))
    req, step, pos = map(np.asarray, (req, step, pos))
    tok = rng.integers(0, vocab, size=len(req))
    ex = np.array([[experts_fn(r, s, p, t, l) for l in range(L)] for r, s, p, t in zip(req, step, pos, tok)])
    meta = TraceMeta(model="hand-built", n_layers=L, n_experts=E, top_k=k)
    return RoutingTrace.from_token_major(meta, req, step, pos, tok, ex.astype(np.int16)).validate()


def _sets(a):
    return np.sort(a, axis=-1)


# ---- token predictors: a layer that always routes token t to a known set -----------------


def test_token_table_learns_a_deterministic_map(rng):
    E, k = 8, 2
    perm = rng.permutation(E)
    f = lambda r, s, p, t, l: [perm[t % E], perm[(t + 3) % E]] if l == 0 else rng.choice(E, k, replace=False)  # noqa
    tr = build(f, 60, (5, 12), 2, 2, E, k, rng)
    train, test = split_by_request(tr, 0.3, seed=int(rng.integers(1 << 30)))
    p = make("token_table").fit(train)
    tb = token_batch(test.by_token())
    seen = np.isin(tb.token_id, train.token_id)
    pred = p.predict(tb)
    true = test.by_token().experts
    assert seen.sum() > 10
    assert (set_match(pred[seen, 0], true[seen, 0])).all()
    # unseen ids fall back to the layer's overall top-k
    unseen = TokenBatch(token_id=np.array([10_000]), position=np.array([0]), phase=np.array([0], np.int8))
    assert (_sets(p.predict(unseen)[0]) == _sets(make("most_frequent").fit(train).table)).all()


def test_position_cross_layer_and_most_frequent_known_answers(rng):
    E, k = 6, 2
    f = lambda r, s, p, t, l: (  # noqa: E731
        [p % E, (p + 1) % E] if l == 0 else [(p + 2) % E, (p + 3) % E] if l == 1 else [0, 5]
    )  # layer 1 = layer 0's experts shifted by 2: expert by expert, so a pairwise table is exact
    tr = build(f, 40, (4, 10), 3, 3, E, k, rng)
    train, test = split_by_request(tr, 0.25, seed=1)
    tb = token_batch(test.by_token())
    true = test.by_token().experts
    pos = make("position_table").fit(train).predict(tb)
    seen = np.isin(tb.position, train.position)
    assert (set_match(pos[seen], true[seen])).all()
    # layer 1's set is a function of layer 0's set: the transition table recovers it
    cl = make("cross_layer").fit(train).predict(tb)
    assert set_match(cl[:, 1], true[:, 1]).all() and set_match(cl[:, 2], true[:, 2]).all()
    with pytest.raises(ValueError, match="routed"):
        make("cross_layer").fit(train).predict(TokenBatch(tb.token_id, tb.position, tb.phase))
    mf = make("most_frequent").fit(train).predict(tb)
    assert set_match(mf[:, 2], true[:, 2]).all()


def test_learned_token_classifiers_find_a_deterministic_layer(rng):
    E, k = 8, 2
    perm = rng.permutation(E)
    f = lambda r, s, p, t, l: [perm[t % 4], perm[4 + t % 4]] if l == 0 else [(t % 4), 4 + (t % 4)]  # noqa
    tr = build(f, 50, (6, 12), 2, 2, E, k, rng, vocab=12)
    train, test = split_by_request(tr, 0.3, seed=2)
    tb = token_batch(test.by_token())
    true = test.by_token().experts
    for name, kw in (("lgbm", {"n_estimators": 20}), ("mlp", {"epochs": 20, "min_steps": 1}), ("ffn", {"epochs": 40, "min_steps": 1})):
        pred = make(name, **kw).fit(train).predict(tb)
        assert recall_at_k(pred, true).mean() > 0.95, name


def test_from_tokens_aggregates_to_the_true_load(rng):
    E, k = 8, 2
    f = lambda r, s, p, t, l: [t % E, (t + 1) % E]  # noqa: E731
    tr = build(f, 30, (5, 9), 0, 2, E, k, rng, vocab=E)
    s = batch_stream(tr, 4)
    p = make("from_tokens", token="token_table").fit(tr)
    for b in range(len(s)):
        pred = p.predict_next(s.loads[:b], batch_context(s, b, with_tokens=True))
        np.testing.assert_allclose(pred, s.loads[b] / s.loads[b].sum(-1, keepdims=True))


def test_token_mix_recovers_the_batch_load_from_token_ids(rng):
    E, k = 8, 2
    f = lambda r, s, p, t, l: [t % E, (t + 1 + l) % E]  # noqa: E731
    tr = build(f, 30, (5, 9), 2, 2, E, k, rng, vocab=E)
    s = batch_stream(tr, 4)
    p = make("token_mix", prior=0.0).fit(tr)
    for b in range(len(s)):
        np.testing.assert_allclose(p.predict_next(s.loads[:b], batch_context(s, b)),
                                   s.loads[b] / s.loads[b].sum(-1, keepdims=True), atol=1e-6)


# ---- distribution predictors: a load that alternates between two profiles ---------------


def test_recent_history_predictors_on_alternating_loads(rng):
    L, E = 2, 5
    A, B = rng.integers(1, 50, (L, E)), rng.integers(1, 50, (L, E))
    past = np.stack([A, B] * 5 + [A])  # next would be B
    ctx = BatchContext(phase=0, n_tokens=10, past_phase=np.zeros(len(past), np.int8))
    tr = random_trace(rng, n_layers=L, n_experts=E)
    fa = A / A.sum(-1, keepdims=True)
    np.testing.assert_allclose(make("last_batch").fit(tr).predict_next(past, ctx), fa)
    np.testing.assert_allclose(make("sliding_window", window=2).fit(tr).predict_next(past, ctx),
                               (A + B) / (A + B).sum(-1, keepdims=True))
    d = 0.5
    w = d ** np.arange(len(past))[::-1]
    ref = sum(wi * (x / x.sum(-1, keepdims=True)) for wi, x in zip(w, past))
    np.testing.assert_allclose(make("ema", decay=d).fit(tr).predict_next(past, ctx), ref / ref.sum(-1, keepdims=True),
                               atol=2e-3)  # truncated at weight 1e-3
    # other-phase batches are skipped
    mixed = np.concatenate([past, B[None]])
    ctx2 = BatchContext(phase=0, n_tokens=10, past_phase=np.r_[np.zeros(len(past), np.int8), 1])
    np.testing.assert_allclose(make("last_batch").fit(tr).predict_next(mixed, ctx2), fa)


def test_learned_model_predicts_an_alternating_load(rng):
    L, E, k = 2, 4, 2
    f = lambda r, s, p, t, l: [0, 1] if r % 2 == 0 else ([2, 3] if t % 3 else [1, 3])  # noqa: E731
    tr = build(f, 80, (6, 10), 0, L, E, k, rng, vocab=20)
    train = tr.with_requests(np.arange(60))
    test = tr.with_requests(np.arange(60, 80))
    s = batch_stream(test, 1)
    learned = make("learned", batch_requests=1, n_orders=1, alpha=1e-3, n_buckets=8).fit(train)
    glob = make("global_profile").fit(train)
    err_l = [distribution_errors(learned.predict_next(s.loads[:b], batch_context(s, b)), s.loads[b])["tv"].mean()
             for b in range(1, len(s))]
    err_g = [distribution_errors(glob.predict_next(s.loads[:b], batch_context(s, b)), s.loads[b])["tv"].mean()
             for b in range(1, len(s))]
    assert np.mean(err_g) > 0.3 and np.mean(err_l) < 0.5 * np.mean(err_g)


def test_phase_profile_and_own_prefill(rng):
    L, E, k = 2, 6, 2
    # prefill: experts {0,1}; decode: {2,3} or {4,5} by request, never overlapping the prefill
    f = lambda r, s, p, t, l: [0, 1] if s == 0 else [2 + 2 * (r % 2), 3 + 2 * (r % 2)]  # noqa: E731
    tr = build(f, 30, (3, 6), 4, L, E, k, rng)
    ph = make("phase_profile").fit(tr)
    np.testing.assert_allclose(ph.predict_next(np.zeros((0, L, E)), BatchContext(phase=0, n_tokens=3))[:, :2], 0.5)
    # own_prefill cannot help here (the prefill says nothing about the decode): alpha must be 0
    assert make("own_prefill").fit(tr).alpha == 0.0
    g = lambda r, s, p, t, l: [(2 * r) % E, (2 * r) % E + 1]  # noqa: E731  decode repeats the prefill
    tr2 = build(g, 30, (3, 6), 4, L, E, k, rng)
    op = make("own_prefill").fit(tr2)
    assert op.alpha == 1.0
    s = batch_stream(tr2, 3)
    for b in np.flatnonzero(s.phase == 1):
        np.testing.assert_allclose(op.predict_next(s.loads[:b], batch_context(s, b)),
                                   s.loads[b] / s.loads[b].sum(-1, keepdims=True))


def test_step_profile_learns_per_step_loads(rng):
    L, E, k, steps = 2, 8, 2, 5
    shift = rng.integers(0, E, size=L)
    # prefill: experts {0, 1}; decode step s: {s + shift_l, s + 1 + shift_l} (mod E), whatever the token
    f = lambda r, s, p, t, l: [0, 1] if s == 0 else [(s + shift[l]) % E, (s + 1 + shift[l]) % E]  # noqa: E731
    tr = build(f, 24, (3, 6), steps, L, E, k, rng)
    sp = make("step_profile", prior=0.0).fit(tr)
    ph = make("phase_profile").fit(tr)
    s = batch_stream(tr, 4)
    dec = np.flatnonzero(s.phase == 1)
    for b in dec:
        truth = s.loads[b] / s.loads[b].sum(-1, keepdims=True)
        np.testing.assert_allclose(sp.predict_next(s.loads[:b], batch_context(s, b)), truth, atol=1e-12)
    # one decode profile cannot tell the steps apart
    tv = [0.5 * np.abs(ph.predict_next(s.loads[:b], batch_context(s, b)) - s.loads[b] / s.loads[b].sum(-1, keepdims=True)).sum(-1).mean() for b in dec]
    assert np.mean(tv) > 0.5
    # a batch mixing steps (continuous batching): the token-weighted mean of the steps' loads, by brute force
    mix = np.array([1, 1, 1, 3, 3])
    expect = np.zeros((L, E))
    for st in mix:
        for l in range(L):
            expect[l, [(st + shift[l]) % E, (st + 1 + shift[l]) % E]] += 1 / (k * len(mix))
    got = sp.predict_next(np.zeros((0, L, E)), BatchContext(phase=1, n_tokens=5, steps=mix))
    np.testing.assert_allclose(got, expect, atol=1e-12)
    # steps past the last trained one share its row; no steps known: the phase profile
    far = sp.predict_next(np.zeros((0, L, E)), BatchContext(phase=1, n_tokens=1, steps=np.array([10_000])))
    last = sp.predict_next(np.zeros((0, L, E)), BatchContext(phase=1, n_tokens=1, steps=np.array([steps])))
    np.testing.assert_allclose(far, last)
    np.testing.assert_allclose(sp.predict_next(np.zeros((0, L, E)), BatchContext(phase=1, n_tokens=1)),
                               ph.phase_profiles[1])


# ---- every registered predictor honours its protocol -------------------------------------


FAST = {"ffn": {"epochs": 1, "min_steps": 1}, "sequence": {"epochs": 1, "min_steps": 1},
        "mlp": {"epochs": 1, "min_steps": 1}, "lgbm": {"n_estimators": 3},
        "learned": {"n_orders": 1}}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_protocol_shapes_and_costs(name, rng):
    tr = random_trace(rng, n_requests=12, n_layers=3, n_experts=8, top_k=2)
    p = make(name, **FAST.get(name, {})).fit(tr)
    s = batch_stream(tr, 3)
    c = p.cost()
    assert c.flops_for(10) >= 0 and c.bytes_for(10) >= 0 and c.memory_bytes >= 0
    if hasattr(p, "predict_next"):
        for b in range(len(s)):
            f = p.predict_next(s.loads[:b], batch_context(s, b, with_tokens=True))
            assert f.shape == (3, 8) and (f >= 0).all()
            np.testing.assert_allclose(f.sum(-1), 1.0)
    else:
        ids = p.predict(s.tokens)
        assert ids.shape == (len(s.tokens), 3, 2) and ids.min() >= 0 and ids.max() < 8
        srt = np.sort(ids, axis=-1)
        assert (srt[..., 1:] != srt[..., :-1]).all(), "predicted experts must be distinct"


# ---- metrics and batching against brute force --------------------------------------------


def test_metrics_against_brute_force(rng):
    T, L, E, k = 40, 3, 7, 3
    true = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(T)])
    pred = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(T)])
    pred[:5] = true[:5][..., ::-1]  # same sets, other order
    ref = np.array([[len(set(pred[t, l]) & set(true[t, l])) / k for l in range(L)] for t in range(T)])
    np.testing.assert_allclose(recall_at_k(pred, true), ref)
    assert set_match(pred, true)[:5].all()
    np.testing.assert_array_equal(set_match(pred, true), ref == 1.0)
    counts = rng.integers(0, 30, (5, L, E))
    p = rng.dirichlet(np.ones(E), size=(5, L))
    errs = distribution_errors(p, counts, eps=1e-3)
    for b in range(5):
        for l in range(L):
            q = counts[b, l] / counts[b, l].sum()
            assert abs(errs["tv"][b, l] - 0.5 * sum(abs(p[b, l, e] - q[e]) for e in range(E))) < 1e-12
            ps, qs = (p[b, l] + 1e-3) / (1 + E * 1e-3), (q + 1e-3) / (1 + E * 1e-3)
            assert abs(errs["kl"][b, l] - sum(qs[e] * np.log(qs[e] / ps[e]) for e in range(E))) < 1e-12
            assert abs(errs["imbalance_err"][b, l] - abs(E * p[b, l].max() - E * q.max())) < 1e-12
    assert (top_k_ids(np.array([[0.1, 0.5, 0.5, 0.2]]), 2) == [[1, 2]]).all()


def test_batch_stream_matches_brute_force(rng):
    tr = random_trace(rng, n_requests=11, decode_steps=4, n_layers=2, n_experts=6)
    B = 3
    s = batch_stream(tr, B)
    reqs = tr.requests()
    expected = []
    for g in range(0, len(reqs), B):
        members = reqs[g:g + B]
        for step in range(0, 5):
            m = np.isin(tr.request_id, members) & (tr.step == step)
            if m.any():
                c = np.zeros((2, 6), int)
                np.add.at(c, (tr.layer[m][:, None], tr.experts[m]), 1)
                expected.append(c)
    np.testing.assert_array_equal(s.loads, np.stack(expected))
    assert (s.phase == [0 if e is not None and i % 5 == 0 else 1 for i, e in enumerate(expected)]).all()
    np.testing.assert_array_equal(s.loads.sum(0), tr.loads(by="all").counts[0])
    np.testing.assert_allclose(loads_from_experts(s.experts, 6), tr.loads(by="all").fractions[0])


# ---- the evaluation never lets a test request reach fit ----------------------------------


class _Spy:
    seen: list = []

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name

    def fit(self, train):
        _Spy.seen.append(np.unique(train.request_id))
        self.inner.fit(train)
        return self

    def cost(self):
        return self.inner.cost()


class _DistSpy(_Spy):
    def predict_next(self, past, ctx):
        return self.inner.predict_next(past, ctx)


class _TokSpy(_Spy):
    def predict(self, tokens):
        return self.inner.predict(tokens)


def test_evaluation_splits_by_request_without_leaks(rng):
    tr = random_trace(rng, n_requests=30, decode_steps=3, n_layers=2, n_experts=6)
    seed = int(rng.integers(1 << 30))
    _Spy.seen = []
    preds = {"g": _DistSpy(make("global_profile")), "l": _DistSpy(make("learned", n_orders=1)),
             "t": _TokSpy(make("token_table")), "c": _TokSpy(make("cross_layer"))}
    table = evaluate(tr, preds, test_fraction=0.3, seed=seed, batch_requests=4, progress=False)
    train, test = split_by_request(tr, 0.3, seed)
    test_ids = np.unique(test.request_id)
    assert len(_Spy.seen) == 4
    for ids in _Spy.seen:
        assert not np.isin(ids, test_ids).any(), "a test request reached fit"
        np.testing.assert_array_equal(np.union1d(ids, test_ids), tr.requests())
    # whole requests on each side: every row of a request is in exactly one of them
    assert len(train) + len(test) == len(tr)
    assert set(table.phase) == {"all", "prefill", "decode"}
    assert table.loc[table.family == "token", "recall_at_k"].notna().all()
    assert table.loc[table.family == "distribution", "recall_at_k"].isna().all()
    assert (table.tv >= 0).all() and (table.tv <= 1).all()


def test_measured_latency_reaches_the_cost_report(rng):
    from moegps.predictors.bench import measure_latency

    tr = random_trace(rng, n_requests=10, n_layers=2, n_experts=6)
    tokens = token_batch(tr.by_token())
    past = tr.loads(by="request_step").counts
    for name in ("global_profile", "token_table"):
        p = make(name).fit(tr)
        assert p.cost().latency_s == {}
        lat = measure_latency(p, tokens, past, sizes=(1, 16), repeats=2)
        assert set(lat) == {1, 16} and all(v > 0 for v in lat.values())
        assert p.cost().latency_s == lat and p.cost().gpu_latency_s is None


def test_outputs_report_each_phase_from_a_trace_path(rng, tmp_path):
    """A trace given as a parquet path evaluates; the markdown table holds each phase's numbers."""
    from moegps.predictors.evaluate import write_outputs
    from moegps.workloads import load_trace

    path = tmp_path / "t.parquet"
    random_trace(rng, n_requests=20, decode_steps=3, n_layers=2, n_experts=6).write(path)
    tr = load_trace(str(path))
    table = evaluate(tr, {"g": make("global_profile"), "t": make("token_table")}, test_fraction=0.3,
                     batch_requests=4, progress=False)
    paths = write_outputs(table, tmp_path / "out", {"trace": str(path)})
    assert all(p.exists() for p in paths.values())
    protocol, *table_lines = [line for line in paths["md"].read_text().splitlines() if line]
    assert protocol.startswith("out of sample:") and "arrival order" in protocol  # the split, stated
    head, _, *rows = table_lines
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert {"recall@k prefill", "recall@k decode", "TV prefill", "TV decode", "TV all"} <= set(cols)
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    assert set(cells) == {"g", "t"}
    for name, phase in (("g", "decode"), ("t", "prefill")):
        want = table[(table.predictor == name) & (table.phase == phase)].tv.iloc[0]
        assert float(cells[name][cols.index(f"TV {phase}")]) == pytest.approx(want, rel=1e-3)
    want = table[(table.predictor == "t") & (table.phase == "decode")].recall_at_k.iloc[0]
    assert float(cells["t"][cols.index("recall@k decode")]) == pytest.approx(want, rel=1e-3)
    assert cells["g"][cols.index("recall@k prefill")] == ""  # distribution rows have no recall
