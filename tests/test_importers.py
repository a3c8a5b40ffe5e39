"""Importers on the real shared data (known counts computed independently here) and on bad input."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
from collections import Counter, defaultdict

import numpy as np
import pytest

from moegps import safe_pickle
from moegps.safe_pickle import UnsafePickleError
from moegps.trace import TraceError

DS_FILES = ["prompt_1_data.csv", "prompt_2_data.csv", "prompt_150_data.csv"]


# ---- restricted unpickler --------------------------------------------------------------------


class _RunsCommand:
    """A payload that, unpickled by plain pickle, would run ``callable(*args)``."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: (os.system, (f"touch {m}",)),
        lambda m: (subprocess.call, (["touch", str(m)],)),
        lambda m: (eval, (f"open({str(m)!r}, 'w').close()",)),
        lambda m: (exec, (f"open({str(m)!r}, 'w').close()",)),
    ],
    ids=["os.system", "subprocess.call", "builtins.eval", "builtins.exec"],
)
def test_safe_pickle_refuses_code_execution(tmp_path, make):
    marker = tmp_path / "pwned"
    fn, args = make(marker)
    # hide the payload inside the structure the real files have: a list of Counters
    payload = pickle.dumps([Counter({np.int64(1): 5}), _RunsCommand(fn, args)], protocol=4)
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as e:
        safe_pickle.load(path)
    assert str(path) in str(e.value) and "refused to load global" in str(e.value)
    assert fn.__name__ in str(e.value)
    assert not marker.exists()


def test_safe_pickle_refuses_numpy_arrays_and_object_dtypes(tmp_path):
    path = tmp_path / "array.pkl"
    path.write_bytes(pickle.dumps(np.arange(3)))  # needs numpy's _reconstruct: not admitted
    with pytest.raises(UnsafePickleError, match="_reconstruct"):
        safe_pickle.load(path)
    path.write_bytes(pickle.dumps([np.float64(1.5)]))  # a numpy scalar, but not an integer
    with pytest.raises(UnsafePickleError, match="integer"):
        safe_pickle.load(path)
    path.write_bytes(pickle.dumps([Counter({1: 2}), {3: {4: b"x"}}], protocol=4))  # bytes: no such field
    with pytest.raises(UnsafePickleError, match="type bytes, not admitted"):
        safe_pickle.load(path)
    path.write_bytes(pickle.dumps([{1: 2.5}], protocol=4))
    with pytest.raises(UnsafePickleError, match="type float, not admitted"):
        safe_pickle.load(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(UnsafePickleError, match="not a valid"):
        safe_pickle.load(path)


def test_safe_pickle_round_trips_the_admitted_types(rng):
    n = int(rng.integers(5, 50))
    obj = [
        Counter({np.int64(e): int(c) for e, c in zip(rng.integers(0, 64, n), rng.integers(1, 10**6, n))}),
        Counter({(np.int64(a), np.int64(b)): int(c) for a, b, c in rng.integers(0, 8, (n, 3))}),
        defaultdict(Counter, {np.int32(e): Counter({int(t): int(t) % 7 + 1 for t in rng.integers(0, 32000, n)}) for e in range(3)}),
    ]
    for protocol in (4, 5):  # protocol 2 writes bytes via _codecs.encode: refused, rightly
        back = safe_pickle.loads(pickle.dumps(obj, protocol=protocol))
        assert back == obj and type(back[2]) is defaultdict and back[2].default_factory is Counter


def test_safe_pickle_matches_plain_pickle_on_real_files(shared):
    base = shared / "olmoe-routing" / "mistral"
    for kind in ("expert_counts", "expert_counts_crosslayer", "eid2token"):
        path = base / kind / "arxiv.pkl"
        with open(path, "rb") as f:
            reference = pickle.load(f)  # the trusted file, loaded the unrestricted way
        assert safe_pickle.load(path) == reference


# ---- OLMoE-paper routing counts --------------------------------------------------------------


@pytest.mark.parametrize("model,k", [("mistral", 2), ("olmoe", 8)])
def test_expert_counts_known_totals(shared, model, k):
    from moegps.importers.olmoe_routing import DOMAINS, load_expert_counts

    loads = load_expert_counts(model, DOMAINS)
    assert loads.aggregate and loads.top_k == k and loads.layer_ids == [0, 7, 15]
    assert list(loads.groups["domain"]) == DOMAINS
    # 102 sequences of 2,048 tokens per domain, k selections each, at every layer
    np.testing.assert_array_equal(loads.counts.sum(axis=-1), np.full((5, 3), 208_896 * k))
    top1 = load_expert_counts(model, DOMAINS, top1=True)
    assert top1.top_k == 1
    np.testing.assert_array_equal(top1.counts.sum(axis=-1), np.full((5, 3), 208_896))
    assert (top1.counts <= loads.counts).all()
    # independent reference: the plain-pickle Counters
    with open(shared / "olmoe-routing" / model / "expert_counts" / "github.pkl", "rb") as f:
        ref = pickle.load(f)
    for j in range(3):
        for e, n in ref[j].items():
            assert loads.counts[DOMAINS.index("github"), j, int(e)] == n


def test_real_mixtral_skew_is_mild():
    """The figures the issues quote: real Mixtral max/mean load 1.08-1.33 at layers 0, 7, 15."""
    from moegps.importers.olmoe_routing import DOMAINS, load_expert_counts

    imb = load_expert_counts("mistral", DOMAINS).imbalance()
    assert 1.07 < imb.min() and imb.max() < 1.34


@pytest.mark.parametrize("model", ["mistral", "olmoe"])
def test_crosslayer_and_eid2token_agree_with_expert_counts(shared, model):
    from moegps.importers.olmoe_routing import load_crosslayer_counts, load_eid2token, load_expert_counts

    domain = "book"
    loads = load_expert_counts(model, [domain]).counts[0]  # [layer, E]
    pairs = load_crosslayer_counts(model, domain)
    # slot-aligned pairs: the row marginal is the load at layer a, the column marginal at layer b
    np.testing.assert_array_equal(pairs[(0, 7)].sum(axis=1), loads[0])
    np.testing.assert_array_equal(pairs[(0, 7)].sum(axis=0), loads[1])
    np.testing.assert_array_equal(pairs[(7, 15)].sum(axis=1), loads[1])
    np.testing.assert_array_equal(pairs[(7, 15)].sum(axis=0), loads[2])
    e2t = load_eid2token(model, domain)
    k = 2 if model == "mistral" else 8
    for j, m in enumerate(e2t):
        # eid2token was committed upstream from a separate run: its loads differ slightly (book:
        # at most 9 selections per expert for Mixtral, 1.4% for OLMoE; c4/github up to 6%/17%)
        per_expert = np.asarray(m.sum(axis=1)).ravel()
        assert per_expert.sum() == loads[j].sum()
        assert 0.5 * np.abs(per_expert - loads[j]).sum() / loads[j].sum() < 0.005
        per_token = np.asarray(m.sum(axis=0)).ravel()
        assert (per_token % k == 0).all()  # every occurrence of a token id chose k experts
        if j:  # the same token stream at every layer
            np.testing.assert_array_equal(per_token, np.asarray(e2t[0].sum(axis=0)).ravel())


def test_missing_statistics_are_named(shared):
    from moegps.importers.olmoe_routing import load_eid2token, load_expert_counts

    with pytest.raises(FileNotFoundError, match=r"olmoe/eid2token/c4.pkl.*available: \['arxiv', 'book'"):
        load_eid2token("olmoe", "c4")
    with pytest.raises(FileNotFoundError, match="no expert_counts statistics for domain 'tulu' of mistral"):
        load_expert_counts("mistral", ["tulu"])
    with pytest.raises(ValueError, match="model must be one of"):
        load_expert_counts("gpt4")


# ---- DeepSeek-V2-Lite CSVs -------------------------------------------------------------------


def _csv_reference(path):
    """Tokens (layer-1 order), token count and [layer, expert] totals, with the csv module."""
    totals = np.zeros((26, 64), dtype=np.int64)
    tokens = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            layer = int(row["Layer ID"])
            tokens[layer].append(row["Token"])
            for e in json.loads(row["Activated Expert IDs"]):
                totals[layer - 1, e] += 1
    return tokens[1], totals


def test_deepseek_known_counts(shared):
    from moegps.importers.deepseek_csv import read_deepseek_csv, read_deepseek_tokens

    folder = shared / "traces" / "deepseek-v2-lite-puffin"
    files = [folder / f for f in DS_FILES]
    trace = read_deepseek_csv(files)
    m = trace.meta
    assert (m.n_layers, m.n_experts, m.top_k, m.layer_ids) == (26, 64, 6, list(range(1, 27)))
    assert list(trace.requests()) == [1, 2, 150]
    assert (trace.step == 0).all() and (trace.phase == 0).all() and trace.weights is None
    loads = trace.loads(by="request")
    vocab = np.array(m.model_config["token_vocab"])
    tokens = read_deepseek_tokens(files)
    for i, f in enumerate(files):
        ref_tokens, ref_totals = _csv_reference(f)
        rid = int(f.name.split("_")[1])
        sel = trace.request_id == rid
        assert np.count_nonzero(sel) == 26 * len(ref_tokens)
        np.testing.assert_array_equal(loads.counts[i], ref_totals)
        assert tokens[rid] == ref_tokens
        tb = trace.with_requests([rid]).by_token()
        np.testing.assert_array_equal(tb.position, np.arange(len(ref_tokens)))
        assert list(vocab[tb.token_id]) == ref_tokens
    # the first file, row by row: layer 1, token 0 is BOS with the experts written in the file
    first = trace.with_requests([1]).by_token()
    assert vocab[first.token_id[0]] == "<｜begin▁of▁sentence｜>"
    np.testing.assert_array_equal(first.experts[0, 0], [8, 26, 56, 57, 60, 43])


def test_deepseek_folder_limit_and_round_trip(shared, tmp_path):
    from moegps.importers.deepseek_csv import read_deepseek_csv
    from moegps.trace import RoutingTrace

    trace = read_deepseek_csv(shared / "traces" / "deepseek-v2-lite-puffin", limit=4)
    assert list(trace.requests()) == [1, 2, 3, 4]  # numeric order, not 1, 10, 100, ...
    out = trace.write(tmp_path / "ds.parquet")
    back = RoutingTrace.read(out)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.token_id, trace.token_id)
    assert back.meta.model_config["token_vocab"] == trace.meta.model_config["token_vocab"]


def _write(tmp_path, rows, header="Layer ID,Batch Number,Token,Activated Expert IDs", name="prompt_7_data.csv"):
    path = tmp_path / name
    path.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    return path


def _good_rows(rng, n_tokens=3):
    rows = []
    for layer in range(1, 27):
        for t in range(n_tokens):
            ids = rng.choice(64, size=6, replace=False)
            rows.append(f'{layer},0,tok{t},"[{", ".join(map(str, ids))}]"')
    return rows


def test_deepseek_good_synthetic_file(tmp_path, rng):
    from moegps.importers.deepseek_csv import read_deepseek_csv

    rows = _good_rows(rng)
    trace = read_deepseek_csv(_write(tmp_path, rows))
    assert list(trace.requests()) == [7] and trace.n_tokens == 3
    ids = np.array([json.loads(r.split(",", 3)[3].strip('"')) for r in rows]).reshape(26, 3, 6)
    np.testing.assert_array_equal(trace.by_token().experts, ids.transpose(1, 0, 2))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r[:4] + ['5,0,tok1,"[1, 2, 3, 4, 5]"'] + r[5:], r"row 5 \(line 6\), column 'Activated Expert IDs'.*exactly top_k=6"),
        (lambda r: r[:2] + ['1,0,tok2,"[1, 2, 3, 4, 5, 64]"'] + r[3:], r"row 3 .*'Activated Expert IDs'.*0\.\.63"),
        (lambda r: r[:2] + ['1,0,tok2,"[1, 2, 3, 4, 5, 5]"'] + r[3:], r"row 3 .*6 distinct"),
        (lambda r: r[:2] + ["1,0,tok2,1 2 3 4 5 6"] + r[3:], r"row 3 .*'Activated Expert IDs'.*JSON list"),
        (lambda r: r[:1] + ['x,0,tok1,"[1, 2, 3, 4, 5, 6]"'] + r[2:], r"row 2 .*'Layer ID'.*an integer"),
        (lambda r: r[:1] + ['27,0,tok1,"[1, 2, 3, 4, 5, 6]"'] + r[2:], r"row 2 .*'Layer ID' is 27.*1\.\.26"),
        (lambda r: r[:-1], r"layers hold different numbers of tokens"),
        (lambda r: r[:-1] + ['26,0,other,"[1, 2, 3, 4, 5, 6]"'], r"token 2 is 'tok2' at layer 1 but 'other' at layer 26"),
    ],
)
def test_deepseek_bad_rows_are_named(tmp_path, rng, mutate, match):
    from moegps.importers.deepseek_csv import read_deepseek_csv

    path = _write(tmp_path, mutate(_good_rows(rng)))
    with pytest.raises(TraceError, match=match) as e:
        read_deepseek_csv(path)
    assert str(path) in str(e.value)


def test_deepseek_bad_files_are_named(tmp_path, rng):
    from moegps.importers.deepseek_csv import read_deepseek_csv

    path = _write(tmp_path, _good_rows(rng), header="Layer,Batch,Token,Experts")
    with pytest.raises(TraceError, match=r"prompt_7_data.csv: header is .*expected \['Layer ID'"):
        read_deepseek_csv(path)
    other = _write(tmp_path, _good_rows(rng), name="prompt_x.csv")
    with pytest.raises(TraceError, match=r"prompt_x.csv: file name must be prompt_<n>_data.csv"):
        read_deepseek_csv(other)
    with pytest.raises(TraceError, match="no such file"):
        read_deepseek_csv(tmp_path / "absent")


# ---- reconstructed Mixtral traces ------------------------------------------------------------


def test_inclusion_from_weights_hand_case(rng):
    from moegps.importers.reconstruct import inclusion_from_weights

    p = inclusion_from_weights(np.array([[10.0, 1, 1, 1], [1, 1, 1, 1], [3, 1, 0, 0]]), 2)
    np.testing.assert_allclose(p, [[1, 1 / 3, 1 / 3, 1 / 3], [0.5] * 4, [1, 1, 0, 0]])
    w = rng.gamma(0.3, size=(200, 8))
    p = inclusion_from_weights(w, 2)
    np.testing.assert_allclose(p.sum(axis=1), 2)
    assert (p <= 1 + 1e-12).all() and (p >= 0).all()
    free = p < 1 - 1e-12  # uncapped entries stay proportional to their weights
    for row in range(200):
        r = p[row, free[row]] / w[row, free[row]]
        np.testing.assert_allclose(r, r[0])


def test_systematic_sample_has_exact_inclusion_probabilities(rng):
    from moegps.importers.reconstruct import inclusion_from_weights, systematic_sample

    p_one = inclusion_from_weights(rng.gamma(0.7, size=(1, 8)), 2)[0]
    n = 40_000
    picked = systematic_sample(np.repeat(p_one[None], n, axis=0), 2, rng)
    assert (picked[:, 0] != picked[:, 1]).all()
    freq = np.bincount(picked.reshape(-1), minlength=8) / n
    sd = np.sqrt(p_one * (1 - p_one) / n)
    assert (np.abs(freq - p_one) <= 5 * sd + 1e-9).all(), (freq, p_one)
    # higher-probability expert first
    assert (p_one[picked[:, 0]] >= p_one[picked[:, 1]]).all()


def _hit_rate(token_ids: np.ndarray, experts: np.ndarray, k: int = 2) -> float:
    """Share of selections covered by each token id's own k most frequent experts."""
    counts = np.zeros((32000, 8), dtype=np.int64)
    np.add.at(counts, (np.repeat(token_ids, experts.shape[1]), experts.reshape(-1)), 1)
    return np.sort(counts, axis=1)[:, -k:].sum() / counts.sum()


def test_reconstructed_trace_reproduces_source_statistics(shared):
    from moegps.importers.olmoe_routing import load_crosslayer_counts, load_eid2token, load_expert_counts
    from moegps.importers.reconstruct import domain_token_stream, reconstruct_mixtral_trace

    domain = "wikipedia"
    stream = domain_token_stream(domain)
    assert sum(map(len, stream)) == 208_896
    rng = np.random.default_rng()
    trace = reconstruct_mixtral_trace(stream, rng, domains=[domain])
    assert trace.meta.source == "reconstructed:olmoe-routing/mistral" and "NOT a recorded trace" in trace.meta.notes
    assert trace.meta.layer_ids == [0, 7, 15] and (trace.meta.n_experts, trace.meta.top_k) == (8, 2)

    src = load_expert_counts("mistral", [domain]).fractions[0]
    drawn = trace.loads(by="all").fractions[0]
    tv = 0.5 * np.abs(drawn - src).sum(axis=-1)
    assert (tv < 0.03).all(), tv

    tb = trace.by_token()
    pairs = load_crosslayer_counts("mistral", domain)
    for l, m in enumerate(load_eid2token("mistral", domain)):
        c = m.toarray()
        src_hit = np.sort(c, axis=0)[-2:].sum() / c.sum()
        hit = _hit_rate(tb.token_id, tb.experts[:, l])
        assert abs(hit - src_hit) < 0.03, (l, hit, src_hit)
        assert 0.5 < hit < 0.75
        if l:
            real = pairs[[(0, 7), (7, 15)][l - 1]]
            d = np.zeros((8, 8))
            np.add.at(d, (tb.experts[:, l - 1].reshape(-1), tb.experts[:, l].reshape(-1)), 1)
            assert 0.5 * np.abs(d / d.sum() - real / real.sum()).sum() < 0.03


def test_affinity_tilt_moves_cross_layer_joint_toward_the_real_one(shared):
    from moegps.importers.olmoe_routing import load_crosslayer_counts
    from moegps.importers.reconstruct import draw_experts, mixtral_stats

    domain = "github"
    stats = mixtral_stats([domain])
    n = stats.token_count[0]
    rng = np.random.default_rng()
    tokens = rng.choice(np.repeat(np.arange(len(n)), n), size=100_000, replace=False)
    real = load_crosslayer_counts("mistral", domain)[(7, 15)]
    tv = {}
    for affinity in (False, True):
        e = draw_experts(tokens, rng, [domain], affinity=affinity)
        d = np.zeros((8, 8))
        np.add.at(d, (e[:, 1].reshape(-1), e[:, 2].reshape(-1)), 1)
        tv[affinity] = 0.5 * np.abs(d / d.sum() - real / real.sum()).sum()
    assert tv[True] < 0.7 * tv[False], tv


def test_unseen_token_ids_follow_the_layer_marginal(shared):
    from moegps.importers.reconstruct import draw_experts, mixtral_stats

    stats = mixtral_stats(["arxiv"])
    unseen = np.flatnonzero(stats.token_count[0] == 0)
    rng = np.random.default_rng()
    tokens = rng.choice(unseen, size=30_000)
    e = draw_experts(tokens, rng, ["arxiv"], affinity=False)
    marginal = stats.loads[0] / stats.loads[0].sum()
    freq = np.bincount(e[:, 0].reshape(-1), minlength=8) / e[:, 0].size
    assert 0.5 * np.abs(freq - marginal).sum() < 0.01
    with pytest.raises(ValueError, match="outside the Mixtral vocabulary"):
        draw_experts(np.array([5, 32000]), rng, ["arxiv"])


def test_mmlu_token_stream(shared):
    from moegps.importers.reconstruct import mmlu_token_stream
    from moegps.models.tokenizer import mixtral_tokenizer

    streams, subjects = mmlu_token_stream(limit=3)
    assert len(streams) == 3 and subjects == ["abstract_algebra"] * 3
    for s in streams:
        assert s[0] == 1 and len(s) > 20
    text = mixtral_tokenizer().decode(streams[0])
    assert "Find the degree for the given field extension" in text and text.rstrip().endswith("Answer:")
