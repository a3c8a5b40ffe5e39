"""The tuner's bookkeeping on the CPU (its timing needs a GPU): which paths it searches, the incumbent
that a narrower search must beat, a config file that survives a run cut short, and the shape and
routing of the engine's call with a shared expert among the experts, and the recorded routing the
benchmark can time."""

import json

import numpy as np
import pytest
import torch

from moegps.kernels import launch, tune

SHAPE = (8, 64, 96, 2)  # E, H, F, k


def test_candidates_keep_the_named_paths_only():
    assert {path for path, _, _ in tune.candidates(4, 8, 2)} == {"fused", "scan"}  # 1 row an expert
    assert {path for path, _, _ in tune.candidates(40, 8, 2)} == {"scan", "sorted"}  # 10 rows
    assert {path for path, _, _ in tune.candidates(40, 8, 2, paths=("sorted",))} == {"sorted"}
    assert tune.candidates(4, 8, 2, paths=("sorted",)) == []  # too few rows for the sorted path


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setattr(launch, "device_name", lambda device=None: "TEST_GPU")
    monkeypatch.setattr(tune, "precompile", lambda tasks, workers: {})
    launch._tuned_table.cache_clear()
    yield tmp_path / "configs" / "TEST_GPU.json"
    launch._tuned_table.cache_clear()


def test_a_narrow_search_passes_the_incumbent_and_keeps_it(config_dir, tmp_path, monkeypatch):
    """The entry of a token count competes, or where there is none the one get_config would serve
    (the nearest, or the default past twice the largest entry); a nearest one that wins is not copied to
    the new token count."""
    old = {"path": "scan", "block_m": 16, "us": 9.0, "tuned_by": "an older run"}
    config_dir.parent.mkdir()
    config_dir.write_text(json.dumps({"shapes": {launch.shape_key(*SHAPE): {"32": old}}}))
    seen = {}
    new = {"path": "sorted", "block_m": 64, "us": 1.0}

    def fake_tune_one(name, shape, n_tokens, failed, seed, paths, incumbent, routing=None):
        seen[n_tokens] = (paths, incumbent)
        return new if n_tokens == 512 else incumbent  # 512: a new config beats the nearest

    monkeypatch.setattr(tune, "tune_one", fake_tune_one)
    tune.tune({"tiny": SHAPE}, [32, 512, 48], tmp_path / "out", 1, "the command", paths=("sorted",))
    kept = dict(old, kept_by="the command")
    assert seen[32] == (("sorted",), old)
    # 512 is past twice the only entry's 32 tokens: what serves it, and so competes, is the default
    assert seen[512] == (("sorted",), launch.default_config(512, *SHAPE))
    assert seen[48] == (("sorted",), kept)  # 32's entry is nearer than 512's
    table = json.loads(config_dir.read_text())["shapes"][launch.shape_key(*SHAPE)]
    assert table["32"] == kept  # its own record, and who kept it
    assert table["512"] == dict(new, tuned_by="the command")
    assert "48" not in table  # the nearest entry won there, and keeps serving
    assert json.loads((tmp_path / "out" / "TEST_GPU.json").read_text())["shapes"] == \
        json.loads(config_dir.read_text())["shapes"]


def test_a_full_search_has_no_incumbent(config_dir, tmp_path, monkeypatch):
    config_dir.parent.mkdir()
    config_dir.write_text(json.dumps({"shapes": {launch.shape_key(*SHAPE): {"32": {"path": "scan"}}}}))
    seen = []
    monkeypatch.setattr(tune, "tune_one", lambda *args: seen.append(args[-1]) or {"path": "sorted"})
    tune.tune({"tiny": SHAPE}, [32], tmp_path / "out", 1, "cmd")
    assert seen == [None]


def test_a_run_cut_short_keeps_the_points_it_finished(config_dir, tmp_path, monkeypatch):
    def tune_one(name, shape, n_tokens, *rest):
        if n_tokens == 512:
            raise KeyboardInterrupt  # the second point is interrupted
        return {"path": "scan", "block_m": 16}

    monkeypatch.setattr(tune, "tune_one", tune_one)
    with pytest.raises(KeyboardInterrupt):
        tune.tune({"tiny": SHAPE}, [32, 512], tmp_path / "out", 1, "cmd")
    table = json.loads(config_dir.read_text())["shapes"][launch.shape_key(*SHAPE)]
    assert set(table) == {"32"}
    assert not list(config_dir.parent.glob("*.tmp"))  # no half-written file left beside it


def test_the_engines_call_with_a_shared_expert_is_a_shape_of_its_own():
    """deepseek-v2-lite+shared: the (E, k) that the engine's fused_moe sees with the shared expert held
    among the experts (2816 = 2 x 1408), so that the configs it looks up are the ones tuned for it."""
    assert tune.expert_dims("deepseek-v2-lite") == (64, 2048, 1408, 6)
    assert tune.expert_dims("deepseek-v2-lite+shared") == (66, 2048, 1408, 8)
    assert tune.shared_columns("deepseek-v2-lite+shared") == 2 and tune.shared_columns("deepseek-v2-lite") == 0
    assert "deepseek-v2-lite+shared" in tune.shape_names() and "mixtral-8x7b+shared" not in tune.shape_names()
    with pytest.raises(ValueError, match="no shared expert"):
        tune.shared_columns("mixtral-8x7b+shared")


def test_one_ranks_call_is_a_shape_of_its_own(config_dir, capsys):
    """NAME@N: the call an expert-parallel rank makes (N of NAME's experts, top-1), a shape the bench times
    and tunes; its table entry is what get_config serves the rank's call (the expert timer's) with."""
    assert tune.expert_dims("mixtral-8x7b@2") == (2, 4096, 14336, 1)
    assert tune.expert_dims("deepseek-v2-lite@8") == (8, 2048, 1408, 1)
    for bad in ("mixtral-8x7b@9", "mixtral-8x7b@0", "mixtral-8x7b@two"):
        with pytest.raises(ValueError, match="the number of experts a rank holds, 1 to 8"):
            tune.expert_dims(bad)
    from moegps.kernels import bench
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "mixtral-8x7b@9"])
    assert "1 to 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "no-such-model"])
    assert "mixtral-8x7b" in capsys.readouterr().err  # the names it takes
    entry = {"path": "scan", "block_m": 16, "tuned_by": "a rank's table"}
    config_dir.parent.mkdir()
    key = launch.shape_key(*tune.expert_dims("mixtral-8x7b@2"))
    config_dir.write_text(json.dumps({"shapes": {key: {"64": entry}}}))
    assert launch.get_config(60, 2, 4096, 14336, 1)["tuned_by"] == "a rank's table"
    assert "tuned_by" not in launch.get_config(60, 3, 4096, 14336, 1)  # three experts: no table, the default


def test_routing_with_shared_columns():
    """make_routing(shared=2): k - 2 distinct routed experts among the first E - 2 with softmax gates,
    then the last two experts with gate 1, on every token."""
    from moegps.kernels.timing import make_routing

    ids, gates = make_routing(37, 66, 8, seed=5, device="cpu", shared=2)
    assert ids.shape == gates.shape == (37, 8)
    routed = ids[:, :6]
    assert int(routed.max()) < 64 and all(len(set(row)) == 6 for row in routed.tolist())
    assert ids[:, 6:].tolist() == [[64, 65]] * 37 and torch.equal(gates[:, 6:], torch.ones(37, 2))
    assert torch.allclose(gates[:, :6].sum(1), torch.ones(37))
    plain_ids, _ = make_routing(37, 64, 6, seed=5, device="cpu")
    assert torch.equal(plain_ids, routed)  # the routed part is the plain routing of the routed experts


def test_balanced_routing():
    """make_routing(balanced=True): k distinct experts a token, over exactly the experts the random
    routing of the same seed touches, each n * k / A rows (one more or less where that does not
    divide; A of them), the shared columns as in random routing. At a few tokens (8 tokens, 64
    experts, top-6) the random routing touches fewer experts than n * k, and so must balanced."""
    from moegps.kernels.timing import make_routing

    for n_tokens, n_experts, top_k, shared in [(512, 8, 2, 0), (37, 66, 8, 2), (100, 7, 3, 0), (8, 64, 6, 0),
                                               (3, 8, 2, 0)]:
        ids, gates = make_routing(n_tokens, n_experts, top_k, seed=3, device="cpu", shared=shared,
                                  balanced=True)
        random_ids, random_gates = make_routing(n_tokens, n_experts, top_k, seed=3, device="cpu",
                                                shared=shared)
        routed, random_routed = ids[:, :top_k - shared], random_ids[:, :top_k - shared]
        assert all(len(set(row)) == top_k - shared for row in routed.tolist())
        assert set(routed.reshape(-1).tolist()) == set(random_routed.reshape(-1).tolist())
        counts = torch.bincount(routed.reshape(-1), minlength=n_experts - shared)
        counts = counts[counts > 0]
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == n_tokens * (top_k - shared)
        assert torch.equal(gates, random_gates) and torch.equal(ids[:, top_k - shared:],
                                                                random_ids[:, top_k - shared:])
    few, _ = make_routing(8, 64, 6, seed=3, device="cpu", balanced=True)
    assert torch.unique(few).numel() < 48  # fewer than n * k: the random routing's draws collide


def test_a_probe_writes_only_variants_that_beat_the_shipped_config_by_2_percent(config_dir):
    """tune.write_winners (the wgmma and swap probes' --write-config): a variant 3% faster than the
    shipped config goes into the device's table with its time and command; 1% faster does not, nor
    does the shipped config itself timed as a variant."""
    config_dir.parent.mkdir()
    dims = tune.expert_dims("mixtral-8x7b")
    fast = {"path": "wgmma", "swap": True, "block_m": 192, "gate_up": {"block_k": 32}, "down": {"block_k": 32}}
    shipped_512 = launch.get_config(512, *dims)  # this device's table is empty: the default config
    rows = [{"shape": "mixtral-8x7b", "tokens": 2048, "ours_us": 100.0, "fast_us": 97.0, "same_us": 99.0},
            {"shape": "mixtral-8x7b", "tokens": 1024, "ours_us": 100.0, "fast_us": 99.0, "same_us": 99.5},
            {"shape": "mixtral-8x7b", "tokens": 512, "ours_us": 100.0, "fast_us": 99.0, "same_us": 90.0}]
    tune.write_winners(rows, {"fast": fast, "same": shipped_512}, "python probe.py")
    entries = json.loads(config_dir.read_text())["shapes"][launch.shape_key(*dims)]
    assert list(entries) == ["2048"]
    assert entries["2048"] == dict(fast, us=97.0, tuned_by="python probe.py")
    assert "2048" in launch._tuned_table("TEST_GPU")[launch.shape_key(*dims)]  # the cached copy was dropped


def test_a_probe_does_not_rewrite_the_shipped_entry_timed_as_a_variant(config_dir):
    """The shipped entry, whatever record it carries (its time, command, the machine it was tuned on), timed as a
    variant and read faster is the same config: its entry stays as it was."""
    config_dir.parent.mkdir()
    dims = tune.expert_dims("mixtral-8x7b")
    config = {"path": "sorted", "block_m": 128, "gate_up": {"block_n": 128}, "down": {"block_n": 256}}
    shipped = dict(config, us=50.0, tuned_by="an older run", tuned_on="NVIDIA H200")
    config_dir.write_text(json.dumps({"shapes": {launch.shape_key(*dims): {"2048": shipped}}}))
    tune.write_winners([{"shape": "mixtral-8x7b", "tokens": 2048, "ours_us": 100.0, "same_us": 95.0}],
                       {"same": config}, "python probe.py")
    assert json.loads(config_dir.read_text())["shapes"][launch.shape_key(*dims)]["2048"] == shipped


def test_another_devices_table_serves_when_named(config_dir):
    """get_config(table=NAME) serves NAME's entries (table_probe.py tries them on this device); without it, this
    device's own; a name with no table gives the default config."""
    config_dir.parent.mkdir()
    dims = tune.expert_dims("mixtral-8x7b")
    own = {"path": "sorted", "block_m": 64, "gate_up": {"block_n": 64}, "down": {"block_n": 64}}
    other = {"path": "sorted", "block_m": 128, "gate_up": {"block_n": 128}, "down": {"block_n": 256}}
    config_dir.write_text(json.dumps({"shapes": {launch.shape_key(*dims): {"2048": own}}}))
    (config_dir.parent / "OTHER_GPU.json").write_text(json.dumps({"shapes": {launch.shape_key(*dims): {"1024": other}}}))
    assert launch.get_config(2048, *dims) == own
    assert launch.get_config(2048, *dims, table="OTHER_GPU") == other  # its nearest entry, 1024
    assert launch.get_config(2048, *dims, table="NO_SUCH_GPU") == launch.default_config(2048, *dims)


def test_a_size_winner_is_written_at_its_size_whichever_table_it_came_from(config_dir):
    """tune.write_size_winner (table_probe.py --write-config): the other table's entry where >= 2% faster, with
    its time and command; else the entry the table served, written at this size as kept, so that a neighbour's
    new entry does not become its nearest."""
    config_dir.parent.mkdir()
    dims = tune.expert_dims("mixtral-8x7b")
    own = {"path": "sorted", "block_m": 128, "gate_up": {"block_n": 128}, "down": {"block_n": 256}, "us": 5.0,
           "tuned_by": "an older run"}
    config_dir.write_text(json.dumps({"shapes": {launch.shape_key(*dims): {"512": own}}}))
    other = {"path": "swap", "block_m": 128, "gate_up": {"block_n": 128}, "down": {"block_n": 128}, "us": 3.0,
             "tuned_by": "another device's search"}
    assert tune.write_size_winner("mixtral-8x7b", 1024, own, other, 100.0, 97.0, "probe") == "other"
    assert tune.write_size_winner("mixtral-8x7b", 768, own, other, 100.0, 99.0, "probe") == "own"
    entries = json.loads(config_dir.read_text())["shapes"][launch.shape_key(*dims)]
    assert list(entries) == ["512", "768", "1024"]
    plain = {k: v for k, v in own.items() if k not in ("us", "tuned_by")}
    assert entries["512"] == own  # untouched
    assert entries["768"] == dict(plain, us=100.0, kept_by="probe")
    assert entries["1024"] == dict({k: v for k, v in other.items() if k not in ("us", "tuned_by")}, us=97.0,
                                   tuned_by="probe")
    assert launch.get_config(768, *dims) == entries["768"]  # the nearest is no longer the new 1024 entry's


def test_a_one_mma_winner_keeps_the_entry_it_replaces_for_tritons_that_cannot_build_it(config_dir, monkeypatch):
    """A winning swap config with "one" (its MMAs inline PTX, Triton >= 3.9) is written with the
    config it beat as its "else"; get_config takes the entry where this Triton builds it, else the
    "else" (a Triton 3.6 machine keeps what it ran before)."""
    from moegps.kernels import wgmma_moe, wgmma_swap

    config_dir.parent.mkdir()
    dims = tune.expert_dims("mixtral-8x7b")
    monkeypatch.setattr(wgmma_moe, "supported", lambda device=None: True)
    one = {"path": "wgmma", "swap": True, "one": True, "block_m": 192, "pad_m": 32,
           "gate_up": {"block_k": 32}, "down": {"block_k": 32}}
    before = launch.get_config(2048, *dims)
    tune.write_winners([{"shape": "mixtral-8x7b", "tokens": 2048, "ours_us": 100.0, "one_us": 97.0}],
                       {"one": one}, "python probe.py")
    entry = json.loads(config_dir.read_text())["shapes"][launch.shape_key(*dims)]["2048"]
    assert entry == dict(one, us=97.0, tuned_by="python probe.py", **{"else": before})
    monkeypatch.setattr(wgmma_swap, "HAVE_ONE", True)
    assert launch.get_config(2048, *dims) == entry
    monkeypatch.setattr(wgmma_swap, "HAVE_ONE", False)
    assert launch.get_config(2048, *dims) == before


def test_runnable_entry_walks_the_else_chain_to_what_this_machine_runs(monkeypatch):
    """An entry's "else" chain ends at the first config this machine can run: a one-MMA entry
    where Triton builds it, the wgmma entry it replaced where Gluon lacks inline PTX, the Triton
    entry below that without Gluon, or None where nothing runs."""
    from moegps.kernels import wgmma_swap

    triton_entry = {"path": "swap", "block_m": 160}
    gluon_entry = {"path": "wgmma", "swap": True, "block_m": 192, "else": triton_entry}
    one_entry = {"path": "wgmma", "swap": True, "one": True, "block_m": 192, "else": gluon_entry}
    monkeypatch.setattr(wgmma_swap, "HAVE_ONE", True)
    assert launch.runnable_entry(one_entry, gluon=True) is one_entry
    assert launch.runnable_entry(one_entry, gluon=False) is triton_entry
    monkeypatch.setattr(wgmma_swap, "HAVE_ONE", False)
    assert launch.runnable_entry(one_entry, gluon=True) is gluon_entry
    assert launch.runnable_entry({"path": "wgmma", "one": True}, gluon=True) is None


def test_a_top_k_without_a_table_takes_the_same_experts_table_by_selections(config_dir):
    """get_config for a top-k no table has (top-1: an expert-parallel rank's compacted rows) takes the
    entry of the same experts' nearest top-k table with the nearest number of selections (tokens x
    top-k), not the default config; a table of the asked top-k wins; other experts' tables do not
    serve; with none, or past twice the table's most selections, the default."""
    config_dir.parent.mkdir()
    few = {"path": "scan", "block_m": 16, "tuned_by": "test"}
    many = {"path": "sorted", "block_m": 64, "tuned_by": "test"}
    shapes = {launch.shape_key(8, 64, 128, 2): {"8": few, "512": many},
              launch.shape_key(80, 64, 128, 1): {"1": {"path": "sorted", "block_m": 32, "tuned_by": "other E"}}}
    config_dir.write_text(json.dumps({"shapes": shapes}))
    launch._tuned_table.cache_clear()
    assert launch.get_config(16, 8, 64, 128, 1) == few  # 16 selections: 8 tokens of top-2
    assert launch.get_config(600, 8, 64, 128, 1) == many  # 600 selections: nearer 512 x 2 than 8 x 2
    assert launch.get_config(300, 8, 64, 128, 3) == many  # 900 selections, from the top-2 table
    assert launch.get_config(600, 8, 64, 128, 2) == many  # its own table: 600 tokens, nearest 512
    assert launch.get_config(1024, 8, 64, 128, 2) == many  # twice the largest tuned count: still the table's
    assert launch.get_config(1025, 8, 64, 128, 2) == launch.default_config(1025, 8, 64, 128, 2)  # beyond: default
    assert launch.get_config(2049, 8, 64, 128, 1) == launch.default_config(2049, 8, 64, 128, 1)  # by selections
    assert launch.get_config(5, 16, 64, 128, 1) == launch.default_config(5, 16, 64, 128, 1)
    shapes[launch.shape_key(8, 64, 128, 1)] = {"600": {"path": "scan", "block_m": 32, "tuned_by": "top-1"}}
    config_dir.write_text(json.dumps({"shapes": shapes}))
    launch._tuned_table.cache_clear()
    assert launch.get_config(16, 8, 64, 128, 1)["tuned_by"] == "top-1"



def _hand_trace(rng, path, lengths, n_layers=3, n_experts=16, top_k=4, weights=True):
    """A trace of len(lengths) prompts' prefills (request r has lengths[r] tokens) plus four decode
    steps of request 0, k distinct random experts a token and layer, written to `path`; returns
    the prefill tokens' experts [tokens, layer, k] and weights in request, then position order."""
    from moegps.trace import RoutingTrace, TraceMeta

    request = np.concatenate([np.full(n, r) for r, n in enumerate(lengths)] + [np.zeros(4, int)])
    position = np.concatenate([np.arange(n) for n in lengths] + [lengths[0] + np.arange(4)])
    step = np.concatenate([np.zeros(sum(lengths), int), 1 + np.arange(4)])
    experts = np.argsort(rng.random((len(request), n_layers, n_experts)), axis=2)[..., :top_k]
    gates = rng.dirichlet(np.ones(top_k), (len(request), n_layers)).astype(np.float32)
    order = rng.permutation(len(request))  # rows stored out of order: trace_routing must sort them
    trace = RoutingTrace.from_token_major(TraceMeta("hand", n_layers, n_experts, top_k), request[order],
                                          step[order], position[order], rng.integers(0, 99, len(request)),
                                          experts[order], gates[order] if weights else None)
    trace.write(path)
    prefill = step == 0
    return experts[prefill], gates[prefill]


def test_trace_routing_is_the_recorded_prefill_in_prompt_order(rng, tmp_path):
    """timing.trace_routing: the first n prefill tokens (prompt by prompt, in position order, decode rows
    left out) of a layer, with their recorded gates; without recorded gates, softmax rows drawn by the
    seed. Too many tokens or a layer it lacks is an error naming the file."""
    from moegps.kernels.timing import spread_evenly, trace_routing
    from moegps.trace import TraceError

    lengths = rng.integers(3, 20, 5).tolist()
    experts, gates = _hand_trace(rng, tmp_path / "t.parquet", lengths)
    n, layer = int(rng.integers(1, sum(lengths) + 1)), int(rng.integers(0, 3))
    ids, weights = trace_routing(tmp_path / "t.parquet", n, layer, device="cpu")
    assert ids.dtype == torch.int64 and ids.tolist() == experts[:n, layer].tolist()
    np.testing.assert_array_equal(weights.numpy(), gates[:n, layer])
    even = spread_evenly(ids)  # the bench's balanced counterpart: same experts, even counts
    counts = torch.bincount(even.reshape(-1))[torch.unique(ids)]
    assert set(even.reshape(-1).tolist()) == set(ids.reshape(-1).tolist())
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == ids.numel()

    _hand_trace(rng, tmp_path / "u.parquet", lengths, weights=False)
    _, drawn = trace_routing(tmp_path / "u.parquet", n, layer, seed=4, device="cpu")
    assert torch.allclose(drawn.sum(1), torch.ones(n)) and (drawn > 0).all()
    assert torch.equal(drawn, trace_routing(tmp_path / "u.parquet", n, layer, seed=4, device="cpu")[1])
    with pytest.raises(TraceError, match=rf"t\.parquet: {sum(lengths) + 1} prefill tokens requested, "
                                         rf"the trace has {sum(lengths)}"):
        trace_routing(tmp_path / "t.parquet", sum(lengths) + 1, 0, device="cpu")
    with pytest.raises(TraceError, match=r"t\.parquet: layer 3 requested, the trace has layers 0\.\.2"):
        trace_routing(tmp_path / "t.parquet", 1, 3, device="cpu")


def test_the_recorded_routing_rows_are_the_shapes_with_the_traces_experts(rng, tmp_path):
    """bench.trace_plan: rows for the shapes whose experts and top-k are the trace's (not the engine's
    call with a shared expert held among them), at the token counts the trace has, at its first,
    middle and last layer by default; a trace that fits none of the shapes is named with what it has."""
    from moegps.kernels.bench import trace_plan
    from moegps.kernels.tune import expert_dims
    from moegps.trace import TraceError

    _hand_trace(rng, tmp_path / "t.parquet", [40, 30], n_layers=5, n_experts=64, top_k=6)
    shapes = {name: expert_dims(name) for name in ("mixtral-8x7b", "deepseek-v2-lite", "deepseek-v2-lite+shared")}
    plan = trace_plan(tmp_path / "t.parquet", None, shapes, [8, 70, 71])
    assert plan == [("deepseek-v2-lite", t, layer) for t in (8, 70) for layer in (0, 2, 4)]
    assert trace_plan(tmp_path / "t.parquet", [1], shapes, [8]) == [("deepseek-v2-lite", 8, 1)]
    with pytest.raises(TraceError, match=r"t\.parquet: hand's routing \(64 experts, top-6\) fits none"):
        trace_plan(tmp_path / "t.parquet", None, {"mixtral-8x7b": shapes["mixtral-8x7b"]}, [8])
    with pytest.raises(TraceError, match=r"--trace-layers \[5\]; the trace has layers 0\.\.4"):
        trace_plan(tmp_path / "t.parquet", [5], shapes, [8])


def test_a_ranks_rows_from_a_replays_shares(rng, tmp_path):
    """timing.share_routing: the share of at most N experts nearest the token count, its experts' rows
    scaled to exactly that many (largest remainders, the proportions kept within a row), one slot id a
    row, gates 1; the seed only reorders the rows; a file without shares of N experts, or not a shares
    file, is an error naming it. bench.shares_routing hands shares only to one rank's calls (top-1)."""
    import json

    import pandas as pd

    from moegps.kernels.bench import shares_routing
    from moegps.kernels.timing import share_routing

    shares = []
    for total in (300, 1000, 4000):
        rows = np.zeros(64, dtype=int)
        experts = rng.choice(64, size=int(rng.integers(3, 9)), replace=False)
        rows[np.sort(experts)] = rng.multinomial(total, rng.dirichlet(np.ones(len(experts))))
        shares.append({"tokens": int(rows.sum()), "expert_rows": json.dumps(rows.tolist())})
    wide = np.ones(64, dtype=int)  # a share of 64 experts: never a rank of eight's
    shares.append({"tokens": 1100, "expert_rows": json.dumps(wide.tolist())})
    pd.DataFrame(shares).to_csv(tmp_path / "shares.csv", index=False)
    n = int(rng.integers(1100, 2400))  # nearest the 1000-row share of eight experts or fewer
    ids, gates = share_routing(tmp_path / "shares.csv", n, 8, seed=1, device="cpu")
    picked = np.asarray(json.loads(shares[1]["expert_rows"]))
    want = picked[picked > 0] * n / picked.sum()
    counts = torch.bincount(ids.reshape(-1), minlength=8).numpy()
    assert ids.shape == gates.shape == (n, 1) and counts.sum() == n and torch.equal(gates, torch.ones(n, 1))
    assert np.abs(counts[:len(want)] - want).max() < 1 and (counts[len(want):] == 0).all()
    again, _ = share_routing(tmp_path / "shares.csv", n, 8, seed=2, device="cpu")
    assert torch.equal(torch.bincount(again.reshape(-1), minlength=8), torch.as_tensor(counts))
    with pytest.raises(ValueError, match=r"shares\.csv: no share in 'expert_rows' has rows on 1\.\.2 experts"):
        share_routing(tmp_path / "shares.csv", 100, 2, device="cpu")
    pd.DataFrame({"tokens": [1]}).to_csv(tmp_path / "bench.csv", index=False)
    with pytest.raises(ValueError, match=r"bench\.csv: not an expert_shares\.csv"):
        share_routing(tmp_path / "bench.csv", 100, 8, device="cpu")
    routing_for = shares_routing(tmp_path / "shares.csv", {"r": (8, 2048, 1408, 1), "w": (64, 2048, 1408, 6)}, 0)
    assert routing_for("w", (64, 2048, 1408, 6), 512) is None
    with pytest.raises(SystemExit, match="name such a shape"):
        shares_routing(tmp_path / "shares.csv", {"w": (64, 2048, 1408, 6)}, 0)


def test_the_tuner_tunes_each_size_on_the_routing_it_is_given(config_dir, tmp_path, monkeypatch):
    """tune(routing_for=...): each (shape, tokens) is tuned on what routing_for returns for it (None:
    random routing), as bench --tune-shares hands a rank's calls a replay's shares."""
    config_dir.parent.mkdir()
    seen = {}

    def fake_tune_one(name, shape, n_tokens, failed, seed, paths, incumbent, routing=None):
        seen[n_tokens] = routing
        return {"path": "sorted", "block_m": 64, "us": 1.0}

    monkeypatch.setattr(tune, "tune_one", fake_tune_one)
    tune.tune({"tiny": SHAPE}, [8, 64], tmp_path / "out", 1, "cmd",
              routing_for=lambda name, shape, n: None if n == 8 else (name, shape, n))
    assert seen == {8: None, 64: ("tiny", SHAPE, 64)}
