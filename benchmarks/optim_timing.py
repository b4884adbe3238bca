"""Timing helpers for the optimizer benchmark (to move into the shared harness later).

Every number comes from a measurement made in the calling process: CUDA events
on the GPU, perf_counter on the CPU, median over repetitions.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int, reps: int = 5) -> float:
    """Median over `reps` of the mean time of `iters` calls of fn, in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, warmup: int = 3, iters: int = 10) -> float:
    """Device-to-device (or memory-to-memory) copy bandwidth, counting read + write, in GB/s."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, iters)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9
