"""The routing report: its statistics against brute-force references, and the command end to end."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest

from moegps.report import (
    RoutingReportConfig,
    affinity_summary,
    cross_layer_joint,
    main,
    routing_report,
    token_id_hit_rate,
    token_id_hit_rate_heldout,
)
from moegps.workloads import random_trace


def _brute_hit_rate(token_id, experts, k):
    per_token = defaultdict(Counter)
    for v, es in zip(token_id.tolist(), experts.tolist()):
        if v >= 0:
            per_token[v].update(es)
    covered = sum(sum(sorted(c.values(), reverse=True)[:k]) for c in per_token.values())
    return covered / sum(sum(c.values()) for c in per_token.values())


def _random_routing(rng, rows, n_experts, k, vocab):
    token_id = rng.integers(-1, vocab, size=rows)
    hot = rng.dirichlet(np.full(n_experts, 0.3), size=vocab + 1)  # each token id has favourite experts
    g = np.log(hot[token_id + 1] + 1e-12) + rng.gumbel(size=(rows, n_experts))
    return token_id, np.argsort(-g, axis=1)[:, :k].astype(np.int16)


def test_token_id_hit_rate_matches_brute_force(rng):
    token_id, experts = _random_routing(rng, 3000, 16, 4, 60)
    for k in (1, 2, 4):
        assert token_id_hit_rate(token_id, experts, 16, k) == pytest.approx(_brute_hit_rate(token_id, experts, k), abs=1e-12)
    assert np.isnan(token_id_hit_rate(np.full(5, -1), experts[:5], 16))


def test_heldout_hit_rate_matches_brute_force(rng):
    token_id, experts = _random_routing(rng, 4000, 8, 2, 300)
    request_id = rng.integers(0, 40, size=len(token_id))
    covered = seen = total = 0
    for fit in (0, 1):
        table = defaultdict(Counter)
        for r, v, es in zip(request_id, token_id, experts.tolist()):
            if v >= 0 and r % 2 == fit:
                table[v].update(es)
        for r, v, es in zip(request_id, token_id, experts.tolist()):
            if v >= 0 and r % 2 != fit:
                total += len(es)
                if v in table:
                    # ties broken by the lower expert id, as a stable sort on -count does
                    top = sorted(table[v].items(), key=lambda kv: (-kv[1], kv[0]))[:2]
                    covered += sum(e in {x for x, _ in top} for e in es)
                    seen += len(es)
    hit, share = token_id_hit_rate_heldout(request_id, token_id, experts, 8)
    assert hit == pytest.approx(covered / seen, abs=1e-12)
    assert share == pytest.approx(seen / total, abs=1e-12)
    # out of sample never beats in sample on the same rows
    assert hit <= token_id_hit_rate(token_id, experts, 8) + 1e-12


def test_cross_layer_joint_and_affinity_summary(rng):
    E, k, T = 8, 2, 500
    a = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)])
    b = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)])
    slot, full = np.zeros((E, E), int), np.zeros((E, E), int)
    for t in range(T):
        for i in range(k):
            slot[a[t, i], b[t, i]] += 1
            for j in range(k):
                full[a[t, i], b[t, j]] += 1
    np.testing.assert_array_equal(cross_layer_joint(a, b, E, slot_aligned=True), slot)
    np.testing.assert_array_equal(cross_layer_joint(a, b, E, slot_aligned=False), full)

    joint = rng.integers(1, 50, size=(E, E)).astype(np.float64)
    p = joint / joint.sum()
    mi = sum(
        p[i, j] * np.log2(p[i, j] / (p[i].sum() * p[:, j].sum())) for i in range(E) for j in range(E)
    )
    s = affinity_summary(joint)
    assert s["mi_bits"] == pytest.approx(mi, rel=1e-10)
    # independent layers: no information, lift 1; a permutation: log2(E) bits, lift E (uniform loads)
    indep = affinity_summary(np.outer(rng.integers(1, 9, E), rng.integers(1, 9, E)).astype(float))
    assert indep["mi_bits"] == pytest.approx(0, abs=1e-12) and indep["lift"] == pytest.approx(1)
    perm = affinity_summary(np.eye(E)[rng.permutation(E)] * 7)
    assert perm["mi_bits"] == pytest.approx(np.log2(E)) and perm["lift"] == pytest.approx(E)


def test_routing_report_on_random_trace(tmp_path, rng):
    trace = random_trace(rng, n_requests=12, n_layers=3, n_experts=8, top_k=2, decode_steps=5, skew=1.0, vocab=40)
    trace.meta.recorded["request_domain"] = {str(r): ("math" if r % 3 else "law") for r in range(12)}
    path = trace.write(tmp_path / "t.parquet")
    files = routing_report(RoutingReportConfig(trace=str(path), out=str(tmp_path / "rep"), domains=True, reference=False))
    for name in ("routing_layers.csv", "load_shares.csv", "routing_summary.md", "load_shares.png",
                 "skew_hit_rate.png", "cross_layer.png", "report_config.json"):
        assert files[name].exists() and files[name].stat().st_size > 100, name
    df = pd.read_csv(files["routing_layers.csv"])
    assert set(df["group"]) == {"phase=prefill", "phase=decode", "domain=math", "domain=law"}
    for phase in ("prefill", "decode"):
        t = trace.select(trace.phase_mask(phase))
        rows = df[df["group"] == f"phase={phase}"].sort_values("layer")
        counts = np.zeros((3, 8))
        for layer, es in zip(t.layer, t.experts):
            counts[layer, es] += 1
        np.testing.assert_allclose(rows["max_mean"], counts.max(axis=1) / counts.mean(axis=1))
        for layer in range(3):
            sel = t.layer == layer
            assert rows["hit_rate"].iloc[layer] == pytest.approx(_brute_hit_rate(t.token_id[sel], t.experts[sel], 2))
    shares = pd.read_csv(files["load_shares.csv"])
    np.testing.assert_allclose(shares.groupby(["group", "layer_id"])["share"].sum(), 1.0)
    assert json.loads(files["report_config.json"].read_text())["domains"] is True


def test_routing_report_without_domains_mapping_notes_it(tmp_path, rng):
    path = random_trace(rng).write(tmp_path / "t.parquet")
    files = routing_report(RoutingReportConfig(trace=str(path), out=str(tmp_path / "rep"), domains=True, reference=False))
    assert "no meta.recorded['request_domain']" in files["routing_summary.md"].read_text()


def test_routing_report_on_deepseek_with_real_reference(shared, tmp_path, capsys):
    from moegps.importers.deepseek_csv import read_deepseek_csv
    from moegps.importers.olmoe_routing import DOMAINS, load_expert_counts

    folder = shared / "traces" / "deepseek-v2-lite-puffin"
    path = read_deepseek_csv([folder / "prompt_1_data.csv", folder / "prompt_2_data.csv"]).write(tmp_path / "ds.parquet")
    main(["routing", str(path), "--out", str(tmp_path / "rep")])
    assert "real Mixtral-8x7B" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "rep" / "routing_layers.csv")
    trace_rows = df[df["source"].str.startswith("trace")]
    assert len(trace_rows) == 26 and list(trace_rows["layer_id"]) == list(range(1, 27))
    real = df[df["source"] == "real Mixtral-8x7B"]
    imb = load_expert_counts("mistral", DOMAINS).imbalance()
    np.testing.assert_allclose(np.sort(real["max_mean"]), np.sort(imb.reshape(-1)))
    assert real["hit_rate"].between(0.54, 0.73).all()  # real Mixtral: 55-72% in sample


def test_report_dispatcher_rejects_unknown_reports():
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_routing_report_on_one_layer_trace_without_token_ids(tmp_path, rng):
    trace = random_trace(rng, n_layers=1, decode_steps=0)
    trace.token_id[:] = -1  # unknown ids: no hit rate, and one layer: no affinity
    path = trace.write(tmp_path / "t.parquet")
    files = routing_report(RoutingReportConfig(trace=str(path), out=str(tmp_path / "rep"), reference=False))
    df = pd.read_csv(files["routing_layers.csv"])
    assert len(df) == 1 and df["hit_rate"].isna().all() and df["next_mi_bits_slot"].isna().all()
    assert "cross_layer.png" not in files
