"""Tables, JSON and device names shared by the benchmarks.

Timing (time_fn) and the ceilings (copy_bandwidth, matmul_rate) live in
cogkern._timing, shared with `python -m cogkern.selftest`, and are re-exported
here; FLOP and byte counts live in cogkern._counters.
"""
from __future__ import annotations

import json

import torch

# The timing and ceiling helpers live in the package, which cogkern.selftest shares with
# the benchmarks (benchmarks/ is not installed); re-exported here for the benchmarks.
from cogkern._timing import copy_bandwidth, matmul_rate, time_fn  # noqa: F401


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
