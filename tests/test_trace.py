import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moegps.workloads import random_trace
from moegps.trace import META_KEY, RoutingTrace, TraceError


def test_round_trip(tmp_path, rng):
    trace = random_trace(rng, n_requests=7, n_layers=3, n_experts=16, top_k=4)
    path = trace.write(tmp_path / "t.parquet")
    back = RoutingTrace.read(path)
    assert back.meta == trace.meta
    for name in ("request_id", "step", "phase", "position", "token_id", "layer", "experts", "weights"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"


def test_loads_match_brute_force(rng):
    trace = random_trace(rng, n_requests=5, n_layers=3, n_experts=8, top_k=2, skew=1.2)
    for by, key in (("step", ("step",)), ("request", ("request_id",)), ("request_step", ("request_id", "step"))):
        for phase in (None, "prefill", "decode"):
            loads = trace.loads(by=by, phase=phase)
            brute = {}
            for i in range(len(trace)):
                if phase == "prefill" and trace.step[i] != 0 or phase == "decode" and trace.step[i] == 0:
                    continue
                g = tuple(int(getattr(trace, k)[i]) for k in key)
                arr = brute.setdefault(g, np.zeros((3, 8), dtype=np.int64))
                for e in trace.experts[i]:
                    arr[trace.layer[i], e] += 1
            groups = sorted(brute)
            assert [tuple(int(loads.groups[k][g]) for k in key) for g in range(len(groups))] == groups
            np.testing.assert_array_equal(loads.counts, np.stack([brute[g] for g in groups]))
    total = trace.loads(by="all").counts[0]
    assert total.sum() == len(trace) * 2
    np.testing.assert_allclose(trace.loads(by="all").fractions.sum(-1), 1.0)


def test_by_token_round_trip(rng):
    trace = random_trace(rng, n_requests=3, n_layers=4)
    shuffled = trace.select(rng.permutation(len(trace)))
    tok = shuffled.by_token()
    assert tok.experts.shape == (trace.n_tokens, 4, 2)
    rebuilt = RoutingTrace.from_token_major(
        trace.meta, tok.request_id, tok.step, tok.position, tok.token_id, tok.experts, tok.weights
    )
    a, b = trace.by_token(), rebuilt.by_token()
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.phase, b.phase)


def test_shard_folder(tmp_path, rng):
    t = random_trace(rng, n_requests=6)
    t.with_requests([0, 1, 2]).write(tmp_path / "shard-0.parquet")
    t.with_requests([3, 4, 5]).write(tmp_path / "shard-1.parquet")
    back = RoutingTrace.read(tmp_path)
    assert len(back) == len(t)
    np.testing.assert_array_equal(back.loads("request").counts, t.loads("request").counts)


def _write(table, path, meta=None):
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


@pytest.fixture
def good(tmp_path, rng):
    trace = random_trace(rng)
    table = trace.to_arrow()
    meta = json.loads(table.schema.metadata[META_KEY])
    return trace, table, meta


def test_not_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_text("hello, not parquet")
    with pytest.raises(TraceError, match=r"x\.parquet: not a parquet file"):
        RoutingTrace.read(p)


def test_not_a_trace(tmp_path):
    p = _write(pa.table({"a": [1, 2]}), tmp_path / "plain.parquet")
    with pytest.raises(TraceError, match=r"plain\.parquet: not a moegps RoutingTrace"):
        RoutingTrace.read(p)


def test_missing_column(tmp_path, good):
    _, table, meta = good
    p = _write(table.drop(["position"]), tmp_path / "m.parquet", meta)
    with pytest.raises(TraceError, match=r"m\.parquet: missing column 'position'"):
        RoutingTrace.read(p)


def test_wrong_dtype(tmp_path, good):
    _, table, meta = good
    bad = table.set_column(table.column_names.index("layer"), "layer", pa.array(["a"] * len(table)))
    p = _write(bad, tmp_path / "d.parquet", meta)
    with pytest.raises(TraceError, match=r"d\.parquet: column 'layer' has type string"):
        RoutingTrace.read(p)


def test_expert_out_of_range(tmp_path, good):
    trace, table, meta = good
    experts = trace.experts.copy()
    experts[5, 1] = meta["n_experts"]
    col = pa.FixedSizeListArray.from_arrays(pa.array(experts.reshape(-1), pa.int16()), meta["top_k"])
    bad = table.set_column(table.column_names.index("experts"), "experts", col)
    p = _write(bad, tmp_path / "r.parquet", meta)
    with pytest.raises(TraceError, match=r"r\.parquet: column 'experts' holds .* at row 5, expected 0 <= id < n_experts=8"):
        RoutingTrace.read(p)


def test_inconsistent_top_k(tmp_path, good):
    trace, table, meta = good
    lists = [list(map(int, row)) for row in trace.experts]
    lists[3] = lists[3] + [7 if 7 not in lists[3] else 6]
    bad = table.set_column(table.column_names.index("experts"), "experts", pa.array(lists, pa.list_(pa.int16())))
    p = _write(bad, tmp_path / "k.parquet", meta)
    with pytest.raises(TraceError, match=r"k\.parquet: column 'experts' has a list of length 3 at row 3.*inconsistent top-k"):
        RoutingTrace.read(p)
    meta2 = dict(meta, top_k=3)
    p2 = _write(table, tmp_path / "k2.parquet", meta2)
    with pytest.raises(TraceError, match=r"k2\.parquet: column 'experts' has lists of length 2, metadata says top_k=3"):
        RoutingTrace.read(p2)


def test_bad_metadata(tmp_path, good):
    _, table, meta = good
    p = _write(table, tmp_path / "md.parquet", {k: v for k, v in meta.items() if k != "n_experts"})
    with pytest.raises(TraceError, match=r"md\.parquet: metadata 'moegps.trace' lacks field\(s\) \['n_experts'\]"):
        RoutingTrace.read(p)


def test_duplicate_experts_and_phase(tmp_path, rng):
    trace = random_trace(rng)
    dup = trace.select(np.arange(len(trace)))
    dup.experts[2] = [1, 1]
    with pytest.raises(TraceError, match="repeats an expert within row 2"):
        dup.validate()
    bad = trace.select(np.arange(len(trace)))
    i = int(np.argmax(bad.step > 0))
    bad.phase[i] = 0
    with pytest.raises(TraceError, match=f"row {i} has phase=0 with step="):
        bad.validate()
