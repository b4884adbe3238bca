"""Same seed, four precisions: which one should this model train in?

    python -m cogkern.precision_study --out runs/study [--steps 200] [--device cpu|cuda] [--config tiny]

Trains the demo model in fp32, fp16, bf16 and bf16-sr from the same seed and
writes DIR/report.md and DIR/precision_study.png: final loss, distance from
the fp32 curve, overflow (skipped step) counts, the loss-scale trajectory,
speed and memory, plus `cogkern.precision.audit` on one batch, and a
recommendation drawn from those measurements.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from . import train as train_mod
from .data import ShapesVideos
from .diffusion import DDPMSchedule, v_loss
from .model import CONFIGS, VideoTransformer
from .precision import audit

PRECISIONS = ("fp32", "fp16", "bf16", "bf16-sr")


def smooth(values: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def summarize(rows: list[dict], ref: list[dict] | None) -> dict:
    losses = [r["loss"] for r in rows]
    scales = [r["loss_scale"] for r in rows]
    out = dict(
        final_loss=statistics.fmean(losses[-10:]),
        skipped=int(sum(r["skipped"] for r in rows)),
        scale_min=min(scales), scale_max=max(scales), scale_final=scales[-1],
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
        peak_mem_mb=max(r["peak_mem_mb"] for r in rows),
    )
    if ref is not None:
        a, b = smooth(losses), smooth([r["loss"] for r in ref])
        n = min(len(a), len(b))
        out["rel_dist_from_fp32"] = statistics.fmean(abs(x - y) / y for x, y in zip(a[:n], b[:n]))
    return out


def audit_batch(config: str, seed: int):
    cfg = CONFIGS[config]
    latents, ids = ShapesVideos(cfg.video_spec(), seed=seed).batch(0, 4)
    g = torch.Generator().manual_seed(seed)
    sched = DDPMSchedule()
    t = sched.sample_timesteps(4, g)
    xt, v = sched.noisy_and_target(latents, torch.randn(latents.shape, generator=g), t)
    torch.manual_seed(seed)
    model = VideoTransformer(cfg, attention="sdpa")
    return audit(model, (xt, ids, t), loss_fn=lambda out: v_loss(out, v))


def recommend(results: dict, report) -> tuple[str, list[str]]:
    why = []
    fp32 = results["fp32"]["final_loss"]
    ok = {}
    for p in ("fp16", "bf16", "bf16-sr"):
        r = results[p]
        close = r["final_loss"] <= fp32 * 1.10 and r.get("rel_dist_from_fp32", 0) <= 0.15
        ok[p] = close
        why.append(f"{p}: final loss {r['final_loss']:.4f} vs fp32 {fp32:.4f}, mean distance from the fp32 curve "
                   f"{r.get('rel_dist_from_fp32', 0):.1%}, {r['skipped']} skipped step(s) -> "
                   + ("tracks fp32" if close else "does NOT track fp32"))
    if report.recommendation == "bf16" or not ok["fp16"]:
        choice = "bf16" if ok["bf16"] else "fp32"
        why.append("the audit or the fp16 run shows fp16's range is not enough: " + report.reasons[0])
    else:
        choice = "fp16"
        why.append("fp16 tracked fp32 and the audit finds its range sufficient; it keeps more mantissa than bf16")
    if ok["bf16-sr"]:
        why.append("bf16 with stochastic rounding (no master weights, 12 instead of 16 bytes/param) also tracked "
                   "fp32: an option when optimizer memory is the limit")
    return choice, why


def plot(path: str, runs: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for p, rows in runs.items():
        a1.plot([r["step"] for r in rows], smooth([r["loss"] for r in rows]), label=p, lw=1)
    a1.set(xlabel="step", ylabel="loss (10-step mean)", yscale="log", title="loss by precision")
    a1.legend()
    rows = runs["fp16"]
    a2.plot([r["step"] for r in rows], [r["loss_scale"] for r in rows], color="tab:orange")
    a2.set(xlabel="step", ylabel="loss scale", yscale="log", title="fp16 dynamic loss scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogkern.precision_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--config", choices=train_mod.TRAIN_CONFIGS, default="tiny")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be at least 10")
    os.makedirs(args.out, exist_ok=True)
    runs, results = {}, {}
    for prec in PRECISIONS:
        print(f"== {prec}", file=sys.stderr)
        summary = train_mod.train([
            "--precision", prec, "--steps", str(args.steps), "--config", args.config, "--device", args.device,
            "--seed", str(args.seed), "--out", os.path.join(args.out, prec), "--ckpt-every", str(10**9),
            "--no-plot", "--quiet"])
        runs[prec] = summary["rows"]
    for prec in PRECISIONS:
        results[prec] = summarize(runs[prec], None if prec == "fp32" else runs["fp32"])
    report = audit_batch(args.config, args.seed)
    choice, why = recommend(results, report)
    plotted = plot(os.path.join(args.out, "precision_study.png"), runs)

    lines = [f"# Precision study: config `{args.config}`, {args.steps} steps, seed {args.seed}", "",
             f"torch {torch.__version__}, device {args.device}.", "", f"## Recommendation: **{choice}**", ""]
    lines += [f"- {w}" for w in why]
    lines += ["", "## Runs", "",
              "| precision | final loss | rel. distance from fp32 | skipped | loss scale min / max / final | "
              "tokens/s | peak MB |", "|---|---|---|---|---|---|---|"]
    for prec, r in results.items():
        lines.append(f"| {prec} | {r['final_loss']:.4f} | {r.get('rel_dist_from_fp32', 0):.1%} | {r['skipped']} | "
                     f"{r['scale_min']:.0f} / {r['scale_max']:.0f} / {r['scale_final']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mem_mb']:.0f} |")
    lines += ["", "fp32: fp32 params. fp16: fp16 params + fp32 master weights + dynamic loss scaling. bf16: bf16 "
              "params + fp32 master weights. bf16-sr: bf16 params, stochastic rounding, no master weights.", ""]
    if plotted:
        lines += ["![loss by precision](precision_study.png)", ""]
    lines += ["## Audit (one batch, fp32 model)", "", report.to_markdown(), ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"recommendation: {choice}; wrote {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
