"""The engine on several ranks (gloo, CPU processes) against the one-process engine: expert parallel
under a placement with replicated experts (each rank its own prompts), and tensor parallel."""

import dataclasses

import numpy as np
import pytest
import torch

from moegps.engine import Engine
from moegps.engine.model import random_model
from moegps.engine.parallel import expert_parallel, tensor_parallel
from moegps.executor import dist as xdist
from moegps.placement.placement import Placement
from moegps.shapes import from_name

SHAPE = from_name("mixtral-8x7b").replace(name="tiny", vocab_size=97, n_layers=2, hidden=32, n_heads=4,
                                          n_kv_heads=2, head_dim=8, expert_ffn=24, n_experts=8, top_k=2)


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, SHAPE.vocab_size, size=int(rng.integers(2, 9))).tolist() for _ in range(n)]


def _generate(model, prompts, new=10, stop=()):
    return Engine(model, max_batch=len(prompts), max_len=32).generate(prompts, max_new_tokens=new,
                                                                       stop_tokens=stop).tokens


def _placement(world: int) -> Placement:
    """Two MoE layers of 8 experts on ``world`` ranks, some experts replicated with uneven shares."""
    if world == 2:
        # rank 0 holds experts 0-3 and a replica of expert 5; rank 1 holds 4-7 and a replica of expert 0;
        # the replicas take uneven shares, so both ranks serve experts 0 and 5
        row = np.array([[0, 1, 2, 3, 5], [4, 5, 6, 7, 0]])
        share = np.array([[0.3, 1, 1, 1, 0.6], [1, 0.4, 1, 1, 0.7]])
    else:
        # rank r holds experts 2r and 2r + 1 and a replica of the next rank's first expert (share 0.7
        # of its tokens; the holder keeps 0.3): the even experts are served by two ranks each
        row = np.array([[2 * r, 2 * r + 1, (2 * r + 2) % 8] for r in range(world)])
        share = np.array([[0.3, 1, 0.7] for _ in range(world)])
    swap = [1, 0, *range(2, row.shape[1])]  # the second layer: the first two slots swapped
    return Placement(np.stack([row, row[:, swap]]), n_experts=8, replica_share=np.stack([share, share[:, swap]]),
                     split_rule="fixed")


def _expert_parallel_rank(comm, seed):
    torch.manual_seed(seed)
    model = random_model(SHAPE, device="cpu", dtype=torch.float64, seed=seed)
    placement = _placement(comm.world)
    prompts = _prompts(seed + comm.rank, 3 + comm.rank)  # each rank its own prompts, of its own count
    reference = _generate(model, prompts)
    assert _generate(expert_parallel(model, comm, placement), prompts) == reference
    # a stop token that ends this rank's rows early: the rank keeps stepping with the other, then cuts
    stop = {row[2] for row in reference} if comm.rank == 0 else {-1}
    parallel = _generate(expert_parallel(model, comm, placement), prompts, stop=stop)
    assert parallel == _generate(model, prompts, stop=stop)


def _tensor_parallel_rank(comm, seed):
    # with a shared expert held as two extra experts (Layer.n_shared): split like the routed ones
    model = random_model(SHAPE.replace(shared_ffn=48), device="cpu", dtype=torch.float64, seed=seed)
    assert model.layers[0].n_shared == 2
    prompts = _prompts(seed, 3)  # the same prompts on every rank
    assert _generate(tensor_parallel(model, comm), prompts) == _generate(model, prompts)


@pytest.mark.parametrize("rank_fn,world", [(_expert_parallel_rank, 2), (_tensor_parallel_rank, 2),
                                           (_expert_parallel_rank, 4)])
def test_engine_on_several_ranks_matches_one_process(rank_fn, world):
    seed = int(np.random.default_rng().integers(2**20))
    xdist.spawn(rank_fn, world, seed, timeout_s=60)


def test_expert_parallel_rejects_a_placement_of_another_shape():
    model = random_model(SHAPE, device="cpu", dtype=torch.float64)
    wrong = Placement(np.arange(8).reshape(1, 1, 8).repeat(3, 0), n_experts=8)  # 3 layers, the model has 2
    with pytest.raises(ValueError, match="2 MoE layers, 1 ranks"):
        expert_parallel(model, xdist.Comm(), wrong)


def test_expert_parallel_refuses_a_shared_expert_held_among_the_experts():
    """A shared expert held as extra experts (Layer.n_shared) is outside any placement of the routed
    experts: a clear error, not a model that silently drops it."""
    model = random_model(SHAPE.replace(shared_ffn=48), device="cpu", dtype=torch.float32)
    assert model.layers[0].n_shared == 2
    with pytest.raises(ValueError, match="shared expert among its experts"):
        expert_parallel(model, None, _placement(2))


def _serving_rank(comm, seed):
    """Each rank serves its own share of twelve requests on a fake clock of its own (so the ranks admit at
    different steps and prefill at different times): every greedy answer equals that request alone on the
    one-process model, under continuous, chunked and static batching, and every sampled answer the one it
    gets when one process serves all twelve."""
    from moegps.engine import Sampling
    from moegps.engine.serve import Request, rank_order, serve, serve_on_ranks
    from test_engine_serve import FakeClock

    model = random_model(SHAPE, device="cpu", dtype=torch.float64, seed=seed)
    rng = np.random.default_rng(seed)  # the same requests on every rank
    requests = [Request(rng.integers(1, SHAPE.vocab_size, size=int(rng.integers(1, 10))).tolist(),
                        int(rng.integers(1, 9)), float(rng.uniform(0, 0.05))) for _ in range(12)]
    indices = rank_order(requests, comm.rank, comm.world)
    mine = [requests[i] for i in indices]
    assert len(mine) == 12 // comm.world
    alone = Engine(model, max_batch=1, max_len=32)
    want = [alone.generate([r.prompt], r.max_new_tokens).tokens[0] for r in mine]
    ep = expert_parallel(model, comm, _placement(comm.world))
    tick = 0.001 * (comm.rank + 1)  # each rank's clock runs at its own pace
    for continuous, chunk in ((True, 0), (True, 3), (False, 0)):
        clock = FakeClock(tick)
        served = serve(Engine(ep, max_batch=3, max_len=32), mine, continuous=continuous, chunk=chunk,
                       clock=clock, sleep=clock.sleep)
        assert [s.tokens for s in served] == want, (continuous, chunk)
    # sampled: a request draws as it does on one process (its seed from its index among all the requests)
    sampling = Sampling(temperature=1.0, top_k=5, seed=int(rng.integers(2**20)))
    clock = FakeClock(0.001)
    one_process = serve(Engine(model, max_batch=3, max_len=32), requests, sampling, clock=clock, sleep=clock.sleep)
    clock = FakeClock(tick)
    on_ranks = serve_on_ranks(comm, Engine(ep, max_batch=3, max_len=32), requests, sampling, clock=clock,
                              sleep=clock.sleep)
    assert [s.tokens for s in on_ranks] == [s.tokens for s in one_process]
    assert any(on_ranks[i].tokens != greedy for i, greedy in zip(indices, want))  # drawn, not greedy


def test_expert_parallel_ranks_serve_their_own_requests():
    xdist.spawn(_serving_rank, 2, int(np.random.default_rng().integers(2**20)), timeout_s=120)


def test_serving_refuses_tensor_parallel_ranks():
    from moegps.engine.parallel import serving_comm
    from moegps.executor.layer import TensorParallelMoE

    model = random_model(SHAPE, device="cpu", dtype=torch.float64)
    assert serving_comm(model) is None
    layer = model.layers[0]
    tp = dataclasses.replace(model, layers=[dataclasses.replace(layer, experts=TensorParallelMoE(
        xdist.Comm(), layer.w_gate_up, layer.w_down)), *model.layers[1:]])
    with pytest.raises(ValueError, match="tensor-parallel ranks would have to admit the same requests"):
        serving_comm(tp)


def _serve_command_rank(comm, out):
    """The serving command on two ranks: the placement fitted on held-out questions, every request served
    once and written by the first rank, the process group left to its caller."""
    import csv

    from moegps.engine.serve import main

    argv = ["--requests", "4", "--max-batch", "2", "--max-new-tokens", "3", "--policy", "continuous", "static",
            "--placement", "balanced", "--calibration", "4", "--rate", "100", "--out", out]
    assert main(argv) == 0
    assert torch.distributed.is_initialized()
    if comm.rank == 0:
        with open(out) as f:
            rows = list(csv.DictReader(f))
        assert sorted((r["policy"], r["request"]) for r in rows) == \
            sorted((p, str(i)) for p in ("continuous", "static") for i in range(4))
        assert all(1 <= int(r["new_tokens"]) <= 3 for r in rows)


def test_serve_command_on_two_ranks(tmp_path):
    xdist.spawn(_serve_command_rank, 2, str(tmp_path / "serve.csv"), timeout_s=120)
