"""Timing and measured ceilings, shared by the benchmarks (benchmarks/) and
`python -m cogkern.selftest` (which ships in the package, so they live here).

GPU: CUDA events after warm-up, median of repeats. CPU: torch.utils.benchmark
(blocked autorange), median. Ceilings are measured in the same process as the
ops they judge: device-to-device copy bandwidth (bytes read + written per
second) and the matmul rate.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.utils.benchmark as tbench


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20,
            min_run_time: float = 0.3) -> float:
    """Median seconds per call of fn(): `repeats` CUDA-event timings on the GPU, a blocked
    autorange of at least `min_run_time` seconds on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median


def time_forward_backward(fn: Callable[[], torch.Tensor], grad: torch.Tensor, device: torch.device | str,
                          **timing) -> tuple[float, float, float]:
    """Seconds for the forward (no grad), the backward (forward+backward minus forward)
    and forward+backward of fn(), whose output takes `grad`. `timing`: time_fn's options."""
    with torch.no_grad():
        t_fwd = time_fn(fn, device, **timing)
    t_fb = time_fn(lambda: fn().backward(grad), device, **timing)
    return t_fwd, max(t_fb - t_fwd, 1e-9), t_fb


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 << 20, **timing) -> float:
    """Bytes moved (read + written) per second by a plain tensor copy of nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **timing)
    return 2 * src.numel() * 4 / t


def matmul_rate(device: torch.device | str, n: int | None = None, dtype: torch.dtype | None = None,
                **timing) -> float:
    """FLOP/s of an n x n x n matmul (bf16 on the GPU, float32 on the CPU)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, **timing)
    return 2 * n**3 / t
