"""Every benchmark in one run, ceilings first, results to tables, JSON, CSV and plots.

    python -m benchmarks.run [--quick] [--only rope,attention,optimizer,train,diffusers] [--device cpu|cuda] [--out DIR]

First the two ceilings are measured in this process (device-to-device copy
bandwidth; bf16 matmul rate on the GPU, float32 on the CPU); then each
benchmark runs its peers in the same process and prints its table. Each
benchmark's rows go to DIR/<name>.json, all rows to DIR/results.csv, the
ceilings to DIR/ceilings.json, and plots to DIR/*.png. A benchmark that fails
is reported as failed, never dropped; the exit status is non-zero then.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import time
import traceback

import torch

from benchmarks.common import copy_bandwidth, device_name, matmul_rate, print_table, write_json

BENCHMARKS = {
    "rope": "benchmarks.bench_rope",
    "attention": "benchmarks.bench_attention",
    "optimizer": "benchmarks.bench_optimizer",
    "train": "benchmarks.bench_train_step",
    "diffusers": "benchmarks.bench_diffusers",
}


def parse_only(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown or value!r}; choose from {','.join(BENCHMARKS)}")
    return names


def measure_ceilings(device: str, quick: bool) -> dict:
    bw = copy_bandwidth(device, nbytes=(64 << 20) if quick else (1 << 30))
    n = (4096 if quick else 8192) if device == "cuda" else (256 if quick else 512)
    mm = matmul_rate(device, n=n)
    return dict(device=device_name(device), copy_GBps=bw / 1e9,
                matmul_TFLOPs=mm / 1e12, matmul_dtype="bfloat16" if device == "cuda" else "float32", matmul_n=n,
                torch=torch.__version__, cuda=torch.version.cuda)


def plot(out: str, name: str, rows: list[dict]) -> str | None:
    """attention: TFLOP/s against sequence length per implementation; others: a bar per row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    metric = next((m for m in ("TFLOPs", "GBps", "tokens_per_s") if any(m in r for r in ok)), None)
    if not ok or metric is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if "seq" in ok[0] and len({r["seq"] for r in ok}) > 1:
        for impl in dict.fromkeys(r["impl"] for r in ok):
            pts = sorted((r["seq"], r[metric]) for r in ok if r["impl"] == impl and metric in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xlabel("sequence length")
        ax.legend(fontsize=7)
    else:
        labels = [" ".join(str(r.get(k, "")) for k in ("dtype", "precision", "mode", "pass", "impl") if r.get(k))
                  for r in ok if metric in r]
        ax.barh(range(len(labels)), [r[metric] for r in ok if metric in r])
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"{name}: {metric}")
    ax.set_xlabel(metric) if "seq" not in ok[0] else ax.set_ylabel(metric)
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--only", type=parse_only, default=list(BENCHMARKS), metavar="NAMES",
                   help="comma-separated subset of: " + ",".join(BENCHMARKS))
    p.add_argument("--out", default="bench_out", help="folder for JSON, CSV and plots")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    os.makedirs(args.out, exist_ok=True)

    ceilings = measure_ceilings(args.device, args.quick)
    write_json(os.path.join(args.out, "ceilings.json"), ceilings)
    print_table("Ceilings (measured in this process)", [ceilings],
                ["device", "copy_GBps", "matmul_TFLOPs", "matmul_dtype", "matmul_n", "torch", "cuda"])

    status, all_rows = [], []
    for name in args.only:
        path = os.path.join(args.out, f"{name}.json")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(BENCHMARKS[name])
            flags = ["--device", args.device, "--json", path] + (["--quick"] if args.quick else [])
            rc = module.main(flags)
            with open(path) as f:
                rows = json.load(f)["rows"]
            state = "ok" if rc == 0 else "some rows failed"
        except Exception as exc:  # a broken benchmark is reported, and the others still run
            traceback.print_exc()
            rows, state = [], f"FAILED: {type(exc).__name__}: {exc}"[:160]
        for r in rows:
            all_rows.append(dict(benchmark=name, **r))
        png = plot(args.out, name, rows)
        status.append(dict(benchmark=name, status=state, rows=len(rows), seconds=time.perf_counter() - t0,
                           plot=os.path.basename(png) if png else "-"))

    keys = list(dict.fromkeys(k for r in all_rows for k in r))
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(all_rows)
    print_table(f"Benchmarks ({args.out})", status, ["benchmark", "status", "rows", "seconds", "plot"])
    return 0 if all(s["status"] == "ok" for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
