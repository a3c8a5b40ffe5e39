"""Exact optimum for small instances, as a yardstick for the heuristics (scipy's MILP, HiGHS).

Two models, solved layer by layer:

- ``split="free"``: the best placement *and* the best split of each expert's tokens among its
  replicas (shares are continuous), i.e. the lowest imbalance any placement with these slots can
  reach. Variables: x[e, g] (a replica of e on g, binary), y[e, g] (e's share on g), t.
- ``split="even"``: replicas split evenly (EPLB's assumption). Variables: c[e, k] (e has k
  replicas) and u[e, g, k] (e has k replicas, one on g), both binary; GPU g's load is
  sum_{e,k} w_e / k * u[e, g, k].

Phases: ``loads [phase, layer, expert]``; each phase's GPU loads are divided by its mean, and
the objective is the max over phases (``objective="max"``) or the weighted sum of per-phase maxima.
At most one replica of an expert per GPU.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .placement import Placement


def optimal(
    loads: np.ndarray,
    n_gpus: int,
    slots_per_gpu: int,
    split: str = "free",
    phase_weights: np.ndarray | None = None,
    objective: str = "max",
    time_limit: float = 30.0,
) -> tuple[Placement, np.ndarray]:
    """``loads [layer, expert]`` or ``[phase, layer, expert]`` -> (Placement, objective [layer]).

    The objective is the layer's imbalance (max/mean GPU load; with phases, their max or weighted
    sum). ``time_limit`` seconds per layer; if HiGHS stops early the incumbent is returned (its
    objective is then an upper bound, not the optimum).
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim == 2:
        loads = loads[None]
    P, L, E = loads.shape
    if n_gpus * slots_per_gpu < E:
        raise ValueError(f"{E} experts do not fit in {n_gpus} GPUs x {slots_per_gpu} slots")
    pw = np.full(P, 1.0 / P) if phase_weights is None else np.asarray(phase_weights, dtype=float)
    slot_expert = np.full((L, n_gpus, slots_per_gpu), -1, dtype=np.int32)
    share = np.zeros((L, n_gpus, slots_per_gpu))
    best = np.zeros(L)
    for layer in range(L):
        mean = loads[:, layer].sum(-1) / n_gpus
        norm = loads[:, layer] / np.where(mean > 0, mean, 1.0)[:, None]  # [P, E]
        solve = _solve_free if split == "free" else _solve_even if split == "even" else None
        if solve is None:
            raise ValueError(f"split={split!r}, expected 'free' or 'even'")
        on_gpu, best[layer] = solve(norm, n_gpus, slots_per_gpu, pw, objective, time_limit)  # on_gpu [E, G] shares
        for g in range(n_gpus):
            held = np.flatnonzero(on_gpu[:, g] > 0.5 / (n_gpus * 4) if split == "even" else on_gpu[:, g] > 1e-9)
            slot_expert[layer, g, : held.size] = held
            share[layer, g, : held.size] = on_gpu[held, g]
    return Placement(slot_expert, E, share, split_rule=f"optimal_{split}"), best


def _objective_rows(n_vars: int, P: int, objective: str, pw: np.ndarray):
    """Cost vector for the t variables appended after n_vars: one t (max) or one per phase."""
    n_t = 1 if objective == "max" else P
    c = np.zeros(n_vars + n_t)
    c[n_vars:] = 1.0 if objective == "max" else pw
    return c, n_t


def _solve_free(norm, G, S, pw, objective, time_limit):
    P, E = norm.shape
    nx = E * G
    c, n_t = _objective_rows(2 * nx, P, objective, pw)
    X = lambda e, g: e * G + g  # noqa: E731
    Y = lambda e, g: nx + e * G + g  # noqa: E731
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for e in range(E):  # shares of e sum to 1
        for g in range(G):
            rows.append(r); cols.append(Y(e, g)); vals.append(1.0)
        lo.append(1.0); hi.append(1.0); r += 1
    for e in range(E):  # share only where a replica sits
        for g in range(G):
            rows += [r, r]; cols += [Y(e, g), X(e, g)]; vals += [1.0, -1.0]
            lo.append(-np.inf); hi.append(0.0); r += 1
    for g in range(G):  # slots per GPU
        for e in range(E):
            rows.append(r); cols.append(X(e, g)); vals.append(1.0)
        lo.append(-np.inf); hi.append(S); r += 1
    for p in range(P):  # normalised load <= t
        for g in range(G):
            for e in range(E):
                rows.append(r); cols.append(Y(e, g)); vals.append(norm[p, e])
            rows.append(r); cols.append(2 * nx + (0 if objective == "max" else p)); vals.append(-1.0)
            lo.append(-np.inf); hi.append(0.0); r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, c.size))
    integrality = np.r_[np.ones(nx), np.zeros(nx + n_t)]
    ub = np.r_[np.ones(2 * nx), np.full(n_t, np.inf)]
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(c.size), ub), options={"time_limit": time_limit})
    if res.x is None:
        raise RuntimeError(f"MILP found no placement: {res.message}")
    y = res.x[nx: 2 * nx].reshape(E, G)
    # a share counts only where the solver placed a replica (x = 1): HiGHS leaves shares of ~1e-7 on
    # GPUs whose x is zero within its integrality tolerance, which overfilled a GPU's slots
    held = res.x[:nx].reshape(E, G) > 0.5
    y = np.where(held & (y > 1e-9), y, 0.0)
    return y / y.sum(1, keepdims=True), float(res.fun)


def _solve_even(norm, G, S, pw, objective, time_limit):
    P, E = norm.shape
    K = max(1, min(G, G * S - E + 1))
    nu = E * G * K
    nc = E * K
    c, n_t = _objective_rows(nu + nc, P, objective, pw)
    U = lambda e, g, k: (e * G + g) * K + (k - 1)  # noqa: E731
    C = lambda e, k: nu + e * K + (k - 1)  # noqa: E731
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for e in range(E):  # exactly one replica count per expert
        for k in range(1, K + 1):
            rows.append(r); cols.append(C(e, k)); vals.append(1.0)
        lo.append(1.0); hi.append(1.0); r += 1
    for e in range(E):  # k replicas placed when count is k
        for k in range(1, K + 1):
            for g in range(G):
                rows.append(r); cols.append(U(e, g, k)); vals.append(1.0)
            rows.append(r); cols.append(C(e, k)); vals.append(-float(k))
            lo.append(0.0); hi.append(0.0); r += 1
    for g in range(G):  # slots per GPU; at most one replica of e per GPU
        for e in range(E):
            for k in range(1, K + 1):
                rows.append(r); cols.append(U(e, g, k)); vals.append(1.0)
        lo.append(-np.inf); hi.append(S); r += 1
        for e in range(E):
            for k in range(1, K + 1):
                rows.append(r); cols.append(U(e, g, k)); vals.append(1.0)
            lo.append(-np.inf); hi.append(1.0); r += 1
    for p in range(P):
        for g in range(G):
            for e in range(E):
                for k in range(1, K + 1):
                    rows.append(r); cols.append(U(e, g, k)); vals.append(norm[p, e] / k)
            rows.append(r); cols.append(nu + nc + (0 if objective == "max" else p)); vals.append(-1.0)
            lo.append(-np.inf); hi.append(0.0); r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, c.size))
    integrality = np.r_[np.ones(nu + nc), np.zeros(n_t)]
    ub = np.r_[np.ones(nu + nc), np.full(n_t, np.inf)]
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(c.size), ub), options={"time_limit": time_limit})
    if res.x is None:
        raise RuntimeError(f"MILP found no placement: {res.message}")
    u = res.x[:nu].reshape(E, G, K) > 0.5
    on = u.any(-1)
    reps = np.maximum(on.sum(1, keepdims=True), 1)
    return np.where(on, 1.0 / reps, 0.0), float(res.fun)
