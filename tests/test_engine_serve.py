"""Serving on the engine (moegps.engine.serve): requests arriving over time, admitted at every decode step
(continuous) or only when every slot is free (static), on a float64 random model on the CPU.

The reference for every answer is ``Engine.generate`` of that request alone: in float64 a request's greedy
tokens cannot depend on which others share its batch, its slot or its bucket. Arrivals run on a fake
clock (every look at it moves it on by one tick), so the admissions a test sees are the same on every
machine. Prefill into chosen cache slots is checked against the plain prefill, K/V entry by entry.
"""

import csv
from itertools import groupby

import numpy as np
import pytest
import torch

from moegps.engine import Engine, KVCache, prefill
from moegps.engine.generate import PrefillGraphs
from moegps.engine.model import random_model
from moegps.engine import serve as serve_module
from moegps.engine.serve import (Request, Served, chunk_sizes, decode_ceiling, main, packed_prefill_sizes, serve,
                                 summarize, warm_up)
from moegps.shapes import from_name
from moegps.simulator.serving import main as simulator_main


@pytest.fixture(autouse=True)
def engine_cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def model():
    shape = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=64, n_layers=2, hidden=32, n_heads=4,
                                              n_kv_heads=2, head_dim=8, expert_ffn=24, n_experts=8, top_k=2)
    return random_model(shape, device="cpu", dtype=torch.float64, seed=int(np.random.default_rng().integers(2**20)))


class FakeClock:
    """``clock()`` returns the time and moves it on by ``tick`` s; ``sleep(s)`` moves it on by s."""

    def __init__(self, tick: float = 0.001):
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def random_requests(rng, n: int, vocab: int, spread_s: float) -> list[Request]:
    return [Request(rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist(), int(rng.integers(1, 14)),
                    float(rng.uniform(0, spread_s))) for _ in range(n)]


def alone(model, requests, stop_tokens=()) -> list[list[int]]:
    engine = Engine(model, max_batch=1, max_len=32)
    return [engine.generate([r.prompt], r.max_new_tokens, stop_tokens=stop_tokens).tokens[0] for r in requests]


def watch_steps(engine: Engine, monkeypatch, look) -> list:
    """A list that gets ``look(bucket)`` just before each decode step the engine runs (its inputs as the step sees them)."""
    seen, step = [], engine.step

    def watched(bucket, size=0):
        run = step(bucket, size)

        def call():
            seen.append(look(bucket))
            return run()
        return call

    monkeypatch.setattr(engine, "step", watched)
    return seen


def concurrency(served: list[Served], at: float) -> int:
    return sum(s.first_token_s <= at < s.finish_s for s in served)


@pytest.mark.parametrize("prefill", ["whole", "one prompt a prefill", "graphs", "chunks of 3", "chunks of 8",
                                     "chunks of 8, 4 or 2"])
def test_served_answers_equal_each_request_alone(rng, model, prefill):
    """Nine requests over four slots, arriving while others decode: continuous (prompts prefilled whole,
    through the padded prefill graphs, or in chunks beside the decode, padded to 8 tokens or to the smallest
    of 8, 4 and 2) and static serving give every
    request the greedy tokens it gets alone (a stop token from one answer cuts the others where it occurs
    too); at most four run at once; static batches never overlap, continuous ones do."""
    requests = random_requests(rng, 9, model.shape.vocab_size, spread_s=0.05)
    stop = alone(model, requests[:1])[0][-1]
    want = alone(model, requests, stop_tokens=[stop])
    chunk = int(prefill.split()[2].rstrip(",")) if prefill.startswith("chunks") else 0
    graphs = 3 if prefill.endswith("or 2") else 1
    runs = {}
    for continuous in (True, False):
        engine = Engine(model, max_batch=3, max_len=32)  # 3 rounds up to the bucket of 4 slots
        if prefill == "graphs":  # the padded prefill a GPU replays, run eagerly: slots other than 0 gathered
            engine.prefill_graphs = PrefillGraphs(model, engine.cache, round_to=8)
        clock = FakeClock()
        budget = 1 if prefill == "one prompt a prefill" else 8192  # max_prefill_tokens: at least one prompt
        served = runs[continuous] = serve(engine, requests, stop_tokens=[stop], continuous=continuous,
                                          chunk=chunk if continuous else 0, max_prefill_tokens=budget,
                                          clock=clock, sleep=clock.sleep, chunk_graphs=graphs)
        assert [s.tokens for s in served] == want
        assert not engine.positions.any()  # free slots are parked at position 0, not run past the cache
        for s, r in zip(served, requests):
            assert r.arrival_s == s.arrival_s <= s.first_token_s <= s.finish_s
        assert max(concurrency(served, s.first_token_s) for s in served) <= engine.cache.slots == 4
    static = sorted(runs[False], key=lambda s: s.first_token_s)
    for s in static:  # a request-level batch starts when every earlier one has ended
        assert all(o.finish_s <= s.first_token_s for o in static if o.first_token_s < s.first_token_s)
    start = min(s.first_token_s for s in runs[True])
    assert any(concurrency(runs[True], s.first_token_s) > 1 and s.first_token_s > start
               for s in runs[True])  # someone joined a running batch


def test_a_late_request_joins_a_running_batch(model):
    """Hand-built: a long answer starts alone; a short request arriving mid-way gets its first token
    before the long one ends (continuous) or only after it (static), and a third arriving when nothing
    runs is served after the clock sleeps to its arrival."""
    requests = [Request([1, 2, 3], 12, 0.0), Request([4, 5], 2, 0.004), Request([6], 3, 5.0)]
    for continuous in (True, False):
        clock = FakeClock()
        long, short, late = serve(Engine(model, max_batch=2, max_len=32), requests, continuous=continuous,
                                  clock=clock, sleep=clock.sleep)
        assert (short.first_token_s < long.finish_s) == continuous
        assert (short.finish_s < long.finish_s) == continuous
        assert late.first_token_s >= 5.0 and len(long.tokens) == 12 and len(short.tokens) == 2


def test_free_rows_all_decode_token_0(rng, model, monkeypatch):
    """Every decode step's free rows (position 0: no answer in the slot) carry token 0, whenever their slot was
    freed, so that they all route to the same experts where they are not aliased (serve --free-rows token0); the
    running rows carry their answers' last tokens, and every answer is its request's alone."""
    requests = random_requests(rng, 7, model.shape.vocab_size, 0.0)
    engine = Engine(model, max_batch=5, max_len=32, alias_free_rows=False)  # 8 slots: buckets with holes, free rows
    seen = watch_steps(engine, monkeypatch, lambda bucket: (engine.tokens[:bucket].tolist(),
                                                            engine.positions[:bucket].tolist()))
    served = serve(engine, requests)
    free_rows = [(row, token) for tokens, positions in seen for row, (token, p) in enumerate(zip(tokens, positions))
                 if p == 0]
    assert len(free_rows) > 5 and len({row for row, _ in free_rows}) > 1
    assert all(token == 0 for row, token in free_rows)
    answered = {t for s in served for t in s.tokens}
    assert all(token in answered for tokens, positions in seen for token, p in zip(tokens, positions) if p > 0)
    assert [s.tokens for s in served] == alone(model, requests)


def expert_ids_seen(monkeypatch, model) -> list[torch.Tensor]:
    """A list that gets the expert ids ``[tokens, k]`` every MoE layer hands the experts from now on
    (``Model.expert_ids``, put back to None after the test)."""
    monkeypatch.setattr(model, "expert_ids", [])
    return model.expert_ids


def test_aliased_rows_compute_a_running_rows_experts(rng, model, monkeypatch):
    """decode_step with route_as: a row routed as itself gets exactly the logits it gets without route_as, and a
    row routed as another hands the MoE that row's expert ids at every layer (which, without route_as, are not
    its own everywhere)."""
    from moegps.engine.model import decode_step

    cache = KVCache(model.shape, 4, 32, torch.float64, "cpu")
    prefill(model, cache, [torch.from_numpy(rng.integers(0, 64, size=n)) for n in (5, 3, 7, 2)])
    tokens, positions = torch.from_numpy(rng.integers(0, 64, size=4)), torch.tensor([5, 3, 7, 2])
    seen = expert_ids_seen(monkeypatch, model)
    plain = decode_step(model, cache, tokens, positions)
    own = list(seen)
    seen.clear()
    aliased = decode_step(model, cache, tokens, positions, route_as=torch.tensor([0, 1, 1, 0]))
    assert torch.equal(aliased[:2], plain[:2])
    assert len(seen) == len(own) == model.shape.n_layers
    assert all(torch.equal(ids[2], ids[1]) and torch.equal(ids[3], ids[0]) for ids in seen)
    assert any(not torch.equal(ids[2], ids[1]) or not torch.equal(ids[3], ids[0]) for ids in own)


def test_a_chunks_padding_rows_route_as_its_prompt_rows(rng, model, monkeypatch):
    """decode_step_with_chunk with route_as: a chunk of 7 rows holding 3 prompt tokens (chunk_last 2) hands the MoE
    rows 0, 1, 2, 0, 1, 2, 0's expert ids for its rows at every layer (its padding rows' own ids are not those
    everywhere), and the decode rows' and the prompt's last row's logits are exactly those without route_as."""
    from moegps.engine.model import decode_step_with_chunk

    cache = KVCache(model.shape, 3, 32, torch.float64, "cpu")
    prefill(model, cache, [torch.from_numpy(rng.integers(0, 64, size=n)) for n in (5, 4, 6)])
    tokens, positions = torch.from_numpy(rng.integers(0, 64, size=2)), torch.tensor([5, 4])
    chunk = torch.tensor(rng.integers(1, 64, size=3).tolist() + [0] * 4)  # padded as serve pads a piece
    inputs = (chunk, torch.tensor([2]), torch.tensor([6]), torch.tensor([2]))  # slot 2, after its 6 positions
    seen = expert_ids_seen(monkeypatch, model)
    plain = decode_step_with_chunk(model, cache, tokens, positions, *inputs)
    own = [ids[2:] for ids in seen]  # the chunk's rows
    seen.clear()
    aliased = decode_step_with_chunk(model, cache, tokens, positions, *inputs, route_as=torch.tensor([0, 1]))
    cycled = [ids[2:] for ids in seen]
    assert torch.equal(aliased, plain)
    assert len(cycled) == len(own) == model.shape.n_layers
    cycle = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert all(torch.equal(ids, ids[cycle]) for ids in cycled)
    assert all(torch.equal(ids[:3], first[:3]) for ids, first in zip(cycled, own))
    assert any(not torch.equal(ids, ids[cycle]) for ids in own)


def test_generate_with_aliased_padding_rows(rng, model):
    """Three prompts fill a bucket of four: with alias_free_rows the padding row routes as row 0, and the three
    answers are the ones the engine gives without it."""
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (4, 6, 2)]
    plain = Engine(model, max_batch=3, max_len=32, alias_free_rows=False).generate(prompts, 8).tokens
    engine = Engine(model, max_batch=3, max_len=32, alias_free_rows=True)
    assert engine.generate(prompts, 8).tokens == plain
    assert engine.route_as.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("chunk", [0, 3])
def test_served_answers_with_aliased_free_rows(rng, model, monkeypatch, chunk):
    """Engine(alias_free_rows=True): every answer is still the one its request gets alone (a running row routed
    as another would change its answer), and each step routes every row of its bucket that holds no answer as
    the lowest row that does (checked without chunks, where the rows at position 0 are the ones that hold none;
    with chunks the slot being prefilled parks its row past position 0)."""
    requests = random_requests(rng, 7, model.shape.vocab_size, spread_s=0.03)
    engine = Engine(model, max_batch=5, max_len=32, alias_free_rows=True)  # 8 slots
    seen = watch_steps(engine, monkeypatch, lambda bucket: (engine.route_as[:bucket].tolist(),
                                                            engine.positions[:bucket].tolist()))
    clock = FakeClock()
    served = serve(engine, requests, chunk=chunk, clock=clock, sleep=clock.sleep)
    assert [s.tokens for s in served] == alone(model, requests)
    # steps with free rows (3-20 of them on 60 seeds; more than 3 failed one seed in about 60): the check below
    # is not vacuous
    assert sum(route != list(range(len(route))) for route, _ in seen) > 0
    for route, positions in seen if not chunk else ():
        running = [b for b, p in enumerate(positions) if p > 0]
        if running:
            assert route == [b if b in running else running[0] for b in range(len(route))]


def test_prefill_into_chosen_slots(rng, model):
    """Prompts prefilled into slots (2, 0) of a 4-slot cache give the logits and K/V of the plain prefill
    into (0, 1), and leave slots 1 and 3 as they were; PrefillGraphs' padded prefill into a slot too."""
    prompts = [torch.from_numpy(rng.integers(0, 64, size=n)) for n in (5, 9)]
    plain = KVCache(model.shape, 2, 16, torch.float64, "cpu")
    want = prefill(model, plain, prompts)
    cache = KVCache(model.shape, 4, 16, torch.float64, "cpu")
    cache.k.normal_(), cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    got = prefill(model, cache, prompts, slots=[2, 0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for b, (slot, n) in enumerate(zip((2, 0), (5, 9))):
        assert torch.equal(cache.k[:, slot, :, :n], plain.k[:, b, :, :n])
        assert torch.equal(cache.v[:, slot, :, :n], plain.v[:, b, :, :n])
    for slot in (1, 3):
        assert torch.equal(cache.k[:, slot], before_k[:, slot]) and torch.equal(cache.v[:, slot], before_v[:, slot])
    graphs = PrefillGraphs(model, cache, round_to=8)
    torch.testing.assert_close(graphs(prompts[1:], slots=[3]), want[1:], rtol=1e-12, atol=1e-12)
    assert torch.equal(cache.k[:, 3, :, :9], plain.k[:, 1, :, :9])
    with pytest.raises(ValueError, match=r"cache slots \[1, 1\] for 2 prompts: need one distinct slot"):
        prefill(model, cache, prompts, slots=[1, 1])
    with pytest.raises(ValueError, match=r"cache slots \[4\] for 1 prompts"):
        prefill(model, cache, prompts[:1], slots=[4])


def test_warm_up_captures_every_prefill_graph_the_requests_can_replay(rng, model):
    """On a GPU each capture inside a timed run would count in it; warm_up takes one prompt per padded length
    class, in slot 0 (a view of the cache) and slot 1 (gathered), and a pack of every token count that two
    newcomers (the slots) can make, from the two shortest prompts (3 + 5) to the two longest (16 + 17),
    rounded up to 8: here the keys PrefillGraphs would capture (run eagerly on the CPU); and the decode step of
    each bucket alone and beside a chunk of each size."""
    engine = Engine(model, max_batch=2, max_len=32)
    engine.prefill_graphs = PrefillGraphs(model, engine.cache, round_to=8)
    steps, step = [], engine.step
    engine.step = lambda bucket, size=0: steps.append((bucket, size)) or step(bucket, size)
    warm_up(engine, [Request([1] * n) for n in (3, 5, 9, 17, 16)], chunk=4, chunk_graphs=2)
    assert sorted(steps) == [(b, size) for b in (1, 2) for size in (0, 2, 4)]  # every step serving can replay
    assert set(engine.prefill_graphs._graphs) == (
        {("prompt", n, gathered) for n in (8, 16, 24) for gathered in (False, True)}
        | {("pack", n) for n in (8, 16, 24, 32, 40)})


@pytest.mark.parametrize("longest,budget", [(30, 90), (2200, 8192)])
def test_packed_prefill_sizes_cover_every_kernel_a_pack_can_compile(rng, model, monkeypatch, longest, budget):
    """A packed eager prefill's MoE kernels are chosen by its token count; warm_up runs one prefill per config,
    Triton specialisation class (token and selection counts divisible by 16 or not) and routing sort variant
    (``align_variant``) that the packs of these prompts can reach. Against a brute-force pass over every
    possible pack's total, under a stand-in table of configs that change at random token counts (the CPU has no
    tuned table); short prompts (every sort one launch) and long ones (packs of up to 8,800 selections: one
    launch, then chunked sorts of 8 and 16 chunks)."""
    edges = np.sort(rng.choice(np.arange(2, 2 * longest), size=6, replace=False))
    asked = []

    def fake_config(tokens, experts, hidden, ffn, top_k, device=None):
        asked.append((experts, hidden, ffn, top_k))
        return {"path": "sorted", "bucket": int(np.searchsorted(edges, tokens))}

    monkeypatch.setattr(serve_module, "get_config", fake_config)
    engine = Engine(model, max_batch=4, max_len=longest + 10)
    lengths = rng.integers(3, longest, size=9).tolist()
    sizes = packed_prefill_sizes(engine, lengths, max_prefill_tokens=budget)
    # every pack: 2..4 prompts (the slots) within the budget
    ordered = sorted(lengths)
    totals = range(ordered[0] + ordered[1], min(budget, sum(ordered[-4:])) + 1)

    def kind(t):  # top-2: 2t selections
        chunks = -(-2 * t // 1024)
        sort = "one" if chunks <= 4 else 1 << (chunks - 1).bit_length()
        return fake_config(t, 0, 0, 0, 0)["bucket"], t % 16 == 0, 2 * t % 16 == 0, sort
    assert {kind(t) for t in totals} == {kind(t) for t in sizes} and len({kind(t) for t in sizes}) == len(sizes)
    assert all(t in totals for t in sizes) and all(min(u for u in totals if kind(u) == kind(t)) == t for t in sizes)
    assert asked[0] == (8, 32, 24, 2)  # the model's experts, hidden, expert FFN and top-k
    assert packed_prefill_sizes(Engine(model, max_batch=1, max_len=40), lengths) == []  # one slot: no packs


def test_the_decode_ceiling_fits_the_cache(model):
    """The ceiling's full-bucket steps run on the shortest prompts, as many as the cache leaves them: here
    one, where the longest request (9 + 2 tokens) sets the cache's length."""
    engine = Engine(model, max_batch=2, max_len=11)
    ceiling = decode_ceiling(engine, [Request([1] * 9, 2), Request([2] * 8, 1)])
    assert np.isfinite(ceiling) and ceiling > 0


def test_serve_rejects_what_it_cannot_serve(model):
    engine = Engine(model, max_batch=2, max_len=16)
    for request, message in ((Request([]), "request 0: empty prompt"),
                             (Request([1], 0), "request 0: max_new_tokens must be >= 1"),
                             (Request([1] * 10, 7), r"request 0: 10 prompt \+ 7 new tokens exceed .* max_len 16"),
                             (Request([1], 2, -1.0), "request 0: arrival_s must be >= 0")):
        with pytest.raises(ValueError, match=message):
            serve(engine, [request])
    with pytest.raises(ValueError, match="chunk must be 0 .* or > 0 with continuous batching, got 4"):
        serve(engine, [Request([1])], continuous=False, chunk=4)


def test_chunk_sizes_halve_while_even():
    assert chunk_sizes(256) == [256]
    assert chunk_sizes(256, 4) == [256, 128, 64, 32]
    assert chunk_sizes(12, 5) == [12, 6, 3]
    assert chunk_sizes(7, 3) == [7]


def test_summarize_a_hand_built_run():
    served = [Served([1, 2, 3], 0.0, 0.1, 0.3), Served([4], 1.0, 1.5, 1.5)]
    s = summarize(served)
    assert s["new_tokens"] == 4 and s["span_s"] == pytest.approx(1.5) and s["tokens_per_s"] == pytest.approx(4 / 1.5)
    assert s["ttft_p50_ms"] == pytest.approx(300.0) and s["tpot_p50_ms"] == pytest.approx(100.0)
    assert s["latency_p90_ms"] == pytest.approx(300 + 0.9 * 200)


def test_cli_on_the_bundled_model(tmp_path, capsys):
    """Two rates, three policies: 18 rows of request times; a call cut short after the first rate is
    resumed by the next call with the same settings (the first rate's runs read back, not run again); a call
    with other settings is refused that file."""
    out = tmp_path / "serve.csv"
    argv = ["--requests", "3", "--max-batch", "2", "--max-new-tokens", "3", "--chunk", "16", "--out", str(out)]
    assert main(argv + ["--rate", "50"]) == 0
    first = capsys.readouterr().out
    assert "chunks of 16 tokens" in first and "chunked / static" in first and "continuous / static" in first
    assert main(argv + ["--rate", "50", "100"]) == 0
    text = capsys.readouterr().out
    assert text.count("(from the earlier run's file)") == 3
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {(r["rate"], r["policy"]) for r in rows} == \
        {(a, b) for a in ("50.0", "100.0") for b in ("continuous", "chunked", "static")}
    assert all(1 <= int(r["new_tokens"]) <= 3 for r in rows)
    with open(tmp_path / "serve-calls.csv") as f:  # every model call of the six runs, the first rate's kept
        calls = list(csv.DictReader(f))
    for (rate, policy), run in groupby(calls, key=lambda c: (c["rate"], c["policy"])):
        run = list(run)
        mine = [r for r in rows if (r["rate"], r["policy"]) == (rate, policy)]
        answered = {r["request"]: int(r["new_tokens"]) for r in mine}
        prompt_lengths = [int(r["prompt_tokens"]) for r in mine]
        prompts = [int(n) for c in run for n in c["prompts"].split()]
        assert [int(c["call"]) for c in run] == list(range(len(run)))
        assert sorted(prompts) == ([] if policy == "chunked" else sorted(prompt_lengths))  # chunked: in the steps
        assert sum(bool(c["positions"]) for c in run) >= max(answered.values()) - 1  # the decode steps
        assert all(float(c["start_s"]) < float(c["end_s"]) for c in run)
    assert {(c["rate"], c["policy"]) for c in calls} == {(r["rate"], r["policy"]) for r in rows}
    assert simulator_main(["--shape", "mixtral-8x7b", "--system", "h100_8gpu", "--calls",
                           str(tmp_path / "serve-calls.csv")]) == 0
    out = capsys.readouterr().out
    assert "between calls" in out and "as the run made them, --free-rows alias" in out
    for argv, message in ((argv[:5] + ["4"] + argv[6:], "holds runs of other settings"),
                          (["--requests", "0"], "--requests must be >= 1"), (["--chunk", "0"], "--chunk must be >= 1"),
                          (["--policy", "fast"], "invalid choice: 'fast'"),
                          (["--placement", "balanced"], "here 1 rank(s) and --placement balanced"),
                          (["--placement", "bogus"], "--placement: ")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_rank_order_hands_out_requests_round_robin_by_arrival(rng):
    from moegps.engine.serve import rank_order

    requests = random_requests(rng, 11, 64, spread_s=1.0)
    shares = [rank_order(requests, rank, 3) for rank in range(3)]
    by_arrival = sorted(range(11), key=lambda i: requests[i].arrival_s)
    assert sorted(sum(shares, [])) == list(range(11)) and [len(s) for s in shares] == [4, 4, 3]
    assert all(share == by_arrival[rank::3] for rank, share in enumerate(shares))


def test_held_out_prompts_are_not_the_served_ones():
    from moegps.engine.serve import held_out_prompts, mmlu_requests

    served = mmlu_requests(40, 0, 4, seed=3)
    held = held_out_prompts(served, 25, seed=3)
    assert len(held) == 25 and len({tuple(p) for p in held}) == 25
    assert not {tuple(p) for p in held} & {tuple(r.prompt) for r in served}
    assert held_out_prompts(served, 25, seed=3) == held and held_out_prompts(served, 25, seed=4) != held


def test_every_rate_of_a_seed_serves_the_same_requests():
    """The prompts and answer lengths of one seed do not depend on the rate, 0 (all at once) included, and the
    arrivals of one rate are another's scaled (the command runs every rate in one engine sized for the first:
    at rate 0 the lengths were once drawn from another point of the stream, and a prompt overran the cache)."""
    from moegps.engine.serve import mmlu_requests

    runs = {rate: mmlu_requests(12, rate, 40, seed=5) for rate in (0, 4, 8)}
    for rate, requests in runs.items():
        assert [(r.prompt, r.max_new_tokens) for r in requests] == [(r.prompt, r.max_new_tokens) for r in runs[4]]
    assert not any(r.arrival_s for r in runs[0])
    assert [r.arrival_s for r in runs[4]] == pytest.approx([2 * r.arrival_s for r in runs[8]], rel=1e-12)
    assert max(r.arrival_s for r in runs[4]) > 0


# ---- sampling keyed by (seed, tokens generated): the same draw in any batch -----------------------------------

def splitmix_reference(seed: int, counter: int, column: int) -> float:
    """counter_uniforms written with Python's unbounded ints, reduced mod 2^64 by hand."""
    m = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03 + column * 0x8CB92BA72F3D8DD7) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    x ^= x >> 31
    return ((x >> 11) + 0.5) * 2.0 ** -53


def test_counter_uniforms_are_splitmix64_on_wrapping_int64(rng):
    from moegps.engine.generate import counter_uniforms

    seeds, counters = rng.integers(0, 2**40, size=5), rng.integers(0, 10**6, size=5)
    got = counter_uniforms(torch.from_numpy(seeds), torch.from_numpy(counters), 7)
    want = [[splitmix_reference(int(s), int(c), v) for v in range(7)] for s, c in zip(seeds, counters)]
    assert got.tolist() == want
    assert 0 < got.min() and got.max() < 1


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)])
def test_gumbel_max_draws_follow_the_restricted_softmax(rng, top_k, top_p):
    """20,000 draws of one row of logits (a fresh seed, counters 0..19,999) against the probabilities of
    softmax over sampling_logits: never a token outside top-k / the nucleus, and a chi-square statistic
    a correct sampler exceeds with probability 1e-6."""
    from scipy import stats

    from moegps.engine.generate import Sampling, choose_tokens, sampling_logits

    logits = torch.from_numpy(rng.normal(0, 1.5, size=(1, 8)))
    draw = Sampling(temperature=float(rng.uniform(0.5, 2)), top_k=top_k, top_p=top_p, seed=int(rng.integers(2**31)))
    n = 20_000
    tokens = choose_tokens(logits.expand(n, 8), [draw] * n, torch.arange(n))
    p = sampling_logits(logits, draw).softmax(-1)[0].double().numpy()
    counts = np.bincount(tokens.numpy(), minlength=8)
    assert (counts[p == 0] == 0).all()
    keep = p > 0
    if keep.sum() > 1:
        chi2 = ((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum()
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-6, (counts, n * p)


def test_sampled_answers_do_not_depend_on_the_batch(rng, model):
    """Requests with their own sampling (temperatures, top-k, top-p, seeds) served continuously, in chunks
    and statically over two slots give each the answer it gets alone from Engine.generate; a request
    without one takes serve's sampling with seed + its index; another seed gives another answer."""
    from moegps.engine.generate import Sampling

    requests = random_requests(rng, 6, model.shape.vocab_size, spread_s=0.02)
    draws = [Sampling(temperature=float(rng.uniform(0.7, 3)), top_k=int(rng.choice([0, 5])),
                      top_p=float(rng.choice([1.0, 0.9])), seed=int(rng.integers(2**31))) for _ in requests]
    default = Sampling(temperature=2.0, seed=int(rng.integers(2**20)))
    requests = [Request(r.prompt, r.max_new_tokens, r.arrival_s, d if i % 3 else None)
                for i, (r, d) in enumerate(zip(requests, draws))]
    engine = Engine(model, max_batch=1, max_len=32)
    want = [engine.generate([r.prompt], r.max_new_tokens, r.sampling or Sampling(2.0, seed=default.seed + i)).tokens[0]
            for i, r in enumerate(requests)]
    for continuous, chunk in ((True, 0), (True, 4), (False, 0)):
        clock = FakeClock()
        served = serve(Engine(model, max_batch=2, max_len=32), requests, default, continuous=continuous, chunk=chunk,
                       clock=clock, sleep=clock.sleep)
        assert [s.tokens for s in served] == want, (continuous, chunk)
    long = Request(requests[0].prompt, 12)
    one, other = (engine.generate([long.prompt], 12, Sampling(5.0, seed=s)).tokens[0] for s in (1, 2))
    assert one != other


# ---- the engine's schedule is the one the simulator replays ----------------------------------------------------

@pytest.mark.parametrize("chunk", [0, 3])
def test_the_engines_steps_are_the_simulators_schedule(rng, model, chunk):
    """Requests all queued at the start, served greedily with no stop token: the engine step of each one's
    first and last token equals what moegps.simulator.replay's schedule puts there (continuous_schedule, or
    chunked_schedule with the same chunk), for a trace of the same prompt lengths and decode steps (an answer of
    n tokens runs n - 1 decode steps)."""
    from moegps.simulator.replay import chunked_schedule, continuous_schedule

    requests = [Request(r.prompt, r.max_new_tokens) for r in random_requests(rng, 10, model.shape.vocab_size, 0.0)]
    served = serve(Engine(model, max_batch=3, max_len=32), requests, chunk=chunk)
    slots = 4  # max_batch 3 rounds up to the bucket of 4
    prompts = np.array([len(r.prompt) for r in requests])
    decodes = np.array([r.max_new_tokens - 1 for r in requests])
    if chunk:  # the first token comes with the last chunk's step, the decode steps follow it
        _, decode_from, _ = chunked_schedule(prompts, decodes, slots, chunk)
        first, last = decode_from - 1, decode_from - 1 + decodes
    else:  # the first token comes with the prefill before the admission step's decode, which is the first
        first, _ = continuous_schedule(decodes, slots)
        last = first + np.maximum(decodes - 1, 0)
    assert [s.first_step for s in served] == first.tolist()
    assert [s.finish_step for s in served] == last.tolist()
