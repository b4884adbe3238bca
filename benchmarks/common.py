"""Timing and ceilings shared by the benchmarks.

GPU: CUDA events after warm-up, median of repeats. CPU: torch.utils.benchmark
(blocked autorange), median. Ceilings are measured in the same process as the
ops they judge: device-to-device copy bandwidth (bytes read + written per
second) and the matmul rate.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import torch
import torch.utils.benchmark as tbench


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds per call of fn()."""
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
        min_run_time=0.3
    )
    return m.median


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 << 20) -> float:
    """Bytes moved (read + written) per second by a plain tensor copy of nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / t


def matmul_rate(device: torch.device | str, n: int | None = None, dtype: torch.dtype | None = None) -> float:
    """FLOP/s of an n x n x n matmul (bf16 on the GPU, float32 on the CPU)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device)
    return 2 * n**3 / t


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """Prints rows as an aligned text table (values formatted by fmt())."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def report(title: str, rows: list[dict], columns: list[str], json_path: str | None, **meta) -> int:
    """Prints the table, writes the JSON the suite collects, and returns the exit
    status: non-zero when any row failed (failures are reported, never dropped)."""
    print_table(title, rows, columns)
    if json_path:
        write_json(json_path, dict(meta, rows=rows))
    return 0 if all(str(r.get("status", "ok")) == "ok" for r in rows) else 1
