"""The residual norm + router at decode sizes on a GPU: the fused one-launch kernel, a token's router
in one program or split over programs of n experts, against add_rmsnorm + router_topk, per router shape
(why ROUTER_EXPERTS_PER_PROGRAM in moegps/engine/kernels.py).

    PYTHONPATH=. python benchmarks/engine/router_probe.py

Each number is the median of 10 replays of a CUDA graph of 20 back-to-back calls (so the router's
weights sit in L2: inside a decode step, where they do not, both are slower). Floor: the bytes one
call must read and write (router weights, residual, delta, normed output) over the copy rate
measured here; every path is far from it (a few programs a token or one per 16 tokens: latency-bound).
"""

import functools
import statistics

import torch

from moegps.engine import kernels as K
from moegps.executor.generate import copy_bandwidth

SHAPES = {"mixtral (8 x 4096, top-2)": (4096, 8, 2), "deepseek-v2-lite (64 x 2048, top-6)": (2048, 64, 6)}


def graph_us(fn, calls: int = 20, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[reps // 2]


def print_ranking(times: list[tuple[dict, float]], defaults: dict, top: int = 5) -> None:
    """The ``top`` launch settings by the geometric mean of their times (``(setting, us)`` pairs over the
    shapes and batches swept), each as a share of ``defaults``' mean when those were swept: one setting for all."""
    by_setting: dict[str, list[float]] = {}
    for setting, us in times:
        by_setting.setdefault(str(setting), []).append(us)
    ranked = sorted(by_setting.items(), key=lambda kv: statistics.geometric_mean(kv[1]))
    base = statistics.geometric_mean(by_setting[str(defaults)]) if str(defaults) in by_setting else None
    for setting, us in ranked[:top]:
        gm = statistics.geometric_mean(us)
        print(f"geomean {gm:.2f} us{f' ({gm / base:.3f} of the defaults)' if base else ''}: {setting}")


def two_launches(resid, delta, norm_w, eps, router, top_k, renormalize):
    return K.router_topk(K.add_rmsnorm(resid, delta, norm_w, eps), router, top_k, renormalize)


def main() -> None:
    rate = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {rate / 1e12:.2f} TB/s")
    print("| router | tokens | experts a program | fused us | add_rmsnorm + router_topk us | floor us | fused / two launches |")
    print("|---|---|---|---|---|---|---|")
    for name, (H, E, k) in SHAPES.items():
        for T in (1, 8, 32, 128):
            resid = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            delta = torch.randn_like(resid)
            norm_w = torch.ones(H, device="cuda", dtype=torch.bfloat16)
            router = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
            args = (resid, delta, norm_w, 1e-6, router, k, True)
            two = graph_us(functools.partial(two_launches, *args))
            floor = (E * H + 4 * T * H) * 2 / rate * 1e6
            per_program = E
            while per_program >= 2:
                fused = graph_us(functools.partial(K._add_rmsnorm_router_fused, *args, experts_per_program=per_program))
                print(f"| {name} | {T} | {per_program} | {fused:.2f} | {two:.2f} | {floor:.3f} | {fused / two:.2f} |",
                      flush=True)
                per_program //= 2


if __name__ == "__main__":
    main()
