"""Simulator adapters to real predictors and placements, calibration, and the results row."""

import numpy as np
import pytest

from moegps.predictors import make
from moegps.results import FIELDS, read_results, write_rows
from moegps.simulator import calibrate
from moegps.simulator.replay import (
    PlaceFn, ReplayConfig, make_batches, oracle_bound, oracle_plan, distribution_plan, shares_from_slots, simulate,
    static_plan, token_plan,
)
from moegps.shapes import from_name as model_shape
from moegps.simulator.system import load_system
from moegps.workloads import random_trace


class _Perfect:
    """A token 'predictor' that knows the truth (k=1), free: moving tokens home must skip every dispatch."""

    name = "perfect"

    def __init__(self, experts):
        self.experts = experts

    def predict(self, tokens):
        return self.experts

    def cost(self):
        from moegps.predictors.base import PredictorCost

        return PredictorCost(name="perfect", family="token", runs_before_attention=True)


def test_perfect_token_routing_skips_the_dispatch(rng):
    trace = random_trace(rng, n_requests=6, n_layers=3, n_experts=8, top_k=1, skew=1.0)
    system = load_system("h100_8gpu").replace(n_gpus=4, gpus_per_node=4)
    shape = model_shape("mixtral-8x7b", top_k=1)
    batches = make_batches(trace, 4, cfg=ReplayConfig(batch_size=3))
    place = PlaceFn("static", system, 8)
    plan = token_plan(batches, _Perfect(batches.experts), place, system, home_slack=1e9)
    res = simulate(batches, plan, shape, system)
    assert plan.accuracy == 1.0
    assert (res.parts["dispatch"] == 0).all()
    base = simulate(batches, static_plan(batches), shape, system)
    assert base.parts["dispatch"].sum() > 0
    # with homes capped at an even share per GPU, every GPU hosts at most ceil(1.25 * tokens / G) tokens
    capped = token_plan(batches, _Perfect(batches.experts), place, system, home_slack=1.25)
    for layer in range(3):
        hosted = np.zeros((batches.n_steps, 4), dtype=int)
        np.add.at(hosted, (batches.step, capped.home[:, layer]), 1)
        assert (hosted <= np.ceil(1.25 * batches.n_tokens / 4)[:, None]).all()
        assert (capped.home[:, layer] >= 0).all()


def test_real_predictors_and_placements_replay(rng, tmp_path):
    train = random_trace(rng, n_requests=12, n_layers=2, n_experts=8, top_k=2, skew=1.5, decode_steps=4)
    test = random_trace(rng, n_requests=8, n_layers=2, n_experts=8, top_k=2, skew=1.5, decode_steps=4)
    system = load_system("h100_8gpu").replace(n_gpus=4, gpus_per_node=4)
    shape = model_shape("mixtral-8x7b")
    cfg = ReplayConfig(batch_size=4)
    batches = make_batches(test, 4, cfg=cfg)
    place = PlaceFn("balanced", system, 8)
    plans = [static_plan(batches), oracle_plan(batches, place),
             distribution_plan(batches, make("global_profile").fit(train), place, system),
             distribution_plan(batches, make("ema").fit(train), place, system, interval=2),
             token_plan(batches, make("token_table").fit(train), place, system)]
    results = [simulate(batches, p, shape, system, cfg) for p in plans]
    for plan, res in zip(plans, results):
        assert plan.share.shape[1:] == (2, 8, 4)
        np.testing.assert_allclose(plan.share.sum(-1), 1.0)
        assert res.total > 0 and np.isfinite(res.total)
    bound = oracle_bound(results)
    assert all(bound.total <= r.total * (1 + 1e-12) for r in results)
    rows = [r.row({"trace": "random", "batch_size": 4}, system) for r in results + [bound]]
    path = write_rows(rows, tmp_path / "sim.parquet")
    frame = read_results(path)
    assert set(FIELDS) <= set(frame.columns)
    assert (frame.backend == "sim").all()
    np.testing.assert_allclose(frame.total_ms, [r.total * 1e3 for r in results + [bound]])
    parts = frame[["dispatch_ms", "expert_ms", "combine_ms", "predictor_ms", "migration_ms", "other_ms"]].sum(axis=1)
    assert (parts <= frame.total_ms + 1e-9).all()


def test_shares_from_slots_split_replicas_evenly():
    slots = np.array([[[0, 1], [2, 0]]])  # one layer, 2 GPUs: expert 0 on both
    share = shares_from_slots(slots, 3)
    np.testing.assert_allclose(share[0], [[0.5, 0.5], [1, 0], [0, 1]])


def test_calibration_recovers_known_parameters(rng):
    shape = model_shape("mixtral-8x7b")
    start = load_system("h100_8gpu")
    factors = rng.uniform(0.5, 1.5, 6)
    truth = start.replace(hbm_bandwidth=start.hbm_bandwidth * factors[0], matmul_flops=start.matmul_flops * factors[1],
                          expert_launch=5e-6 * factors[2], layer_overhead=30e-6 * factors[3],
                          link_bandwidth=start.link_bandwidth * factors[4], link_latency=15e-6 * factors[5])
    cases = calibrate.synthetic_cases(rng, shape, truth, n_cases=30, noise=0.0)
    fitted, table = calibrate.fit(cases, shape, start)
    for name in calibrate.DEFAULT_FREE:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert table.abs_error_pct.max() < 0.1


def test_calibration_weights_pull_the_fit_to_the_cases_they_favour(rng):
    """Two sets of cases measured under two layer overheads cannot both be met by one: the fit lands
    near the set weighted a thousand times the other, whichever set that is; a weight list of the
    wrong length is a clear error."""
    shape = model_shape("mixtral-8x7b")
    start = load_system("h100_8gpu")
    low, high = rng.uniform(5e-6, 10e-6), rng.uniform(40e-6, 60e-6)
    sets = [calibrate.synthetic_cases(rng, shape, start.replace(layer_overhead=v), n_cases=12) for v in (low, high)]
    cases = sets[0] + sets[1]
    for favoured, overhead in ((0, low), (1, high)):
        weights = [1000.0 if i // 12 == favoured else 1.0 for i in range(24)]
        fitted, _ = calibrate.fit(cases, shape, start, ("layer_overhead",), weights=weights)
        assert fitted.layer_overhead == pytest.approx(overhead, rel=0.02)
    with pytest.raises(ValueError, match="3 weights for 24 cases"):
        calibrate.fit(cases, shape, start, ("layer_overhead",), weights=[1.0, 1.0, 1.0])


def test_distribution_plan_hands_each_token_its_generation_step(rng):
    """step_profile reads context.steps; the replay must pass every token's generation step (0 prefill,
    s the s-th decode step), else it silently answers with the phase profile."""
    from moegps.predictors.base import PredictorCost

    test = random_trace(rng, n_requests=6, n_layers=2, n_experts=8, top_k=2, decode_steps=3)
    batches = make_batches(test, 4, cfg=ReplayConfig(batch_size=3))
    seen = []

    class Spy:
        name = "spy"

        def predict_next(self, past_loads, context):
            seen.append((context.phase, np.asarray(context.steps)))
            return np.full((2, 8), 1 / 8)

        def cost(self):
            return PredictorCost(name="spy", family="distribution")

    system = load_system("h100_8gpu").replace(n_gpus=4, gpus_per_node=4)
    distribution_plan(batches, Spy(), PlaceFn("balanced", system, 8), system)
    order = np.argsort(batches.step, kind="stable")
    want = batches.routing.step[batches.keep][order]
    bounds = np.searchsorted(batches.step[order], np.arange(batches.n_steps + 1))
    assert len(seen) == batches.n_steps
    for s, (phase, steps) in enumerate(seen):
        np.testing.assert_array_equal(steps, want[bounds[s]:bounds[s + 1]])
        assert (steps == 0).all() == (phase == 0)
    assert max(int(steps.max()) for _, steps in seen) == 3  # decode steps 1..3 reached


# ---- continuous batching --------------------------------------------------------------------------------------

def routing_of(rng, prompts: list[int], decodes: list[int], n_layers: int = 2, n_experts: int = 8, top_k: int = 2):
    """A token-major trace of requests with these prompt lengths and decode step counts, random experts."""
    from moegps.trace import TokenRouting

    req = np.concatenate([np.full(p + d, r) for r, (p, d) in enumerate(zip(prompts, decodes))])
    step = np.concatenate([np.r_[np.zeros(p, int), np.arange(1, d + 1)] for p, d in zip(prompts, decodes)])
    position = np.concatenate([np.arange(p + d) for p, d in zip(prompts, decodes)])
    experts = np.argsort(rng.random((len(req), n_layers, n_experts)), -1)[..., :top_k].astype(np.int16)
    return TokenRouting(request_id=req, step=step.astype(np.int32), phase=(step > 0).astype(np.int8),
                        position=position, token_id=rng.integers(0, 100, len(req)), experts=experts, weights=None)


def brute_force_schedule(decode_steps, slots):
    """The serving loop written out: each iteration, the queue's next requests fill the free slots (lowest
    first), then every running request takes one decode step; a request leaves after its last one (after
    its prefill with none)."""
    queue, running = list(range(len(decode_steps))), {}  # slot -> [request, decode steps left]
    admitted, slot_of, t = {}, {}, 0
    while queue or running:
        for s in range(slots):
            if s not in running and queue:
                r = queue.pop(0)
                admitted[r], slot_of[r], running[s] = t, s, [r, decode_steps[r]]
        for s in list(running):
            if running[s][1] == 0:
                del running[s]
            else:
                running[s][1] -= 1
                if running[s][1] == 0:
                    del running[s]
        t += 1
    return [admitted[r] for r in range(len(decode_steps))], [slot_of[r] for r in range(len(decode_steps))]


def test_continuous_schedule_is_the_serving_loop(rng):
    from moegps.simulator.replay import continuous_schedule

    for _ in range(30):
        decodes, slots = rng.integers(0, 7, size=int(rng.integers(1, 15))), int(rng.integers(1, 5))
        admitted, slot = continuous_schedule(decodes, slots)
        assert (admitted.tolist(), slot.tolist()) == brute_force_schedule(decodes.tolist(), slots)


def test_continuous_batches_of_a_hand_built_trace(rng):
    """Two slots, requests with 2, 0 and 1 decode steps (prompts of 2, 3, 1 tokens): iteration 0 prefills
    r0 and r1 (5 tokens; r1 is done) and decodes r0's step 1; iteration 1 prefills r2 into r1's slot and
    decodes r0's step 2 beside r2's step 1."""
    routing = routing_of(rng, [2, 3, 1], [2, 0, 1])
    b = make_batches(routing, 2, 8, ReplayConfig(batch_size=2, batching="continuous", source="request"))
    assert b.phase.tolist() == [0, 1, 0, 1] and b.n_tokens.tolist() == [5, 1, 1, 2]
    assert sorted(zip(b.request_id[b.step == 3].tolist(), b.position[b.step == 3].tolist())) == [(0, 3), (2, 1)]
    assert b.source[b.request_id == 2].tolist() == [1, 1]  # r1's slot, on GPU 1
    assert b.loads.sum() == routing.experts.shape[0] * 2 * 2
    static = make_batches(routing, 2, 8, ReplayConfig(batch_size=2))
    assert static.phase.tolist() == [0, 1, 1, 0, 1] and static.n_tokens.tolist() == [5, 1, 1, 1, 1]
    decode_only = make_batches(routing, 2, 8, ReplayConfig(batch_size=2, batching="continuous", phase="decode"))
    assert decode_only.n_tokens.tolist() == [1, 2]  # the same decode steps, prefill steps left out


def test_continuous_batching_replays_whole_and_keeps_steps_full(rng):
    """Random answer lengths: every token replayed once, no decode step above the slots, and decode steps
    fuller on average than static batching's (whose batches thin out as their answers end); simulate runs."""
    decodes = rng.integers(0, 12, size=20)
    routing = routing_of(rng, rng.integers(1, 6, size=20).tolist(), decodes.tolist())
    cont = make_batches(routing, 4, 8, ReplayConfig(batch_size=4, batching="continuous"))
    static = make_batches(routing, 4, 8, ReplayConfig(batch_size=4))
    assert cont.n_tokens.sum() == static.n_tokens.sum() == len(routing.step)
    assert (cont.n_tokens[cont.phase == 1] <= 4).all()
    assert cont.n_tokens[cont.phase == 1].mean() > static.n_tokens[static.phase == 1].mean()
    assert (cont.phase == 1).sum() < (static.phase == 1).sum()  # fewer decode steps for the same tokens
    system = load_system("h100_8gpu").replace(n_gpus=4, gpus_per_node=4)
    res = simulate(cont, static_plan(cont), model_shape("mixtral-8x7b"), system)
    assert np.isfinite(res.total) and res.step_time.shape == (cont.n_steps,)
    with pytest.raises(ValueError, match="batching must be 'static', 'continuous', 'chunked' or 'packed', got 'dyn"):
        make_batches(routing, 4, 8, ReplayConfig(batching="dynamic"))


def brute_force_chunked(prompts, decode_steps, slots, chunk):
    """The engine's chunked serving loop written out (moegps.engine.serve, chunk > 0): each iteration the
    queue fills the free slots (lowest first), then one step runs every running request's decode and the
    next chunk of the oldest admitted prompt; a prompt's last chunk gives its first token, its decode starts
    the iteration after; a request leaves after its last decode step (after its last chunk with none).
    Returns {(request, kind, index): iteration}, kind "p" for prompt token index, "d" for decode step."""
    queue, prefilling, running, free = list(range(len(prompts))), [], {}, list(range(slots))
    at, t = {}, 0
    while queue or prefilling or running:
        while queue and free:
            prefilling.append([queue.pop(0), free.pop(free.index(min(free))), 0])
        for s in list(running):
            r, done = running[s]
            at[r, "d", done + 1] = t
            running[s][1] += 1
            if running[s][1] == decode_steps[r]:
                del running[s]
                free.append(s)
        if prefilling:
            r, s, done = prefilling[0]
            for j in range(done, min(done + chunk, prompts[r])):
                at[r, "p", j] = t
            prefilling[0][2] = min(done + chunk, prompts[r])
            if prefilling[0][2] == prompts[r]:
                prefilling.pop(0)
                if decode_steps[r]:
                    running[s] = [r, 0]
                else:
                    free.append(s)
        t += 1
    return at


def test_chunked_schedule_is_the_engines_chunked_loop(rng):
    from moegps.simulator.replay import chunked_schedule

    for _ in range(30):
        n = int(rng.integers(1, 12))
        prompts, decodes = rng.integers(1, 10, size=n), rng.integers(0, 6, size=n)
        slots, chunk = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        first, decode_from, _ = chunked_schedule(prompts, decodes, slots, chunk)
        want = brute_force_chunked(prompts.tolist(), decodes.tolist(), slots, chunk)
        got = {(r, "p", j): int(first[r]) + j // chunk for r in range(n) for j in range(prompts[r])}
        got |= {(r, "d", k): int(decode_from[r]) + k - 1 for r in range(n) for k in range(1, decodes[r] + 1)}
        assert got == want


def test_chunked_batches_mix_prompt_chunks_with_decode(rng):
    """Two slots, chunks of 2: r0 (prompt 3, 2 decode steps) is chunked in iterations 0-1 and decodes in
    2-3; r1 (prompt 2, 1 step) in slot 1 is chunked in iteration 2 beside r0's first decode step and
    decodes in 3. Mixed steps take the phase of most of their tokens; every token is replayed once; the
    decode-only replay keeps the same iterations' decode tokens."""
    routing = routing_of(rng, [3, 2], [2, 1])
    b = make_batches(routing, 2, 8, ReplayConfig(batch_size=2, batching="chunked", chunk=2, source="request"))
    assert b.n_tokens.tolist() == [2, 1, 3, 2] and b.phase.tolist() == [0, 0, 0, 1]
    assert sorted(zip(b.request_id[b.step == 2].tolist(), b.position[b.step == 2].tolist())) == [(0, 3), (1, 0), (1, 1)]
    decode_only = make_batches(routing, 2, 8, ReplayConfig(batch_size=2, batching="chunked", chunk=2, phase="decode"))
    assert decode_only.n_tokens.tolist() == [1, 2]
    random = routing_of(rng, rng.integers(1, 9, size=12).tolist(), rng.integers(0, 8, size=12).tolist())
    chunked = make_batches(random, 4, 8, ReplayConfig(batch_size=4, batching="chunked", chunk=3))
    assert chunked.n_tokens.sum() == len(random.step) and (chunked.n_tokens <= 4 + 3).all()
    system = load_system("h100_8gpu").replace(n_gpus=4, gpus_per_node=4)
    plan = distribution_plan(chunked, make("global_profile").fit(random_trace(rng, n_requests=4)), PlaceFn(
        "balanced", system, 8), system)
    assert np.isfinite(simulate(chunked, plan, model_shape("mixtral-8x7b"), system).total)


def test_packed_batches_share_a_token_budget(rng):
    """Two slots, 4 tokens a step: step 0 packs r0's whole prompt (3) and r1's first token; step 1 r0's first
    decode step beside r1's last prompt token; step 2 both decode; r2 waits for a slot and prefills alone in
    step 3. A tie of prompt and decode tokens counts as prefill."""
    routing = routing_of(rng, [3, 2, 1], [2, 1, 0])
    b = make_batches(routing, 2, 8, ReplayConfig(batch_size=2, batching="packed", chunk=4, source="request"))
    assert b.n_tokens.tolist() == [4, 2, 2, 1] and b.phase.tolist() == [0, 0, 1, 0]
    assert sorted(zip(b.request_id[b.step == 1].tolist(), b.position[b.step == 1].tolist())) == [(0, 3), (1, 1)]
    assert b.source[b.request_id == 2].tolist() == [0]  # r0's slot, freed first


def test_packed_schedule_keeps_its_promises(rng):
    """Random requests: no step over the budget unless its decode rows alone are; every prompt in order, its
    decode right after its last prompt token; admissions in order, never more requests holding slots than
    slots; and no step leaves budget unused while an admitted prompt still waits (work-conserving)."""
    from moegps.simulator.replay import packed_schedule

    for _ in range(30):
        n = int(rng.integers(1, 14))
        prompts, decodes = rng.integers(1, 12, size=n), rng.integers(0, 7, size=n)
        slots, budget = int(rng.integers(1, 5)), int(rng.integers(2, 9))
        prompt_step, decode_from, slot = packed_schedule(prompts, decodes, slots, budget)
        offsets = np.concatenate([[0], np.cumsum(prompts)])
        per_request = [prompt_step[offsets[r]:offsets[r + 1]] for r in range(n)]
        assert all((np.diff(p) >= 0).all() and decode_from[r] == p[-1] + 1 for r, p in enumerate(per_request))
        assert (np.diff([p[0] for p in per_request]) >= 0).all()  # prefills start in admission order
        steps = int(max(decode_from + decodes)) + 1
        prompt_count = np.bincount(prompt_step, minlength=steps)
        decode_count = np.zeros(steps, int)
        for r in range(n):
            decode_count[decode_from[r]:decode_from[r] + decodes[r]] += 1
        assert ((prompt_count + decode_count <= budget) | (prompt_count == 0)).all()
        holding = np.zeros(steps, int)  # a request holds its slot at least from its first prompt step to its last
        for r in range(n):
            holding[per_request[r][0]:decode_from[r] + decodes[r]] += 1
        assert (holding <= slots).all()
        for t in range(steps):  # budget left over while a started prompt still has tokens after the step: never
            if any(p[0] <= t < p[-1] for p in per_request):
                assert prompt_count[t] + decode_count[t] == budget or decode_count[t] >= budget
        by_slot = {}
        for r in range(n):
            by_slot.setdefault(int(slot[r]), []).append(r)
        assert all(r < s for rs in by_slot.values() for r, s in zip(rs, rs[1:]))


def test_answers_cut_at_drawn_lengths(rng):
    """answers="uniform": every prompt kept whole; each request's decode steps cut after a number drawn from
    0 to its last, the same in every replay (seeded by the request id), covering both ends over many requests;
    on a trace of equal answers, continuous batching then needs fewer decode steps than static for the same
    tokens."""
    from moegps.simulator.replay import cut_answers

    routing = routing_of(rng, rng.integers(1, 6, size=60).tolist(), [9] * 60)
    cut = cut_answers(routing)
    assert (cut.step == 0).sum() == (routing.step == 0).sum()
    kept = np.zeros(60, int)
    np.maximum.at(kept, cut.request_id, cut.step)
    assert kept.min() == 0 and kept.max() == 9 and len(set(kept.tolist())) > 5
    for r in range(60):  # its whole prompt, then decode steps 1..kept
        prompt = (routing.request_id == r).sum() - 9
        assert np.sort(cut.step[cut.request_id == r]).tolist() == [0] * prompt + list(range(1, kept[r] + 1))
    assert (cut_answers(routing).step == cut.step).all()
    static = make_batches(routing, 4, 8, ReplayConfig(batch_size=8, answers="uniform"))
    cont = make_batches(routing, 4, 8, ReplayConfig(batch_size=8, answers="uniform", batching="continuous"))
    assert static.n_tokens.sum() == cont.n_tokens.sum() == len(cut.step)
    assert (cont.phase == 1).sum() < (static.phase == 1).sum()
    whole = make_batches(routing, 4, 8, ReplayConfig(batch_size=8, batching="continuous"))
    assert (whole.phase == 1).sum() == (make_batches(routing, 4, 8, ReplayConfig(batch_size=8)).phase == 1).sum()


def reference_other(b, shape, system, attention, context: bool, history: int = 0, home=None):
    """The non-MoE part of every step, a loop over its tokens: weights once, each token's projections on its
    GPU (``home`` [T], default its source), each decode token's K/V up to its position (after ``history``
    cached tokens) and each token's QK/PV FLOPs over its context on its source GPU, where its request's cache
    is (``[S]`` seconds)."""
    G, out = b.n_gpus, np.zeros(b.n_steps)
    home = b.source if home is None else home
    weights = shape.non_expert_params_per_layer * shape.dtype_bytes
    phase = b.routing.phase[b.keep]
    for s in range(b.n_steps):
        kv, flops, busy = np.zeros(G), np.zeros(G), np.zeros(G, dtype=bool)
        for t in np.flatnonzero(b.step == s):
            g = b.source[t]
            busy[home[t]] = True
            flops[home[t]] += 2 * shape.non_expert_params_per_layer
            if context:
                busy[g] = True
                attended = history + b.position[t] + 1
                flops[g] += 4 * shape.n_heads * shape.head_dim * attended
                kv[g] += attended * shape.kv_bytes_per_token if phase[t] == 1 else 0
        if attention == "dp":
            out[s] = max(max((weights + kv[g]) / system.hbm_bandwidth, flops[g] / system.matmul_flops)
                         for g in range(G) if busy[g])
        else:
            n = (b.step == s).sum()
            out[s] = (max((weights + kv.sum()) / G / system.hbm_bandwidth, flops.sum() / G / system.matmul_flops)
                      + 2 * (G - 1) / G * n * shape.token_bytes / system.link_bandwidth + system.link_latency)
    return out


@pytest.mark.parametrize("batching", ["static", "chunked"])
def test_attention_context_charges_each_tokens_context(rng, batching):
    """With ``attention_context`` the non-MoE part of every step and layer equals a loop over its tokens (decode
    tokens read their K/V up to their position; a chunked step's prompt tokens read none), with the memory or
    the FLOPs binding, data- or tensor-parallel; without it, the weights alone, at every position alike."""
    routing = routing_of(rng, rng.integers(1, 40, size=6).tolist(), rng.integers(0, 30, size=6).tolist())
    shape = model_shape("mixtral-8x7b")
    for system in (load_system("h200_8gpu").replace(n_gpus=2, gpus_per_node=2),
                   load_system("h200_8gpu").replace(n_gpus=2, gpus_per_node=2, matmul_flops=2e12)):
        for attention in ("dp", "tp"):
            for context, history in ((True, 0), (True, 3000), (False, 0)):
                cfg = ReplayConfig(batch_size=3, batching=batching, chunk=5, attention=attention,
                                   attention_context=context, history_tokens=history)
                b = make_batches(routing, 2, 8, cfg)
                other = simulate(b, static_plan(b), shape, system, cfg).parts["other"]
                want = reference_other(b, shape, system, attention, context, history)
                np.testing.assert_allclose(other, np.repeat(want[:, None], b.n_layers, 1), rtol=1e-12)
    # a plan that moves tokens to their experts' GPUs moves their projections, not their requests' caches
    system = load_system("h200_8gpu").replace(n_gpus=2, gpus_per_node=2)
    cfg = ReplayConfig(batch_size=3, batching=batching, chunk=5, attention_context=True, history_tokens=2000)
    b = make_batches(routing, 2, 8, cfg)
    plan = token_plan(b, _Perfect(b.experts), PlaceFn("static", system, 8), system, home_slack=1e9)
    assert (plan.home != b.source[:, None]).any()
    other = simulate(b, plan, shape, system, cfg).parts["other"]
    for layer in range(b.n_layers):
        np.testing.assert_allclose(other[:, layer], reference_other(b, shape, system, "dp", True, 2000,
                                                                    plan.home[:, layer]), rtol=1e-12)
    # a hand-built case: one decode token at position 4095 reads 4096 positions of 4 KiB in each layer
    assert shape.kv_bytes_per_token == 4096
    b = make_batches(routing_of(rng, [4095], [1]), 1, 8, ReplayConfig(batch_size=1, phase="decode",
                                                                     attention_context=True))
    one = load_system("h200_8gpu").replace(n_gpus=1, gpus_per_node=1)
    other = simulate(b, static_plan(b), shape, one, ReplayConfig(attention_context=True)).parts["other"]
    weights = shape.non_expert_params_per_layer * 2
    np.testing.assert_allclose(other, (weights + 4096 * 4096) / one.hbm_bandwidth, rtol=1e-12)
    with pytest.raises(ValueError, match="history_tokens=5 needs attention_context=True"):
        simulate(b, static_plan(b), shape, one, ReplayConfig(history_tokens=5))


def test_kv_memory_bounds_the_history(rng):
    """Two requests (prompts of 3 and 5 tokens, 2 and 1 decode steps) in one static batch of Mixtral-8x7B on 8
    H200s: the step holding most K/V is the first decode step (positions 4 and 6, plus the history each). Its
    bytes against what 8 GPUs keep beside the weights, counted by hand: two expert slots of 32 layers a GPU,
    and every GPU the rest of the model (data-parallel attention)."""
    from moegps.simulator.system import SystemSpecError

    shape, system = model_shape("mixtral-8x7b"), load_system("h200_8gpu")
    b = make_batches(routing_of(rng, [3, 5], [2, 1]), 8, 8, ReplayConfig(batch_size=2))
    expert = 3 * 4096 * 14336 * 2
    weights = 2 * 32 * expert + (93_405_585_408 - 8 * 32 * expert)
    room = 8 * (141e9 - weights)
    per_position = 4096 * 32  # 4 KiB a position and layer
    history = int((room / per_position - 10) // 2)  # (4 + h) + (6 + h) positions fit, one more does not
    for h, fits in ((history, True), (history + 1, False)):
        cfg = ReplayConfig(batch_size=2, attention_context=True, history_tokens=h)
        if fits:
            simulate(b, static_plan(b), shape, system, cfg)
        else:
            with pytest.raises(SystemSpecError, match=r"step 1 holds .* lower replay.batch_size or replay.history"):
                simulate(b, static_plan(b), shape, system, cfg)
