"""Vectorised building blocks shared by the placement algorithms: replicate, pack, refine.

Every function works on many independent rows at once (a row is a layer, or a (layer, node) pair
in the hierarchical policy), so a whole model is placed with a few dozen numpy calls instead of a
Python loop per layer. Loads may have a leading phase axis ``P`` (prefill, decode, ...): each
phase is normalised by its own mean GPU load, and the objective of a row is the max over phases
(``objective="max"``) or the weighted sum (``objective="weighted"``) of the phases' imbalances.

The greedy steps follow the description of DeepSeek's EPLB (github.com/deepseek-ai/EPLB):
replicas go one at a time to the expert with the highest load per replica, then replicas are
packed heaviest first onto the lightest GPU with a free slot. Here the packing also avoids two
replicas of one expert on one GPU and is followed by a swap search that only ever lowers the
busiest GPU's load, so the result is never worse than the greedy packing it starts from.
"""

from __future__ import annotations

import numpy as np

TIE = 1e-3  # weight of the busiest GPU's own load in a move's score, after the row objective


def phase_scale(loads: np.ndarray, n_gpus: int) -> np.ndarray:
    """``loads [P, X, E]`` -> ``[P, X, 1]`` the mean GPU load per phase and row (1 where a row is empty)."""
    mean = loads.sum(axis=-1, keepdims=True) / n_gpus
    return np.where(mean > 0, mean, 1.0)


def scalar_key(norm_loads: np.ndarray, phase_weights: np.ndarray, objective: str) -> np.ndarray:
    """``[P, X, n]`` normalised loads -> ``[X, n]`` one number per item for greedy ordering."""
    if objective == "max":
        return norm_loads.max(axis=0)
    if objective == "weighted":
        return np.tensordot(phase_weights, norm_loads, axes=(0, 0))
    raise ValueError(f"objective={objective!r}, expected 'max' or 'weighted'")


def replicate(key: np.ndarray, n_replicas: int, max_per_expert: int) -> np.ndarray:
    """Replica counts ``[X, E]`` (each >= 1, each <= max_per_expert, rows summing to n_replicas).

    ``key [X, E]`` is each expert's load; each extra replica goes to the expert whose load per
    replica is highest, which minimises the largest load per replica (the greedy is exact for
    this objective).
    """
    X, E = key.shape
    n_replicas = min(n_replicas, E * max_per_expert)
    counts = np.ones((X, E), dtype=np.int64)
    rows = np.arange(X)
    for _ in range(n_replicas - E):
        per_replica = np.where(counts < max_per_expert, key / counts, -np.inf)
        counts[rows, per_replica.argmax(axis=1)] += 1
    return counts


def replica_items(counts: np.ndarray) -> np.ndarray:
    """``counts [X, E]`` -> ``item_expert [X, R]``: the expert of each replica (rows have equal R)."""
    X, E = counts.shape
    R = int(counts[0].sum())
    if (counts.sum(axis=1) != R).any():
        raise ValueError("replica counts must sum to the same total in every row")
    flat = np.repeat(np.tile(np.arange(E), X), counts.reshape(-1))
    return flat.reshape(X, R)


def pack_greedy(item_weight: np.ndarray, item_key: np.ndarray, n_packs: int, cap: int, spread: bool = True) -> np.ndarray:
    """Greedy balanced packing with a cardinality cap, heaviest item first onto the lightest pack.

    item_weight: [P, X, n] per-phase weight of each item, already normalised per phase;
    item_key:    [X, n] an id per item (expert id, -1 = an empty filler); two items with the
                 same id >= 0 avoid sharing a pack while another pack with room allows it
                 (``spread=False``: ids are ignored, as in EPLB).
    Returns pack_slots [X, n_packs, cap] int: the item index held by each slot.
    """
    P, X, n = item_weight.shape
    if n != n_packs * cap:
        raise ValueError(f"{n} items do not fill {n_packs} packs of {cap} slots")
    order = np.argsort(-item_weight.max(axis=0), axis=1, kind="stable")
    rows = np.arange(X)
    load = np.zeros((P, X, n_packs))
    fill = np.zeros((X, n_packs), dtype=np.int64)
    slots = np.full((X, n_packs, cap), -1, dtype=np.int64)
    n_keys = int(item_key.max()) + 2
    held = np.zeros((X, n_packs, n_keys), dtype=bool)  # last column: the filler id -1, never blocks
    for j in range(n):
        item = order[:, j]
        w = item_weight[:, rows, item]  # [P, X]
        k = item_key[rows, item]
        cost = (load + w[:, :, None]).max(axis=0) + 1e-9 * load.sum(axis=0)  # [X, packs]
        cost = np.where(fill < cap, cost, np.inf)
        clash = held[rows, :, k] & ((k >= 0) & spread)[:, None]
        alt = np.where(clash, np.inf, cost)
        cost = np.where(np.isfinite(alt).any(axis=1, keepdims=True), alt, cost)
        pack = cost.argmin(axis=1)
        slots[rows, pack, fill[rows, pack]] = item
        fill[rows, pack] += 1
        load[:, rows, pack] += w
        held[rows, pack, k] = True
    return slots


def _row_objective(maxes: np.ndarray, phase_weights: np.ndarray, objective: str) -> np.ndarray:
    """``maxes [P, ...]`` per-phase max normalised GPU load -> objective ``[...]``."""
    if objective == "max":
        return maxes.max(axis=0)
    return np.tensordot(phase_weights, maxes, axes=(0, 0))


def slot_counts(slot_key: np.ndarray, n_experts: int) -> np.ndarray:
    """``slot_key [X, G, S]`` -> ``[X, G, E + 1]`` replicas of each expert on each GPU (last: empty slots)."""
    X, G, S = slot_key.shape
    idx = np.where(slot_key >= 0, slot_key, n_experts) + (n_experts + 1) * np.arange(X * G).reshape(X, G, 1)
    return np.bincount(idx.reshape(-1), minlength=X * G * (n_experts + 1)).reshape(X, G, n_experts + 1)


def row_objective(slot_key: np.ndarray, norm_loads: np.ndarray, phase_weights: np.ndarray, objective: str = "max") -> np.ndarray:
    """``slot_key [X, G, S]``, ``norm_loads [P, X, E]`` -> ``[X]`` objective under an even split."""
    P, X, E = norm_loads.shape
    reps = slot_counts(slot_key, E)[..., :E].sum(1)
    per_rep = np.concatenate([norm_loads / np.maximum(reps, 1), np.zeros((P, X, 1))], -1)
    key = np.where(slot_key >= 0, slot_key, E)
    load = per_rep[:, np.arange(X)[:, None, None], key].sum(-1)  # [P, X, G]
    return _row_objective(load.max(-1), phase_weights, objective)


def local_search(
    slot_key: np.ndarray,
    norm_loads: np.ndarray,
    phase_weights: np.ndarray,
    objective: str = "max",
    budget: np.ndarray | None = None,
    held_before: np.ndarray | None = None,
    rewrites: bool = True,
    max_iters: int | None = None,
    rewrite_candidates: int = 16,
    stop_at: np.ndarray | None = None,
    group_size: int = 1,
    row_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Lower each row's busiest GPU by swaps and replica rewrites while the objective drops.

    slot_key:   [X, G, S] expert id per slot (-1 empty); replicas split their expert evenly.
    norm_loads: [P, X, E] per-phase expert loads, normalised by the phase's mean GPU load.
    Moves: swap a slot of the busiest GPU with a slot of another GPU (2 expert copies); rewrite a
    redundant replica (one of an expert with >= 2) or empty slot, anywhere, into a new replica of
    an expert on the busiest GPU (1 copy); or rewrite a redundant replica on the busiest GPU into
    a replica of any other expert (1 copy; cold experts become fine-grained filler). ``budget [X]`` bounds the copies per row,
    counted against ``held_before [X, G, E]`` (a copy is free where the GPU held that expert
    before). ``stop_at [X]``: a row stops once its objective is at or below this (e.g. a bound
    it cannot beat). ``group_size`` consecutive rows (the nodes of one layer) share one max:
    only the rows at their group's max, in absolute units ``row_scale [X]`` (the row's
    normalising mean), are worked on, and a group is done when its busiest row is stuck.
    Returns the new slot_key [X, G, S]. Never raises a row's objective.
    """
    slot_key = slot_key.copy()
    P, X, E = norm_loads.shape
    _, G, S = slot_key.shape
    if G < 2:
        return slot_key
    if held_before is None:
        held_before = slot_counts(slot_key, E)[..., :E] > 0
    spent = np.zeros(X)
    limit = np.full(X, np.inf) if budget is None else np.asarray(budget, dtype=float)
    max_iters = 4 * G * S if max_iters is None else max_iters
    stop = np.full(X, -np.inf) if stop_at is None else np.asarray(stop_at, dtype=float) * (1 + 1e-9)
    active = np.arange(X)
    ar_g = np.arange(G)
    if group_size > 1:
        scale = np.ones(X) if row_scale is None else np.asarray(row_scale, dtype=float)
        level = row_objective(slot_key, norm_loads, phase_weights, objective) * scale  # absolute, [X]
        alive = np.ones(X, dtype=bool)
    for _ in range(max_iters):
        active = active[spent[active] < limit[active]]
        if group_size > 1:  # work only on each group's busiest rows; a stuck busiest row ends its group
            top = level.reshape(-1, group_size).max(-1).repeat(group_size)
            at_top = level >= top * (1 - 1e-12)
            group_alive = (at_top & alive).reshape(-1, group_size).any(-1).repeat(group_size)
            stuck_top = (at_top & ~alive).reshape(-1, group_size).any(-1).repeat(group_size)
            active = np.flatnonzero(alive & at_top & group_alive & ~stuck_top)
            active = active[spent[active] < limit[active]]
        if active.size == 0:
            break
        sk = slot_key[active]
        nl = norm_loads[:, active]
        A = active.size
        ra = np.arange(A)
        cnt = slot_counts(sk, E)  # [A, G, E+1]
        reps = cnt[..., :E].sum(1)  # [A, E]
        per_rep = np.concatenate([nl / np.maximum(reps, 1), np.zeros((P, A, 1))], axis=-1)  # [P, A, E+1]
        key = np.where(sk >= 0, sk, E)
        sw = per_rep[:, ra[:, None, None], key]  # [P, A, G, S]
        load = sw.sum(-1)  # [P, A, G]
        obj_now = _row_objective(load.max(-1), phase_weights, objective)
        busiest = load.max(0).argmax(-1)
        kh = key[ra, busiest]  # [A, S]
        room = limit[active] - spent[active]
        held = held_before[active]  # [A, G, E]

        # swaps between the busiest GPU (slot a) and GPU g (slot b)
        top = np.argsort(-load, axis=-1)[..., :3]
        top_val = np.take_along_axis(load, top, axis=-1)
        excl = (top[..., None, :] == busiest[None, :, None, None]) | (top[..., None, :] == ar_g[None, None, :, None])
        rest = np.where(excl, -np.inf, top_val[..., None, :]).max(-1)  # [P, A, G]
        wh = sw[:, ra, busiest]  # [P, A, S]
        delta = wh[:, :, None, :, None] - sw[:, :, :, None, :]  # [P, A, G, Sa, Sb]
        new_max = np.maximum(np.maximum(load[:, ra, busiest][:, :, None, None, None] - delta,
                                        load[:, :, :, None, None] + delta), rest[..., None, None])
        obj_swap = _row_objective(new_max, phase_weights, objective)  # [A, G, Sa, Sb]
        ka = kh[:, None, :, None]
        kb = key[:, :, None, :]
        gi = ar_g[None, :, None]
        a_on_g = cnt[ra[:, None, None], gi, kh[:, None, :]]  # [A, G, Sa] copies of a's expert on g
        b_on_h = cnt[ra[:, None, None], busiest[:, None, None], key]  # [A, G, Sb] copies of b's expert on h
        ok = ((ka == E) | (a_on_g[..., None] == 0)) & ((kb == E) | (b_on_h[:, :, None, :] == 0)) & (ka != kb)
        ok &= ar_g[None, :, None, None] != busiest[:, None, None, None]
        held_or_empty = np.concatenate([held, np.ones((A, G, 1), bool)], -1)  # [A, G, E+1]: no copy needed
        cost_swap = ((~held_or_empty[ra[:, None, None], gi, kh[:, None, :]])[..., None].astype(float)
                     + (~held_or_empty[ra[:, None, None], busiest[:, None, None], key])[:, :, None, :])
        ok &= cost_swap <= room[:, None, None, None]
        # the busiest GPU must get lighter without the row's objective rising: a lexicographic
        # descent, so ties between several equally busy GPUs are worked off one by one
        h_now = _row_objective(load[:, ra, busiest], phase_weights, objective)  # [A]
        local = _row_objective(np.maximum(load[:, ra, busiest][:, :, None, None, None] - delta,
                                          load[:, :, :, None, None] + delta), phase_weights, objective)
        ok &= (obj_swap <= obj_now[:, None, None, None] * (1 + 1e-12)) & (local < h_now[:, None, None, None] * (1 - 1e-12))
        score_now = obj_now + TIE * h_now
        obj_swap = np.where(ok, obj_swap + TIE * local, np.inf).reshape(A, -1)
        best_swap = obj_swap.argmin(1)
        gain_swap = score_now - obj_swap[ra, best_swap]
        per_cost_swap = gain_swap / np.maximum(cost_swap.reshape(A, -1)[ra, best_swap], 1)

        gain_rw = np.full(A, -np.inf)
        per_cost_rw = np.full(A, -np.inf)
        if rewrites:
            # candidates (slot to rewrite, expert it gets), two families:
            # 1. a cold redundant replica (or empty slot) anywhere -> a new replica of an expert on h;
            # 2. a redundant replica on h itself -> a replica of any expert (cold fillers included).
            redundant = (key == E) | (reps[ra[:, None, None], np.minimum(key, E - 1)] >= 2)  # [A, G, S]
            # rank family 1 by what the expert's other replicas would carry once this one is gone
            after = np.concatenate([nl / np.maximum(reps - 1, 1), np.zeros((P, A, 1))], -1).max(0)  # [A, E+1]
            coldness = np.where(redundant, after[ra[:, None, None], key], np.inf).reshape(A, -1)
            K = min(rewrite_candidates, G * S)
            cand = np.argpartition(coldness, K - 1, axis=1)[:, :K] if K < G * S else np.tile(np.arange(G * S), (A, 1))
            g1, j1 = np.divmod(cand, S)  # [A, K]
            ok1 = np.isfinite(coldness[ra[:, None], cand])
            M = min(rewrite_candidates, E)  # family 2 offers the M experts lightest per replica
            light = per_rep[:, :, :E].max(0)
            fillers = np.argpartition(light, M - 1, axis=1)[:, :M] if M < E else np.tile(np.arange(E), (A, 1))
            g0 = np.concatenate([np.repeat(g1, S, 1), np.repeat(busiest[:, None], S * M, 1)], 1)  # [A, C]
            j0 = np.concatenate([np.repeat(j1, S, 1), np.repeat(np.tile(np.arange(S), (A, 1)), M, 1)], 1)
            yc = np.concatenate([np.tile(kh, (1, K)), np.tile(fillers, (1, S))], 1)
            cand_ok = np.concatenate([np.repeat(ok1, S, 1),
                                      np.repeat(redundant[ra, busiest] & (kh < E), M, 1)], 1) & (yc < E)
            x = key[ra[:, None], g0, j0]  # [A, C]
            reps_ext = np.concatenate([reps, np.full((A, 1), 2)], -1)  # an empty slot: as if 2 copies of nothing
            cx = reps_ext[ra[:, None], x]
            cy = reps_ext[ra[:, None], np.minimum(yc, E)]
            nl_ext = np.concatenate([nl, np.zeros((P, A, 1))], -1)
            nlx = nl_ext[:, ra[:, None], x]  # [P, A, C]
            nly = nl_ext[:, ra[:, None], yc]
            dx = nlx / np.maximum(cx - 1, 1) - nlx / cx  # each other replica of x gets heavier
            dy = nly / (cy + 1) - nly / cy  # each replica of y gets lighter
            cnt_t = cnt.transpose(0, 2, 1)  # [A, E+1, G]
            at_g0 = ar_g[None, None, :] == g0[:, :, None]  # [A, C, G]
            shift = nly / (cy + 1) - nlx / np.maximum(cx - 1, 1)
            new = (load[:, :, None, :] + cnt_t[ra[:, None], x][None] * dx[..., None]
                   + cnt_t[ra[:, None], yc][None] * dy[..., None] + at_g0[None] * shift[..., None])  # [P, A, C, G]
            obj_rw = _row_objective(new.max(-1), phase_weights, objective)  # [A, C]
            y_on_g0 = cnt[ra[:, None], g0, yc]
            okr = cand_ok & (x != yc) & (y_on_g0 == 0)
            cost_rw = (~held[ra[:, None], g0, np.minimum(yc, E - 1)]).astype(float)
            okr &= cost_rw <= room[:, None]
            h_load = np.take_along_axis(new, np.broadcast_to(busiest[None, :, None, None], new.shape[:-1] + (1,)), -1)
            h_new = _row_objective(h_load[..., 0], phase_weights, objective)  # [A, C]
            okr &= (obj_rw <= obj_now[:, None] * (1 + 1e-12)) & (h_new < h_now[:, None] * (1 - 1e-12))
            obj_rw = np.where(okr, obj_rw + TIE * h_new, np.inf)
            best_rw = obj_rw.argmin(1)
            gain_rw = score_now - obj_rw[ra, best_rw]
            per_cost_rw = gain_rw / np.maximum(cost_rw[ra, best_rw], 1)

        eps = 1e-12 * np.maximum(obj_now, 1e-300)
        if budget is None:
            use_rw = gain_rw > gain_swap
        else:
            use_rw = per_cost_rw > per_cost_swap
        gain = np.where(use_rw, gain_rw, gain_swap)
        improve = (gain > eps) & (obj_now > stop[active])
        if not improve.any():
            break
        for sel, is_rw in ((ra[improve & ~use_rw], False), (ra[improve & use_rw], True)):
            if sel.size == 0:
                continue
            rows = active[sel]
            h = busiest[sel]
            if is_rw:
                g, j, yv = g0[sel, best_rw[sel]], j0[sel, best_rw[sel]], yc[sel, best_rw[sel]]
                spent[rows] += ~held_before[rows, g, yv]
                slot_key[rows, g, j] = yv
            else:
                g, a, b = np.unravel_index(best_swap[sel], (G, S, S))
                va, vb = slot_key[rows, h, a].copy(), slot_key[rows, g, b].copy()
                spent[rows] += ((va >= 0) & ~held_before[rows, g, np.maximum(va, 0)])
                spent[rows] += ((vb >= 0) & ~held_before[rows, h, np.maximum(vb, 0)])
                slot_key[rows, h, a], slot_key[rows, g, b] = vb, va
        if group_size > 1:
            alive[active[~improve]] = False
            level[active[improve]] = row_objective(slot_key[active[improve]], norm_loads[:, active[improve]],
                                                   phase_weights, objective) * scale[active[improve]]
        else:
            active = active[improve]
    return slot_key


def balance_rows(
    loads: np.ndarray,
    n_packs: int,
    slots_per_pack: int,
    phase_weights: np.ndarray | None = None,
    objective: str = "max",
    max_per_expert: int | None = None,
    refine: bool = True,
    rows_per_layer: int = 1,
    both_starts: bool = True,
    restarts: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Replicate and pack every row: ``loads [P, X, E]`` -> ``slot_expert [X, n_packs, slots_per_pack]``.

    All slots are filled (extra slots hold extra replicas; -1 only if there are more slots than
    ``E * max_per_expert``). Replicas split their expert's load evenly. ``rows_per_layer``
    consecutive rows (the nodes of one layer) share one layer's max: the swap search stops on a
    row once it is below the lowest max the layer's rows can reach (single-phase loads).
    ``both_starts``: search from two greedy packings (replicas spread over GPUs, and EPLB's plain
    greedy that may put two replicas of an expert on one GPU) and keep the better per row.
    ``restarts``: further starts whose replica counts come from loads perturbed by lognormal
    noise (sigma 0.3, ``seed``): the greedy counts minimise the largest replica, which is not
    always what packs best into few slots per GPU.
    """
    loads = np.asarray(loads, dtype=np.float64)
    P, X, E = loads.shape
    n_slots = n_packs * slots_per_pack
    if n_slots < E:
        raise ValueError(f"{E} experts do not fit in {n_packs} GPUs x {slots_per_pack} slots")
    phase_weights = np.full(P, 1.0 / P) if phase_weights is None else np.asarray(phase_weights, float)
    max_per_expert = n_packs if max_per_expert is None else max_per_expert
    norm = loads / phase_scale(loads, n_packs)
    key = scalar_key(norm, phase_weights, objective)
    # starts: (replica counts, spread?) pairs; restarts perturb the loads that decide the counts
    noise = np.random.default_rng(seed).lognormal(0.0, 0.3, size=(restarts, X, E))
    count_sets = [replicate(key, n_slots, max_per_expert)]
    count_sets += [replicate(key * noise[r], n_slots, max_per_expert) for r in range(restarts)]
    starts = [(0, True)] + [(r + 1, True) for r in range(restarts)]
    if both_starts:  # EPLB's own start: counts without a per-GPU cap, plain greedy packing
        count_sets.append(replicate(key, n_slots, n_slots))
        starts.append((len(count_sets) - 1, False))
    keys = []
    rows = np.arange(X)[:, None]
    for c_index, spread in starts:
        counts = count_sets[c_index]
        item_expert = replica_items(counts)  # [X, R]
        R = item_expert.shape[1]
        if R < n_slots:  # pad with empty fillers
            item_expert = np.concatenate([item_expert, np.full((X, n_slots - R), -1)], axis=1)
        e = np.maximum(item_expert, 0)
        item_weight = np.where(item_expert >= 0, norm[:, rows, e] / counts[rows, e], 0.0)  # [P, X, n]
        slots = pack_greedy(item_weight, item_expert, n_packs, slots_per_pack, spread=spread)  # [X, G, S]
        keys.append(item_expert[rows[:, :, None], slots])
    n_starts = len(starts)
    slot_key = np.concatenate(keys)
    all_norm = np.tile(norm, (1, n_starts, 1))
    if refine:
        stop_at = None
        if P == 1:  # what no placement of these slots can beat, in absolute units per layer
            scale = phase_scale(loads, n_packs)[0, :, 0]  # [X]
            lowest = np.maximum(1.0, (norm[0] / count_sets[0]).max(-1)) * scale
            layer_lowest = lowest.reshape(-1, rows_per_layer).max(-1).repeat(rows_per_layer)
            stop_at = np.tile(layer_lowest / scale, n_starts)
        slot_key = local_search(slot_key, all_norm, phase_weights, objective, rewrites=max_per_expert > 1,
                                stop_at=stop_at, group_size=rows_per_layer,
                                row_scale=np.tile(phase_scale(loads, n_packs).max(0)[:, 0], n_starts))
    if n_starts > 1:
        obj = row_objective(slot_key, all_norm, phase_weights, objective).reshape(n_starts, X)
        slot_key = slot_key.reshape(n_starts, X, n_packs, slots_per_pack)[obj.argmin(0), np.arange(X)]
    return slot_key
