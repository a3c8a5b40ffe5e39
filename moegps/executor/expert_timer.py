"""The simulator's expert part measured instead of modelled: each GPU's share of a layer run through
moegps's kernels (``python -m moegps.simulator expert_time=kernels``).

The simulator's expert part is a roofline (``cost.expert_time``) calibrated to whole MoE calls on
balanced routing. A placement changes what it is asked about: how many experts a GPU holds, how
uneven their rows are, a replica's share of an expert. ``KernelExpertTimer`` answers that with the
kernels themselves, on the one GPU at hand: for every (step, GPU) of a replay it builds the rows
that GPU computes (``per_gpu [S, G, E]`` from ``cost.route_tokens``), runs them through the expert
kernel the executor runs (``executor.layer.expert_compute``'s: ``moegps.kernels.fused_moe`` on a
GPU, the torch loop on a CPU) on random weights of the model's expert shape, and times it. The
layer's expert time is then the busiest GPU's, as in the roofline; only the expert part changes,
dispatch and combine stay modelled.

What it stands for, and what not: each GPU's expert call is timed alone, from a cold L2 (the
benchmark's clean flush) and replayed from a CUDA graph, as ``moegps.kernels.bench`` times the
calibration's calls; G GPUs run concurrently in a real system and do not share this GPU's L2 or
clocks, so one GPU timing them in turn measures each of them. The rows are one per selection
(top-1 calls), which is how the executor computes a rank's tokens whose k experts are not all
local (``expert_compute``'s compaction): the same rows per expert as a k-way call, without its
k-way combine. As on an executor rank, the call holds only the experts it computes (a copy of their
weights), so the kernels pick the config a rank gets: the default (``kernels.launch.default_config``) unless
a table for that many experts at top-1 has been tuned (``python -m moegps.kernels.bench --tune --shapes
mixtral-8x7b@2``; the H200's table has one and two of Mixtral's experts and eight of the 64, the H100's eight of
the 64 at 1-4096 selections, tuned on a replay's shares from 512).
Fractional token counts (replica shares) are rounded to whole rows.

A timed call holds the layer's fixed cost (routing metadata, launches), so a replay with a timer adds no
``layer_overhead`` on top. First runs (docs/simulator.md): 1.02-1.55x the roofline's expert time (with that
fixed cost) on the bundled model's MMLU traces at Mixtral-8x7B's shape, one H200; 1.14-1.19x on DeepSeek-V2-Lite's
recorded prompts, one H100; whether duplication pays on the prefill-heavy MMLU trace turned on the configs one
GPU's few experts run with. ``shares()`` is what was timed, for ``simulator.calibrate``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..shapes import ModelShape
from .generate import wall_ms
from .layer import expert_compute


class KernelExpertTimer:
    """``per_gpu [..., G, E]`` tokens each GPU computes for each expert -> ``[..., G]`` seconds,
    measured (see the module docstring). Use as the ``table`` of ``simulator.replay.simulate`` /
    ``simulator.pipeline.replay_plans`` (``simulator.cost.gpu_expert_time`` hands it the per-GPU rows;
    the simulator itself never imports this module: its command line does, for ``expert_time=kernels``).

    One timing per distinct row-count vector (memoised: decode steps repeat them); ``measured``
    counts the timings, ``calls`` the (step, GPU) pairs asked for."""

    def __init__(self, shape: ModelShape, device: str | torch.device | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, warmup_ms: float = 1.0, rep_ms: float = 5.0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.shape, self.warmup_ms, self.rep_ms = shape, warmup_ms, rep_ms
        E, H, F = shape.n_experts, shape.hidden, shape.expert_ffn
        gen = torch.Generator(device=self.device).manual_seed(seed)
        dtype = dtype if self.device.type == "cuda" else torch.float32
        # std fan_in^-0.5 keeps the activations O(1): the kernels' times do not depend on the values,
        # but a random model that overflowed would not be the model being timed
        self.w_gate_up = torch.randn(E, 2 * F, H, generator=gen, device=self.device, dtype=dtype) * H ** -0.5
        self.w_down = torch.randn(E, H, F, generator=gen, device=self.device, dtype=dtype) * F ** -0.5
        self._x = torch.empty(0, H, device=self.device, dtype=dtype)
        self._gen = gen
        self._seconds: dict[tuple[int, ...], float] = {}
        self.calls = 0

    @property
    def measured(self) -> int:
        return len(self._seconds)

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def gpu_seconds(self, per_gpu: np.ndarray) -> np.ndarray:
        """``[..., G, E]`` tokens (fractions rounded to whole rows) -> ``[..., G]`` seconds."""
        rows = np.rint(np.asarray(per_gpu, dtype=np.float64)).astype(np.int64)
        if rows.shape[-1] != self.shape.n_experts:
            raise ValueError(f"per_gpu has {rows.shape[-1]} experts, the timer's shape {self.shape.name} "
                             f"has {self.shape.n_experts}")
        flat = rows.reshape(-1, rows.shape[-1])
        self.calls += len(flat)
        return np.array([self.seconds(tuple(r)) for r in flat.tolist()]).reshape(rows.shape[:-1])

    def shares(self):
        """The timed shares as a `moegps.kernels.bench` trace table (a pandas DataFrame): one row per
        distinct row-count vector, its experts' rows (``expert_rows``, a JSON list over the model's E
        experts), ``tokens`` (rows in all), ``active_experts`` and ``ours_us``, with the shape at top-1
        (``E, H, F, k``): ``python -m moegps.simulator.calibrate --kernel-bench FIT.csv expert_shares.csv``
        costs each share expert by expert, as the replay's roofline would."""
        import json

        import pandas as pd

        s = self.shape
        return pd.DataFrame([{"shape": s.name, "E": s.n_experts, "H": s.hidden, "F": s.expert_ffn, "k": 1,
                              "tokens": sum(rows), "active_experts": sum(r > 0 for r in rows),
                              "ours_us": seconds * 1e6, "expert_rows": json.dumps(list(rows)),
                              "routing": "replayed share", "device": self.device_name}
                             for rows, seconds in self._seconds.items()])

    def seconds(self, rows: tuple[int, ...]) -> float:
        """Seconds one GPU spends on ``rows[e]`` tokens of each expert e (0 for none)."""
        if sum(rows) == 0:
            return 0.0
        if rows not in self._seconds:
            self._seconds[rows] = self._time(rows)
        return self._seconds[rows]

    def _time(self, rows: tuple[int, ...]) -> float:
        held = [e for e, r in enumerate(rows) if r > 0]  # the experts this GPU computes, in slot order
        counts = torch.tensor([rows[e] for e in held], device=self.device)
        ids = torch.repeat_interleave(torch.arange(len(held), device=self.device), counts)[:, None]
        index = torch.tensor(held, device=self.device)
        w_gate_up, w_down = self.w_gate_up.index_select(0, index), self.w_down.index_select(0, index)
        n = ids.shape[0]
        if self._x.shape[0] < n:  # fresh rows only when more are needed than ever before
            self._x = torch.randn(max(n, 2 * self._x.shape[0]), self.shape.hidden, generator=self._gen,
                                  device=self.device, dtype=self._x.dtype)
        x, gates = self._x[:n], torch.ones(n, 1, device=self.device, dtype=self._x.dtype)

        def call():
            return expert_compute(x, w_gate_up, w_down, ids, gates, dense=True)

        if self.device.type != "cuda":  # the CPU's torch loop: host clock, median of three
            return wall_ms(call, reps=3) * 1e-3
        from ..kernels import timing  # lazy: Triton, for the GPU only

        saved, timing.FLUSH = timing.FLUSH, "clean"  # as the calibration's kernel runs were timed
        try:
            return timing.time_us(call, graph=True, warmup=self.warmup_ms, rep=self.rep_ms) * 1e-6
        finally:
            timing.FLUSH = saved
