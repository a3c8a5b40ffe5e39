"""Expert- and tensor-parallel MoE layers on gloo with 2 and 4 CPU processes, against a float64 reference.

One process group per world size serves every check of this module (starting processes costs more
than the checks); each check's outcome comes back per rank, and each test asserts one check.
"""

import json
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from moegps.executor import dist as xdist
from moegps.executor.layer import (ExpertParallelMoE, TensorParallelMoE, choose_slots, moe_reference,
                                   slot_weights, expert_weights, tp_shard)
from moegps.executor.replace import migrate, plan_moves
from moegps.placement import Placement

H, F, E, K = 24, 40, 8, 2


def _master(seed):
    """All experts' weights, identical on every rank (float32)."""
    gu = torch.stack([expert_weights(0, e, H, F, seed=seed)[0] for e in range(E)])
    down = torch.stack([expert_weights(0, e, H, F, seed=seed)[1] for e in range(E)])
    return gu, down


def _routing(gen, T, probs):
    """``T`` tokens' distinct top-K experts drawn from ``probs [E]`` and gate weights summing to 1."""
    ids = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=gen)
    w = torch.rand(T, K, generator=gen) + 0.1
    return ids, w / w.sum(-1, keepdim=True)


def _check_ep(comm, seed, slot_expert, share=None, probs=None, token_counts=None):
    """EP layer output on this rank's tokens == float64 reference on all tokens."""
    gen = torch.Generator().manual_seed(seed)
    G = comm.world
    token_counts = token_counts or [int(c) for c in torch.randint(3, 12, (G,), generator=gen)]
    T = sum(token_counts)
    x = torch.randn(T, H, generator=gen)
    probs = torch.ones(E) if probs is None else probs
    ids, w = _routing(gen, T, probs)
    p = Placement(slot_expert[None], E, None if share is None else share[None])
    gu, down = slot_weights(p.slot_expert[0, comm.rank], 0, H, F, seed=seed)
    layer = ExpertParallelMoE(comm, p.slot_expert[0], p.replica_share[0], E, gu, down)
    lo = sum(token_counts[: comm.rank])
    mine = slice(lo, lo + token_counts[comm.rank])
    y = layer(x[mine], ids[mine], w[mine])
    mgu, mdown = _master(seed)
    ref = moe_reference(x.double(), mgu.double(), mdown.double(), ids, w.double())[mine]
    assert y.shape == ref.shape
    err = (y.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err < 1e-5, f"rank {comm.rank}: relative error {err:.2e} (seed {seed})"
    return layer


def check_random(comm, seed):
    perm = np.random.default_rng(seed).permutation(E)  # any placement: a random permutation
    _check_ep(comm, seed, perm.reshape(comm.world, E // comm.world))


def check_skewed(comm, seed):
    probs = 1.0 / torch.arange(1, E + 1).double() ** 2.0  # Zipf, most tokens on experts 0 and 1
    slot_expert = np.arange(E).reshape(comm.world, -1)
    _check_ep(comm, seed, slot_expert, probs=probs.float())


def check_empty_expert_and_rank(comm, seed):
    probs = torch.ones(E)
    probs[3] = 0.0  # expert 3 never chosen
    probs[E - 1] = 0.0  # nor the last (a whole GPU idle with contiguous placement on 4+ ranks? not always)
    counts = [5] * comm.world
    counts[-1] = 0  # the last rank owns no tokens
    _check_ep(comm, seed, np.arange(E).reshape(comm.world, -1), probs=probs, token_counts=counts)


def _replicated_placement(comm, seed, shares: str):
    """Each GPU gets E/G own experts plus 1 extra slot holding a replica of a hot expert."""
    G, S = comm.world, E // comm.world + 1
    rng = np.random.default_rng(seed)
    table = np.full((G, S), -1)
    table[:, :-1] = np.arange(E).reshape(G, -1)
    table[:, -1] = [0, 1] * (G // 2) if G > 1 else [0]  # experts 0 and 1 replicated (G/2 + 1 copies each)
    p = Placement(table[None], E)
    share = p.replica_share[0].copy()
    if shares == "proportional":  # uneven shares, one replica of expert 1 getting none
        for e in (0, 1):
            where = np.argwhere(table == e)
            s = rng.dirichlet(np.ones(len(where)))
            if e == 1:
                s[0] = 0.0
                s /= s.sum()
            share[tuple(where.T)] = s
    return table, share


def check_replicas_even(comm, seed):
    table, share = _replicated_placement(comm, seed, "even")
    probs = 1.0 / torch.arange(1, E + 1).float()
    _check_ep(comm, seed, table, share, probs=probs)


def check_replicas_proportional(comm, seed):
    table, share = _replicated_placement(comm, seed, "proportional")
    probs = 1.0 / torch.arange(1, E + 1).float()
    layer = _check_ep(comm, seed, table, share, probs=probs)
    # the split rule: each replica gets its share of an expert's tokens, to within one token
    gen = torch.Generator().manual_seed(seed + 1)
    ids, _ = _routing(gen, 200, probs)
    phys = choose_slots(ids, layer._phys.cpu(), layer._cum.cpu(), layer._count.cpu()).reshape(-1)
    flat_share = share.reshape(-1)
    for e in (0, 1):
        n = int((ids == e).sum())
        for p in np.flatnonzero(table.reshape(-1) == e):
            got = int((phys == p).sum())
            assert abs(got - flat_share[p] * n) <= 1, f"expert {e} slot {p}: {got} of {n}, share {flat_share[p]:.3f}"


def check_tensor_parallel(comm, seed):
    gen = torch.Generator().manual_seed(seed)
    T = 13
    x = torch.randn(T, H, generator=gen)
    ids, w = _routing(gen, T, 1.0 / torch.arange(1, E + 1).float())
    mgu, mdown = _master(seed)
    layer = TensorParallelMoE(comm, *tp_shard(mgu, mdown, comm.rank, comm.world))
    y = layer(x, ids, w)
    ref = moe_reference(x.double(), mgu.double(), mdown.double(), ids, w.double())
    err = (y.double() - ref).norm() / ref.norm()
    assert err < 1e-5, f"rank {comm.rank}: TP relative error {err:.2e} (seed {seed})"


def check_migration(comm, seed):
    """Re-placement moves exactly the changed slots, and the layer then computes the new placement."""
    rng = np.random.default_rng(seed)
    G, S = comm.world, E // comm.world + 1
    old = np.full((G, S), -1)
    old[:, :-1] = rng.permutation(E).reshape(G, -1)
    old[:, -1] = rng.integers(0, E, G)
    new = old.copy()
    flat = new.reshape(-1)
    change = rng.choice(G * S, size=max(2, G * S // 3), replace=False)
    flat[change] = rng.integers(0, E, len(change))
    for e in np.setdiff1d(np.arange(E), flat):  # keep every expert held somewhere
        spare = [p for p in range(G * S) if (flat == flat[p]).sum() > 1]
        flat[spare[0]] = e
    new = flat.reshape(G, S)
    p_old, p_new = Placement(old[None], E), Placement(new[None], E)
    gu, down = slot_weights(old[comm.rank], 0, H, F, seed=seed)
    layer = ExpertParallelMoE(comm, old, p_old.replica_share[0], E, gu, down)
    untouched = [s for s in range(S) if new[comm.rank, s] == old[comm.rank, s]]
    before = {s: (gu[s].clone(), down[s].clone()) for s in untouched}
    stats = migrate(layer, new, p_new.replica_share[0])
    changed = {(g, s) for g, s in zip(*np.nonzero((new != old) & (new >= 0)))}
    moves = plan_moves(old, new)
    assert {(m.dst_gpu, m.dst_slot) for m in moves} == changed
    assert stats.changed_slots == len(changed)
    remote = [m for m in moves if m.src_gpu != m.dst_gpu]
    assert stats.remote_slots == len(remote)
    assert stats.bytes_migrated == len(remote) * (2 * F * H + H * F) * 4
    for m in moves:  # each source really held the expert, and a local copy is used where possible
        assert old[m.src_gpu, m.src_slot] == m.expert
        assert (m.src_gpu == m.dst_gpu) == (m.expert in old[m.dst_gpu])
    for s in range(S):
        e = int(new[comm.rank, s])
        if e >= 0:
            want_gu, want_down = expert_weights(0, e, H, F, seed=seed)
            assert torch.equal(layer.w_gate_up[s], want_gu) and torch.equal(layer.w_down[s], want_down), \
                f"rank {comm.rank} slot {s}: weights are not expert {e}'s after migration"
    for s, (g0, d0) in before.items():
        assert torch.equal(layer.w_gate_up[s], g0) and torch.equal(layer.w_down[s], d0)
    _check_ep_layer_after(comm, seed, layer)


def _check_ep_layer_after(comm, seed, layer):
    gen = torch.Generator().manual_seed(seed + 7)
    T = 9
    x = torch.randn(T * comm.world, H, generator=gen)
    ids, w = _routing(gen, T * comm.world, torch.ones(E))
    mine = slice(comm.rank * T, (comm.rank + 1) * T)
    y = layer(x[mine], ids[mine], w[mine])
    mgu, mdown = _master(seed)
    ref = moe_reference(x.double(), mgu.double(), mdown.double(), ids, w.double())[mine]
    assert (y.double() - ref).norm() / ref.norm() < 1e-5


def check_runner_row(comm, seed):
    from moegps.executor.runner import ExecuteConfig, run
    from moegps.results import FIELDS

    for parallel, predictor in (("ep", "previous"), ("tp", "none")):
        cfg = ExecuteConfig(shape="tiny", hidden=H, ffn=F, n_layers=2, max_batches=4, warmup=1, batch_requests=4,
                            parallel=parallel, predictor=predictor, placement="balanced" if parallel == "ep" else
                            "static", extra_slots=1 if parallel == "ep" else 0, window=2, seed=seed)
        row, layers = run(cfg, comm, write=False)
        missing = [f for f in FIELDS if f not in row]
        assert not missing, missing
        for f in ("moe_ms", "dispatch_ms", "expert_ms", "combine_ms", "total_ms", "imbalance", "tokens",
                  "bytes_all_to_all", "migration_ms", "bytes_migrated"):
            assert np.isfinite(row[f]) and row[f] >= 0, (f, row[f])
        assert row["bytes_all_to_all"] > 0 and row["expert_ms"] > 0 and len(layers) == 2
        assert row["device"].endswith(f"x{comm.world}") and row["config.world_size"] == comm.world
        if parallel == "ep":
            assert row["imbalance"] >= 1.0 and np.isfinite(row["predictor_accuracy"])


def check_swapped_block(comm, seed):
    """The generation block with experts split over ranks (replicated tokens + all-reduce) == reference."""
    from moegps.executor.generate import MoEGPSBlock

    gen = torch.Generator().manual_seed(seed)
    router_w = torch.randn(E, H, generator=gen)

    class Router(torch.nn.Module):  # Mixtral's router: softmax, top-k, renormalised
        def forward(self, x):
            logits = x @ router_w.T
            top = torch.softmax(logits, -1).topk(K, dim=-1)
            return logits, top.values / top.values.sum(-1, keepdim=True), top.indices

    block = torch.nn.Module()
    block.gate = Router()
    block.experts = torch.nn.Module()
    mgu, mdown = _master(seed)
    block.experts.gate_up_proj = torch.nn.Parameter(mgu)
    block.experts.down_proj = torch.nn.Parameter(mdown)
    x = torch.randn(2, 5, H, generator=gen)
    y = MoEGPSBlock(block, comm)(x)
    _, w, ids = block.gate(x.reshape(-1, H))
    ref = moe_reference(x.reshape(-1, H).double(), mgu.double(), mdown.double(), ids, w.double())
    assert (y.reshape(-1, H).double() - ref).norm() / ref.norm() < 1e-5


CHECKS = {f.__name__: f for f in (check_random, check_skewed, check_empty_expert_and_rank, check_replicas_even,
                                  check_replicas_proportional, check_tensor_parallel, check_migration,
                                  check_runner_row, check_swapped_block)}
CHECKS_4 = ["check_random", "check_skewed", "check_empty_expert_and_rank", "check_replicas_proportional",
            "check_tensor_parallel", "check_migration", "check_swapped_block"]


def _run_checks(comm, names, seed, out_dir):
    results = {}
    for name in names:
        try:
            CHECKS[name](comm, seed)
            results[name] = None
        except Exception:  # record and go on; a rank stuck in a collective fails by the group's timeout
            results[name] = traceback.format_exc()
    with open(f"{out_dir}/rank{comm.rank}.json", "w") as f:
        json.dump(results, f)


def _results(tmp_path_factory, world, names):
    seed = int(np.random.default_rng().integers(2**31))
    out = tmp_path_factory.mktemp(f"world{world}")
    xdist.spawn(_run_checks, world, names, seed, str(out), timeout_s=20)
    return seed, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _results(tmp_path_factory, 2, list(CHECKS))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _results(tmp_path_factory, 4, CHECKS_4)


def _assert_passed(results, name):
    seed, per_rank = results
    failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(per_rank) if res[name] is not None]
    assert not failures, f"{name} failed (seed {seed}):\n" + "\n".join(failures)


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(world2, name):
    _assert_passed(world2, name)


@pytest.mark.parametrize("name", CHECKS_4)
def test_four_ranks(world4, name):
    _assert_passed(world4, name)


# ---- failures must not hang -----------------------------------------------------------------------

def _one_rank_raises(comm):
    if comm.rank == 1:
        raise RuntimeError("planted failure on rank 1")
    t = torch.ones(4)
    torch.distributed.all_reduce(t)  # rank 1 never joins


def _one_rank_stalls(comm):
    if comm.rank == 1:
        import time
        time.sleep(30)  # alive but absent: only the collective's timeout can end rank 0's wait
    else:
        torch.distributed.all_reduce(torch.ones(4))


def test_raising_rank_fails_the_run_clearly():
    # Which rank's error surfaces first is a race: the planted one, or rank 0's gloo error on
    # losing its peer, whose wording varies (seen: crashing, closed, reset by peer).
    lost_peer = "gloo/transport|remote worker crashing|Connection closed|Connection reset by peer"
    with pytest.raises(mp.ProcessRaisedException, match=f"planted failure on rank 1|{lost_peer}"):
        xdist.spawn(_one_rank_raises, 2, timeout_s=5)


def test_collective_times_out_instead_of_hanging():
    import time

    t0 = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="(?i)timed out|timeout"):
        xdist.spawn(_one_rank_stalls, 2, timeout_s=3)
    assert time.perf_counter() - t0 < 25
