"""Timing side by side: calls that take turns within every repetition, with probes of the machine's matmul rate
among them, so that ratios hold on a shared, noisy machine and the limit is measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.report import num, table


class Probes:
    """The machine's matmul rate: fp32 through torch.mm (MKL on CPU) and oneDNN (a 1x1 convolution), and bf16.

    Each probe multiplies [m, k] by [k, n] twice in a row (so a cold cache after the other rows costs little).
    """

    def __init__(self, device: torch.device, m: int, k: int, n: int) -> None:
        self.flops = 2 * 2 * m * k * n
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, device=device, generator=g)
        b = torch.randn(k, n, device=device, generator=g)
        a16, b16 = a.bfloat16(), b.bfloat16()
        self.calls: dict[str, Callable[[], Any]] = {
            "fp32 torch.mm": lambda: (torch.mm(a, b), torch.mm(a, b)),
            "bf16 torch.mm": lambda: (torch.mm(a16, b16), torch.mm(a16, b16)),
        }
        if device.type == "cpu":  # torch.mm is MKL, which runs slower code on some CPUs than oneDNN's convolutions
            x = a.reshape(1, m, 1, k).permute(0, 3, 1, 2)  # channels_last [1, k, m, 1]: m positions of k channels
            w = b.t().reshape(n, k, 1, 1).contiguous()
            x16, w16 = x.bfloat16(), w.bfloat16()
            self.calls["fp32 oneDNN 1x1 conv"] = lambda: (F.conv2d(x, w), F.conv2d(x, w))
            self.calls["bf16 oneDNN 1x1 conv"] = lambda: (F.conv2d(x16, w16), F.conv2d(x16, w16))
        self.times: dict[str, list[float]] = {k: [] for k in self.calls}

    def rates(self, best: bool = True) -> dict[str, float]:
        """GFLOP/s of each probe over its fastest (or its median) timing so far."""
        pick = min if best else statistics.median
        return {k: self.flops / pick(v) / 1e9 for k, v in self.times.items() if v}

    def limit(self, dtype: str) -> float:
        """The machine's limit in GFLOP/s for ``dtype`` (fp32 or bf16): the fastest timing of its best probe.

        Sharing the machine only slows a probe down, so the fastest of its many timings is the closest to the limit.
        """
        return max(r for k, r in self.rates().items() if k.startswith(dtype))

    def section(self) -> list[str]:
        """The report's section on the machine's limit."""
        medians = self.rates(best=False)
        lines = ["## The machine's limit (matmul GFLOP/s of the probes timed between all the rows)", ""]
        rows = [[k, num(v), num(medians[k])] for k, v in self.rates().items()]
        lines += table(["probe", "best GFLOP/s", "median GFLOP/s"], rows)
        timings = sum(len(v) for v in self.times.values()) // len(self.times)
        return lines + [
            "",
            f"Limit: fp32 **{num(self.limit('fp32'))}** GFLOP/s, bf16 **{num(self.limit('bf16'))}** GFLOP/s (the"
            f" fastest timing of the best probe of each, {timings} timings per probe).",
        ]


def in_turns(
    calls: dict[str, Callable[[], Any]], reps: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds of each call of ``calls`` over ``reps`` rounds in which they take turns, after warm-up calls."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


class Timer:
    """Median wall time of calls that take turns within each repetition, with the matmul probes among them."""

    def __init__(self, device: torch.device, probes: Probes) -> None:
        self.device, self.probes = device, probes

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def group(self, calls: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, float]:
        """Median seconds per call of each of ``calls`` (warm-up calls first, then ``reps`` rounds in turn)."""
        everything = {**{f"probe: {k}": c for k, c in self.probes.calls.items()}, **calls}
        times = in_turns(everything, reps, warmup, self.sync)
        for k in self.probes.calls:
            self.probes.times[k] += times.pop(f"probe: {k}")
        return {k: statistics.median(v) for k, v in times.items()}
