"""The kernels' timing loop (moegps.kernels.timing) on the CPU: CUDA events replaced by a fake clock that each
callable advances by its own duration, so the medians and the round order have known answers."""

import pytest
import torch

import moegps.kernels.timing as timing


class FakeClock:
    """A device clock: events read `now`; a timed callable adds its duration to it."""

    def __init__(self):
        self.now = 0.0

    def event(self, enable_timing=True):
        clock = self

        class Event:
            def record(self):
                self.t = clock.now

            def elapsed_time(self, end):  # ms, as torch.cuda.Event's
                return end.t - self.t

        return Event()


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(torch.cuda, "Event", clock.event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(timing, "_flush_l2", lambda: clock.__setattr__("now", clock.now + 5.0))
    return clock


def test_interleaved_rounds_and_medians(clock, rng):
    """Every callable runs once per round, in rounds, and gets the median of its own runs:
    durations drawn per run (ms), so a median taken over the wrong runs shows."""
    durations = {name: rng.uniform(0.5, 3.0, size=400) for name in ("a", "b", "c")}
    order, runs = [], {name: 0 for name in durations}

    def make(name):
        def fn():
            clock.now += durations[name][runs[name] % 400]
            runs[name] += 1
            order.append(name)
        return fn

    medians = timing.time_interleaved({name: make(name) for name in durations})
    # runs: 1 + 5 estimating + warm-up, then the timed ones, a round at a time
    n_timed = {name: max(timing.MIN_RUNS, int(100 / _estimate(durations[name]))) for name in
               durations}
    timed = order[len(order) - sum(n_timed.values()):]
    rounds = min(n_timed.values())
    assert timed[: 3 * rounds] == ["a", "b", "c"] * rounds
    for name, d in durations.items():
        first = runs[name] - n_timed[name]
        own = sorted(d[(first + i) % 400] for i in range(n_timed[name]))
        assert medians[name] * 1e-3 == pytest.approx(own[len(own) // 2])


def _estimate(d):
    """time_interleaved's estimate (ms): 5 runs after the first, each after a 5 ms flush."""
    return sum(5.0 + d[i] for i in range(1, 6)) / 5


def test_time_us_is_one_callable(clock):
    def fn():
        clock.now += 1.5

    assert timing.time_us(fn) == pytest.approx(1500.0)


def test_gpu_clocks_reads_the_samples_while_the_block_runs(tmp_path, monkeypatch):
    """A stand-in for nvidia-smi prints samples every period until terminated (a line the GPU could
    not read, "[N/A]", among them); gpu_clocks takes their medians and least clock, and asks for the
    GPU CUDA_VISIBLE_DEVICES names."""
    import random
    import time

    clocks = [random.randint(1100, 1980) for _ in range(5)]
    power = [round(random.uniform(300, 700), 1) for _ in range(5)]
    lines = [f"{c}, {p}" for c, p in zip(clocks, power)] + ["[N/A], [N/A]"]
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$1\" > " + str(tmp_path / "args") + "\n"
                    + "".join(f"echo '{line}'\n" for line in lines) + "exec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with timing.gpu_clocks(nvidia_smi=str(fake)) as stats:
        time.sleep(0.5)  # the stand-in has printed its lines by now
    assert stats["sm_MHz"] == sorted(clocks)[2]
    assert stats["sm_MHz_min"] == min(clocks)
    assert abs(stats["power_W"] - sorted(power)[2]) < 1e-9
    assert (tmp_path / "args").read_text().strip() == "--id=3"


def test_gpu_clocks_without_a_runnable_nvidia_smi_gives_nan(monkeypatch, tmp_path):
    """Absent, or there but not executable: no samples (NaN), and the timed block still runs."""
    import math

    monkeypatch.setattr(timing.shutil, "which", lambda name: None)
    not_runnable = tmp_path / "nvidia-smi"
    not_runnable.write_text("not a program")
    for exe in (None, str(not_runnable)):
        ran = False
        with timing.gpu_clocks(nvidia_smi=exe) as stats:
            ran = True
        assert ran and all(math.isnan(v) for v in stats.values())


def test_floors_are_weight_bytes_over_the_copy_rate_or_flops_over_the_matmul_rate():
    """bench.floors_us on a hand-worked case: 2 experts, H 4, F 3, 5 tokens, top-2, a copy rate of
    1e6 B/s and a matmul rate of 1e6 FLOP/s (us = 1e6 x bytes or FLOPs / rate)."""
    from moegps.kernels.bench import floors_us

    floors = floors_us(2, 4, 3, 5, 2, {"copy_Bps": 1e6, "matmul_flops": 1e6})
    # gate/up: 2 experts x 6 x 4 bf16 weights = 96 bytes; 10 pairs x 2 x 6 x 4 = 480 FLOPs
    assert floors["gate_up"] == pytest.approx((96e6 / 1e6, 480e6 / 1e6))
    assert floors["down"] == pytest.approx((48.0, 240.0))  # 2 x 4 x 3 x 2 bytes; 10 x 2 x 4 x 3
    # the call: all 144 weight bytes, x read and the output written (2 x 5 x 4 bf16 = 80), 720 FLOPs
    assert floors["call"] == pytest.approx((224.0, 720.0))
