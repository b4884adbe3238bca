"""What `cogkern.precision.watch` costs: one demo training step with and without it.

    python -m benchmarks.bench_watch [--quick] [--device cpu|cuda] [--config NAME] [--precision P] [--json out.json]

The step is bench_train_step's (cogkern attention and optimizer, fixed batch);
"watch" adds the forward hooks, "watch+backward" the gradient hooks too, and
each step ends with `w.step()`, as in `python -m cogkern.train --watch`.
Numbers: cogkern.precision.watch's docstring.
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.bench_train_step import make_step
from benchmarks.common import device_name, report, time_fn
from cogkern.model import CONFIGS
from cogkern.precision import watch

MODES = {"no watch": None, "watch": False, "watch+backward": True}


def run(device: str, config: str, precision: str, batch: int, quick: bool) -> list[dict]:
    """One row per mode; a failure raises (this benchmark is not part of the suite's run). The modes
    take turns, round after round, and each keeps its fastest round: on a shared machine, load that
    comes and goes then costs every mode alike."""
    timed = {}
    for name, backward in MODES.items():
        step = make_step(CONFIGS[config], "cogkern", "cogkern", precision, batch, device)
        timed[name] = step
        if backward is not None:
            w = watch(step.model, backward=backward)

            def watched(step=step, w=w):
                step()
                w.step()

            timed[name] = watched
    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(3 if quick else 9):
        for name, fn in timed.items():
            best[name] = min(best[name], time_fn(fn, device, warmup=1, repeats=5))
    base = best["no watch"]
    return [dict(mode=name, ms=t * 1e3, overhead_pct=100 * (t / base - 1)) for name, t in best.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    rows = run(args.device, args.config, args.precision, args.batch_size, args.quick)
    title = (f"Activation watch on {device_name(args.device)}: config {args.config}, {args.precision}, "
             f"batch {args.batch_size}, torch {torch.__version__}; one training step")
    return report(title, rows, ["mode", "ms", "overhead_pct"], args.json, benchmark="watch",
                  device=device_name(args.device), config=args.config)


if __name__ == "__main__":
    sys.exit(main())
