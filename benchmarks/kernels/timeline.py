"""Where a wgmma grouped GEMM's time goes, tile by tile, read from the kernel's own clocks.

    python benchmarks/kernels/timeline.py [--shapes deepseek-v2-lite] [--tokens 8192]
                                          [--variant shipped|ht|...] [--routing random balanced]
                                          [--out DIR]

Nsight Compute gives a kernel's averages; it cannot say whether the tensor cores idle between
tiles (epilogue, metadata, the ring's refill) or inside them (waiting for copies). Built with
TIMELINE, wgmma_moe's kernels record, for every tile of every SM's three partitions, the SM's
clock at a few points (wgmma_moe.new_timeline lists the fields). This script runs each GEMM of a
row (the shipped config's, or a wgmma_probe variant's) with the records on, after a warm-up, and
reads them back:

    per tile (median, us)  first stage: from the tile's start to its first full stage
                           K loop: first full stage to the MMAs' end; waits: its waits for the
                           later stages (they overlap the MMAs already issued)
                           epilogue: MMAs' end to the output's store issued
                           between: the store issued to the next tile's start
    share of the launch    each of those summed over every consumer warpgroup, over the launch's
                           span times their number, plus the tail: a warpgroup idle before its
                           first tile and after its last
    producer               its tile start to the metadata read (us, median), its waits for free
                           stages (share)
    MMA floor a tile       the tile's FLOPs over an SM's share of the 8192^3 matmul rate measured
                           in the same run

and each GEMM's time without the records in the same rounds (time_many; the records cost a few
clock reads a K step), and whether its outputs repeat bit for bit, with and without the records.
Clocks become microseconds at the SM clock that the producer's records give (clock cycles over
%globaltimer nanoseconds between its first and last tile). Writes `timeline.json` and a picture of
a few SMs' tiles (`timeline-<row>.png`) into --out. NOTES.md session 18 has what it found.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton

from moegps.kernels import launch, wgmma_moe
from moegps.kernels.bench import ceiling_runs, rates
from moegps.kernels.launch import get_config
from moegps.kernels.timing import make_inputs, make_routing, time_many
from moegps.kernels.tune import expert_dims, shared_columns

CONSUMER_FIELDS = ("tile", "start", "first", "mma_done", "epilogue_done", "waited")
PRODUCER_FIELDS = ("tile", "start", "metadata", "last_copy", "waited", "ns")


def records(timeline: torch.Tensor) -> list[dict]:
    """The launch's records as one dict a program: "consumers" (two lists) and "producer" (a list)
    of field dicts, tiles in the order the partition ran them; programs that ran no tile are left
    out. Refuses a launch whose partitions ran more tiles than the buffer holds."""
    t = timeline.cpu()
    n_slots = t.shape[2]
    out = []
    for prog in t:
        parts = []
        for role, names in ((0, CONSUMER_FIELDS), (1, CONSUMER_FIELDS), (2, PRODUCER_FIELDS)):
            rows = [dict(zip(names, r.tolist())) for r in prog[role] if r[0] >= 0]
            if len(rows) == n_slots:
                raise ValueError(f"a program ran {n_slots}+ tiles: more than wgmma_moe.TIMELINE_TILES holds")
            parts.append(rows)
        if parts[2]:
            out.append({"consumers": parts[:2], "producer": parts[2]})
    return out


def clock_ghz(progs: list[dict]) -> float:
    """Cycles per nanosecond, from the producers' first and last tiles (median over programs)."""
    ratios = [(p["producer"][-1]["start"] - p["producer"][0]["start"])
              / (p["producer"][-1]["ns"] - p["producer"][0]["ns"])
              for p in progs if len(p["producer"]) > 1 and p["producer"][-1]["ns"] > p["producer"][0]["ns"]]
    return statistics.median(ratios)


def summarize(progs: list[dict], ghz: float, mma_floor_us: float, tiles=lambda tile: True) -> dict:
    """Per-tile medians (us) of the tiles `tiles` takes (by tile number: a one-launch config's
    GEMMs apart) and each phase's share of the launch's span over all consumer warpgroups and all
    tiles (see the module docstring): k_loop, first_stage, epilogue, between and tail add up to 1;
    k_waits is the part of k_loop spent waiting for stages."""
    us = 1e-3 / ghz  # us a cycle
    phases = {"first_stage": [], "k_loop": [], "k_waits": [], "epilogue": [], "between": []}
    # the K loop's waits overlap the MMAs already issued: a part of the K loop, not a phase of its own
    totals = dict.fromkeys(["k_loop", "first_stage", "epilogue", "between", "tail", "k_waits"], 0.0)
    # each SM's clock starts anywhere: the span is measured per program, from its producer's first
    # tile to the last epilogue of any program, mapped through that program's clock and timer
    ends_ns = []
    for p in progs:
        base_clock, base_ns = p["producer"][0]["start"], p["producer"][0]["ns"]
        for rows in p["consumers"]:
            if rows:
                ends_ns.append(base_ns + (rows[-1]["epilogue_done"] - base_clock) / ghz)
    starts_ns = [p["producer"][0]["ns"] for p in progs if p["producer"]]
    span_ns = max(ends_ns) - min(starts_ns)
    for p in progs:
        base_clock, base_ns = p["producer"][0]["start"], p["producer"][0]["ns"]
        for rows in p["consumers"]:
            for i, r in enumerate(rows):
                if tiles(r["tile"]):
                    phases["first_stage"].append((r["first"] - r["start"]) * us)
                    phases["k_loop"].append((r["mma_done"] - r["first"]) * us)
                    phases["k_waits"].append(r["waited"] * us)
                    phases["epilogue"].append((r["epilogue_done"] - r["mma_done"]) * us)
                totals["k_loop"] += (r["mma_done"] - r["first"]) * us
                totals["k_waits"] += r["waited"] * us
                totals["first_stage"] += (r["first"] - r["start"]) * us
                totals["epilogue"] += (r["epilogue_done"] - r["mma_done"]) * us
                if i + 1 < len(rows):
                    between = (rows[i + 1]["start"] - r["epilogue_done"]) * us
                    totals["between"] += between
                    if tiles(r["tile"]):
                        phases["between"].append(between)
            if rows:  # before the first tile and after the last: the launch's ramp and tail
                first_ns = base_ns + (rows[0]["start"] - base_clock) / ghz
                last_ns = base_ns + (rows[-1]["epilogue_done"] - base_clock) / ghz
                totals["tail"] += ((first_ns - min(starts_ns)) + (max(ends_ns) - last_ns)) * 1e-3
    n_consumers = sum(1 for p in progs for rows in p["consumers"] if rows)
    producer_meta = [(r["metadata"] - r["start"]) * us for p in progs for r in p["producer"]]
    producer_wait = sum(r["waited"] for p in progs for r in p["producer"]) * us
    return {"span_us": span_ns * 1e-3, "clock_ghz": ghz,
            "tiles_per_sm": statistics.mean(len(p["producer"]) for p in progs),
            "tile_median_us": {k: statistics.median(v) if v else 0.0 for k, v in phases.items()},
            "mma_floor_us": mma_floor_us,
            "share": {k: v / (n_consumers * span_ns * 1e-3) for k, v in totals.items()},
            "producer": {"metadata_us": statistics.median(producer_meta),
                         "waits_share": producer_wait / (len(progs) * span_ns * 1e-3)}}


def plot(progs: list[dict], ghz: float, path: Path, title: str, n_sms: int = 8) -> None:
    """Each of the first n_sms programs' two consumer warpgroups as a row of bars: a tile's first-
    stage wait, its K loop and its epilogue, on the launch's time axis (us)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(p["producer"][0]["ns"] for p in progs if p["producer"])
    fig, ax = plt.subplots(figsize=(12, 0.5 * 2 * n_sms + 1.2))
    colors = {"first stage": "#d62728", "K loop": "#1f77b4", "epilogue": "#ff7f0e"}
    for s, p in enumerate(progs[:n_sms]):
        base_clock, base_ns = p["producer"][0]["start"], p["producer"][0]["ns"]
        at = lambda c: (base_ns + (c - base_clock) / ghz - t0) * 1e-3  # noqa: E731
        for c, rows in enumerate(p["consumers"]):
            y = 2 * s + c
            for r in rows:
                for (a, b), name in (((r["start"], r["first"]), "first stage"),
                                     ((r["first"], r["mma_done"]), "K loop"),
                                     ((r["mma_done"], r["epilogue_done"]), "epilogue")):
                    ax.barh(y, at(b) - at(a), left=at(a), height=0.8, color=colors[name], linewidth=0)
    ax.set_yticks(range(2 * min(n_sms, len(progs))),
                  [f"SM {s} wg {c}" for s in range(min(n_sms, len(progs))) for c in (0, 1)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("us from the launch's first tile")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=v) for v in colors.values()],
              labels=list(colors), loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def differences(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How two outputs differ: elements that are not bit-identical (NaN matching NaN), and the
    largest absolute difference among them."""
    differ = (a != b) & ~(a.isnan() & b.isnan())
    return {"elements": int(differ.sum()),
            "max_abs": float((a.float() - b.float())[differ].abs().max()) if differ.any() else 0.0}


def gemms(x, w13, w2, ids, weights, config: dict) -> tuple[dict, torch.Tensor, int]:
    """{"gate_up": fn(timeline), "down": fn(timeline)}: the wgmma config's two launches on routing
    computed once (timeline None: the records off), or {"gate_up+down": fn} for a one-launch
    config; which rows of their outputs hold a pair; and the gate/up GEMM's tiles (a one launch's
    tiles from there on are the down GEMM's)."""
    top_k = ids.shape[1]
    routing = launch.route(ids.reshape(-1), w13.shape[0], config)
    a, rows_k = launch.gate_up_rows(x, routing, config, top_k)
    if config.get("one_launch"):
        fns = {"gate_up+down": lambda tl=None: wgmma_moe.launch_moe(
            a, w13, w2, weights.reshape(-1), routing, config, rows_k, timeline=tl)}
    else:
        h = wgmma_moe.launch_gate_up(a, w13, routing, config, rows_k)
        fns = {"gate_up": lambda tl=None: wgmma_moe.launch_gate_up(a, w13, routing, config, rows_k,
                                                                    timeline=tl),
               "down": lambda tl=None: wgmma_moe.launch_down(h, w2, weights.reshape(-1), routing,
                                                             config, timeline=tl)}
    # rows of the blocks (past the last block the buffers hold rows no launch writes) that hold a pair
    rows = routing.sorted_pair_ids.numel()
    in_blocks = torch.arange(rows, device=x.device) < routing.block_start[routing.n_blocks]
    n_first = int(routing.n_blocks) * triton.cdiv(w13.shape[1] // 2, config["gate_up"]["block_n"])
    return fns, in_blocks & (routing.sorted_pair_ids < routing.n_pairs), n_first


def main(argv=None) -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from wgmma_probe import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[8192])
    ap.add_argument("--variant", default="shipped", help="'shipped' or a wgmma_probe variant")
    ap.add_argument("--routing", nargs="+", choices=["random", "balanced"], default=["random", "balanced"])
    ap.add_argument("--out", type=Path, default=Path("timeline-out"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "timeline.json"
    results = json.loads(result_path.read_text()) if result_path.exists() else {}
    timeline = wgmma_moe.new_timeline("cuda")
    sms = timeline.shape[0]
    for shape in args.shapes:
        n_experts, hidden, ffn, top_k = expert_dims(shape)
        for n_tokens in args.tokens:
            config = (get_config(n_tokens, n_experts, hidden, ffn, top_k) if args.variant == "shipped"
                      else VARIANTS[args.variant])
            if config["path"] != "wgmma" or config.get("swap"):
                print(f"{shape} {n_tokens}: the config is not wgmma_moe's ({config['path']}); skipped")
                continue
            x, w13, w2 = make_inputs(n_experts, hidden, ffn, top_k, n_tokens)
            for kind in args.routing:
                ids, weights = make_routing(n_tokens, n_experts, top_k, shared=shared_columns(shape),
                                            balanced=kind == "balanced")
                fns, real_rows, n_first = gemms(x, w13, w2, ids, weights, config)
                timed = time_many({**fns, **ceiling_runs()}, graph=list(fns), rep=30)
                per_sm_flops = rates(timed)["matmul_flops"] / sms
                for gemm, fn in fns.items():
                    for _ in range(3):  # warm: compiled, and the L2 in the state time_many left
                        timeline.fill_(-1)
                        out = fn(timeline)
                    torch.cuda.synchronize()
                    # the rows that hold a pair, bit for bit: two launches without the records,
                    # and one with them (they change no result)
                    same = {"repeat": differences(fn()[real_rows], fn()[real_rows]),
                            "records": differences(out[real_rows], fn()[real_rows])}
                    progs = records(timeline)
                    ghz = clock_ghz(progs)
                    row = f"{shape} T={n_tokens} {kind} {gemm}"
                    # (one launch: per-tile medians of each GEMM's tiles, shares of the whole launch)
                    for part in gemm.split("+"):
                        rows_n, k_dim = (2 * ffn, hidden) if part == "gate_up" else (hidden, ffn)
                        tile_n = config[part]["block_n"] * (2 if part == "gate_up" else 1)
                        floor = 2 * config["block_m"] * min(tile_n, rows_n) * k_dim / per_sm_flops * 1e6
                        # a one launch's GEMMs apart (its gate/up tiles first); a launch of its own: all
                        tiles = ({"gate_up": lambda t: t < n_first, "down": lambda t: t >= n_first}[part]
                                 if "+" in gemm else lambda t: True)
                        s = summarize(progs, ghz, floor, tiles=tiles)
                        s["untimed_us"] = timed[gemm]
                        s["differences"] = same
                        results[row if part == gemm else f"{row} ({part} tiles)"] = s
                        print(f"{row}{'' if part == gemm else f' ({part} tiles)'}: {s['untimed_us']:.1f} us "
                              f"without records, span {s['span_us']:.1f} us with, {s['tiles_per_sm']:.1f} "
                              f"tiles an SM at {ghz:.2f} GHz")
                        print(f"  outputs: {same}")
                        print("  per tile (median us): " + ", ".join(f"{k} {v:.2f}" for k, v in s["tile_median_us"].items())
                              + f"; MMA floor {floor:.2f}")
                        print("  share of the span:    " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["share"].items()
                                                                 if k != "k_waits")
                              + f" (K loop's waits {100 * s['share']['k_waits']:.1f}%)")
                        print(f"  producer: metadata read in {s['producer']['metadata_us']:.2f} us, "
                              f"waiting for free stages {100 * s['producer']['waits_share']:.1f}%")
                    plot(progs, ghz, args.out / f"timeline-{shape}-{n_tokens}-{kind}-{gemm.replace('+', '-')}.png", row)
                tmp = result_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(results, indent=1))
                tmp.replace(result_path)
    print(f"wrote {result_path}")


if __name__ == "__main__":
    main()
