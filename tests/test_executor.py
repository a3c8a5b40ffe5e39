"""Executor pieces in one process: split rule, migration plan, one-rank layer, runner row, CLI."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from moegps.executor import dist as xdist
from moegps.executor.layer import (ExpertParallelMoE, choose_slots, expert_compute, expert_weights, moe_reference,
                                   replica_tables, slot_weights)
from moegps.executor.replace import Move, plan_moves
from moegps.paths import PROJECT_ROOT
from moegps.placement import Placement
from moegps.results import FIELDS


def _brute_force_split(ids, table, share):
    """Replica of each assignment by the split rule, one assignment at a time (the independent reference)."""
    flat, fshare = table.reshape(-1), share.reshape(-1)
    seen, out = {}, []
    n = {e: int((ids == e).sum()) for e in np.unique(ids)}
    for e in ids.reshape(-1):
        i = seen.get(e, 0)
        seen[e] = i + 1
        reps = np.flatnonzero(flat == e)
        frac, acc = (i + 0.5) / n[e], 0.0
        chosen = reps[-1]
        for p in reps:
            acc += fshare[p]
            if frac < acc:
                chosen = p
                break
        out.append(chosen)
    return np.array(out).reshape(ids.shape)


def test_split_rule_matches_brute_force(rng):
    E, G, S = 6, 3, 4
    table = rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, G * S - E)])).reshape(G, S)
    p = Placement(table[None], E)
    share = p.replica_share[0].copy()
    for e in range(E):  # random uneven shares per expert, sometimes a zero share
        where = np.argwhere(table == e)
        s = rng.dirichlet(np.ones(len(where)))
        if len(where) > 1 and rng.random() < 0.5:
            s[rng.integers(len(where))] = 0
            s /= s.sum()
        share[tuple(where.T)] = s
    ids = np.stack([rng.choice(E, 2, replace=False) for _ in range(50)])
    phys, cum, count = (torch.as_tensor(a) for a in replica_tables(table, share, E))
    got = choose_slots(torch.as_tensor(ids), phys, cum, count).numpy()
    assert np.array_equal(got, _brute_force_split(ids, table, share))
    assert np.array_equal(table.reshape(-1)[got], ids)  # every assignment lands on a slot holding its expert


def test_plan_moves_hand_built():
    old = np.array([[0, 1, 2], [3, 4, -1]])
    new = np.array([[0, 4, 2], [3, 4, 0]])  # GPU0 slot1 <- expert 4 (remote), GPU1 slot2 <- expert 0 (remote)
    assert plan_moves(old, new) == [Move(0, 1, 4, 1, 1), Move(1, 2, 0, 0, 0)]
    local = np.array([[0, 1, 2], [3, 4, 3]])  # GPU1 slot2 <- expert 3, already on GPU1: a local copy
    assert plan_moves(old, local) == [Move(1, 2, 3, 1, 0)]
    assert plan_moves(old, old) == []
    with pytest.raises(ValueError, match="no slot holds it"):
        plan_moves(np.array([[0, 1]]), np.array([[0, 5]]))


def test_one_rank_layer_with_replicas_equals_reference(rng):
    H, F, E, T = 16, 24, 5, 17
    seed = int(rng.integers(1 << 30))
    table = np.array([[3, 0, 1, 4, 2, 0, 3]])  # experts 0 and 3 twice, on one GPU
    p = Placement(table[None], E)
    gu, down = slot_weights(table[0], 0, H, F, seed=seed)
    layer = ExpertParallelMoE(xdist.Comm(), table, p.replica_share[0], E, gu, down)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=gen)
    master = [expert_weights(0, e, H, F, seed=seed) for e in range(E)]
    ref = moe_reference(x.double(), torch.stack([m[0] for m in master]).double(),
                        torch.stack([m[1] for m in master]).double(), ids, w.double())
    y = layer(x, ids, w)
    assert (y.double() - ref).norm() / ref.norm() < 1e-5


def test_expert_compute_drops_padding_columns(rng):
    H, F, S, N = 8, 12, 3, 6
    gu, down = torch.randn(S, 2 * F, H, dtype=torch.float64), torch.randn(S, H, F, dtype=torch.float64)
    x = torch.randn(N, H, dtype=torch.float64)
    slots = torch.as_tensor(rng.integers(-1, S, (N, 2)))
    w = torch.rand(N, 2, dtype=torch.float64)
    want = torch.zeros(N, H, dtype=torch.float64)
    for t in range(N):  # brute force: every valid (token, slot) pair by hand
        for j in range(2):
            s = int(slots[t, j])
            if s >= 0:
                g, u = gu[s, :F] @ x[t], gu[s, F:] @ x[t]
                want[t] += w[t, j] * (down[s] @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(expert_compute(x, gu, down, slots, w), want, rtol=1e-10, atol=1e-12)


def test_runner_one_rank_row_and_files(tmp_path):
    from moegps.executor.runner import ExecuteConfig, run

    cfg = ExecuteConfig(shape="tiny", hidden=32, ffn=48, max_batches=4, warmup=1, batch_requests=3,
                        predictor="oracle", placement="balanced", extra_slots=2, window=2, out=str(tmp_path))
    row, layers = run(cfg)
    assert set(FIELDS) <= set(row)
    assert row["backend"] == "exec" and row["tokens"] == 12 and row["config.placement"] == "balanced"
    assert row["moe_ms"] > 0 and row["bytes_all_to_all"] == 0 and row["migration_ms"] >= 0
    assert row["predictor_accuracy"] == pytest.approx(1.0)  # the oracle knows the next window
    table = pd.read_parquet(next((tmp_path / "rows").glob("*.parquet")))
    assert table.loc[0, "run_id"] == row["run_id"]
    side = pd.read_parquet(next((tmp_path / "layers").glob("*.parquet")))
    assert list(side["layer"]) == [0, 1] and (side["run_id"] == row["run_id"]).all()
    assert (tmp_path / "config" / f"{row['run_id']}.json").exists()


def test_runner_rejects_mismatched_trace(tmp_path, rng):
    from moegps.executor.runner import ExecuteConfig, run
    from moegps.workloads import random_trace

    path = tmp_path / "t.parquet"
    random_trace(rng, n_experts=4, top_k=2).write(path)
    with pytest.raises(ValueError, match="n_experts=4"):
        run(ExecuteConfig(trace=str(path), shape="tiny", out=str(tmp_path)))


def test_cli_writes_row(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "moegps.executor", "shape=tiny", "hidden=16", "ffn=16", "max_batches=2",
         "warmup=1", "batch_requests=2", "placement=balanced", "extra_slots=1", "predictor=last_batch", "window=1",
         f"out={tmp_path}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "moe_ms=" in out.stdout
    assert len(list((tmp_path / "rows").glob("*.parquet"))) == 1
    assert list((tmp_path / "hydra").rglob("config.yaml"))  # the resolved config beside the outputs
    row = pd.read_parquet(next((tmp_path / "rows").glob("*.parquet")))
    assert row.loc[0, "config.placement"] == "balanced" and row.loc[0, "config.predictor"] == "last_batch"
