"""Same seed, four precisions: which one should this model train in?

    python -m cogkern.precision_study --out runs/study [--steps 200] [--device cpu|cuda] [--config tiny]
    python -m cogkern.precision_study --out runs/study --lean          # the four precisions only

Trains the demo model in fp32, fp16, bf16 and bf16-sr from the same seed, and
the optimizer's memory-lean modes (int16 param remainders instead of fp32
masters, bf16 or int8 moments; ``--lean NAME ...`` picks them), and writes
DIR/report.md and DIR/precision_study.png: final loss, distance from the fp32
curve, overflow (skipped step) counts, the loss-scale trajectory, speed and
memory, the optimizer state each run allocated (measured, bytes per param),
plus `cogkern.precision.audit` on one batch, and a recommendation drawn from
those measurements.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

from . import train as train_mod
from .data import ShapesVideos
from .diffusion import DDPMSchedule, v_loss
from .model import CONFIGS, VideoTransformer
from .optim import FusedAdamW
from .precision import FP16_MAX, audit

PRECISIONS = ("fp32", "fp16", "bf16", "bf16-sr")
WATCHED = ("fp16", "bf16")  # runs trained under the activation watch: where fp16 overflows, what bf16 holds
# The optimizer's memory-lean modes: name -> (--precision, extra demo flags).
LEAN_VARIANTS = {
    "bf16+remainders": ("bf16", ["--param-remainders"]),
    "bf16+bf16-moments": ("bf16", ["--moments", "bf16"]),
    "bf16+int8-moments": ("bf16", ["--moments", "int8"]),
    "bf16+remainders+int8-moments": ("bf16", ["--param-remainders", "--moments", "int8"]),
    "bf16-sr+int8-moments": ("bf16-sr", ["--moments", "int8"]),
}
VARIANTS = {**{p: (p, []) for p in PRECISIONS}, **LEAN_VARIANTS}
_VARIANT_NOTES = {
    "bf16+remainders": "bf16 params + int16 remainders (exactly the fp32 master), fp32 m, v",
    "bf16+bf16-moments": "bf16 params + fp32 master, m and v in bf16 (stochastically rounded)",
    "bf16+int8-moments": "bf16 params + fp32 master, m and v as int8 blocks of 256 with fp32 scales",
    "bf16+remainders+int8-moments": "bf16 params + int16 remainders, int8 m, v",
    "bf16-sr+int8-moments": "bf16 params, stochastic rounding, no master, int8 m, v",
}


def moments_available(moments: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this build's optimizer kernels can step `moments` storage for `dtype` params
    (a build may lack some; the op refuses them by name)."""
    p = torch.nn.Parameter(torch.randn(300).to(dtype))
    p.grad = torch.randn_like(p)
    try:
        FusedAdamW([p], moments=moments).step()
    except ValueError as exc:
        if "moments are not available" in str(exc):
            return False
        raise
    return True


def kept_bytes_per_param(precision: str) -> int:
    """Param + gradient bytes per param in the demo's cogkern recipe for `precision`."""
    return 8 if precision == "fp32" else 4


def smooth(values: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def summarize(rows: list[dict], ref: list[dict] | None, state_bytes: int = 0, params: int = 1,
              kept_bytes: int = 0) -> dict:
    losses = [r["loss"] for r in rows]
    scales = [r["loss_scale"] for r in rows]
    out = dict(
        final_loss=statistics.fmean(losses[-10:]),
        skipped=int(sum(r["skipped"] for r in rows)),
        scale_min=min(scales), scale_max=max(scales), scale_final=scales[-1],
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
        peak_mem_mb=max(r["peak_mem_mb"] for r in rows),
        state_bytes=state_bytes, state_per_param=state_bytes / params,
        kept_per_param=kept_bytes + state_bytes / params,
        rows=rows,
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


def tracks_fp32(r: dict, fp32_final: float) -> bool:
    return r["final_loss"] <= fp32_final * 1.10 and r.get("rel_dist_from_fp32", 0) <= 0.15


def where_fp16_overflowed(rows: list[dict], watch_report, overflow_report=None) -> str | None:
    """What the fp16 run's activation watch and loss scaler saw (and, given its overflow report, which
    gradients held inf / NaN in the last skipped step), in one sentence; None when it never skipped."""
    skipped = [r["step"] for r in rows if r["skipped"]]
    if not skipped:
        return None
    scales = [r["loss_scale"] for r in rows]
    text = (f"fp16 skipped {len(skipped)} of {len(rows)} steps (the first at step {skipped[0]}) and its loss scale "
            f"backed off from {scales[0]:g} to {min(scales):g}")
    if watch_report is not None and watch_report.first_unsafe is not None:
        row = next(r for r in watch_report.rows if r.module == watch_report.first_unsafe)
        nonfinite = [r for r in watch_report.rows if not math.isfinite(r.max_abs)]
        text += (f"; the activation watch names `{row.module}` first, at step {row.first_unsafe_step}, with a "
                 f"largest output of {row.max_abs:.4g} ({FP16_MAX:g} is fp16's largest value)")
        if nonfinite:
            text += f"; {len(nonfinite)} module output(s) went non-finite in the forward"
    if overflow_report:
        text += (f"; in the last skipped step (step {skipped[-1]}) {len(overflow_report.entries)} gradient(s) "
                 f"held inf or NaN: {overflow_report.summary}")
    return text


def recommend(results: dict, report, watches: dict | None = None, overflows: dict | None = None
              ) -> tuple[str, list[str]]:
    why = []
    fp32 = results["fp32"]["final_loss"]
    ok = {}
    for p, r in results.items():
        if p == "fp32":
            continue
        ok[p] = tracks_fp32(r, fp32)
        why.append(f"{p}: final loss {r['final_loss']:.4f} vs fp32 {fp32:.4f}, mean distance from the fp32 curve "
                   f"{r.get('rel_dist_from_fp32', 0):.1%}, {r['skipped']} skipped step(s), "
                   f"{r['kept_per_param']:.2f} B/param kept -> " + ("tracks fp32" if ok[p] else "does NOT track fp32"))
    if report.recommendation == "bf16" or not ok["fp16"]:
        choice = "bf16" if ok["bf16"] else "fp32"
        why.append("the audit or the fp16 run shows fp16's range is not enough: " + report.reasons[0])
        overflow = where_fp16_overflowed(results["fp16"]["rows"], (watches or {}).get("fp16"),
                                         (overflows or {}).get("fp16"))
        if overflow:
            why.append(overflow + (": values beyond fp16's range, which bf16 (fp32's exponent range) holds"
                                   if choice == "bf16" else ""))
    else:
        choice = "fp16"
        why.append("fp16 tracked fp32 and the audit finds its range sufficient; it keeps more mantissa than bf16")
        watched = (watches or {}).get("fp16")
        if watched is not None and watched.rows:
            top = max(watched.rows, key=lambda r: r.max_abs)
            why.append(f"the activation watch over the fp16 run: the largest output (`{top.module}`, "
                       f"{top.max_abs:.4g}) stayed {top.headroom:.0f}x below fp16's limit {FP16_MAX:g}")
    if ok["bf16-sr"]:
        why.append("bf16 with stochastic rounding (no master weights, 12 instead of 16 bytes/param) also tracked "
                   "fp32: an option when optimizer memory is the limit")
    lean = [p for p in results if (p in LEAN_VARIANTS or p == "bf16-sr") and ok[p]]
    if lean:
        best = min(lean, key=lambda p: results[p]["kept_per_param"])
        why.append(f"when memory is the limit: {best} tracked fp32 at {results[best]['kept_per_param']:.2f} B/param "
                   f"(params + grads + optimizer state, measured) against {results['bf16']['kept_per_param']:.2f} "
                   "for bf16 with fp32 masters")
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
        a1.plot([r["step"] for r in rows], smooth([r["loss"] for r in rows]), label=p, lw=1,
                ls="--" if p in LEAN_VARIANTS else "-")
    a1.set(xlabel="step", ylabel="loss (10-step mean)", yscale="log", title="loss by precision")
    a1.legend(fontsize="small")
    rows = runs["fp16"]
    a2.plot([r["step"] for r in rows], [r["loss_scale"] for r in rows], color="tab:orange")
    skipped = [r for r in rows if r["skipped"]]
    if skipped:  # where it backed off: every skipped step is an overflow the scaler saw
        a2.scatter([r["step"] for r in skipped], [r["loss_scale"] for r in skipped], s=6, color="tab:red",
                   label=f"skipped step ({len(skipped)})", zorder=3)
        a2.legend(fontsize="small")
    a2.set(xlabel="step", ylabel="loss scale", yscale="log", title="fp16 dynamic loss scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def samples_section(out_dir: str, config: str, run_dirs: dict[str, str], seed: int = 0, device: str = "auto",
                    steps: int = 50) -> dict:
    """Samples of each precision's trained model side by side, and fp16 inference of the bf16-trained one.

    Loads RUN/checkpoint.pt of each of PRECISIONS in `run_dirs`, generates one video per model for the
    first training caption from the same seed (DDIM, `steps` steps) in the precision it trained in, and
    once more the bf16 model cast to fp16: CogVideoX-5B was trained in bf16 and users who run it in fp16
    report black or NaN videos. Writes OUT/samples_by_precision.png (rows: the training video, then each
    run; columns: frames; non-finite pixels magenta). Returns {"facts": {row: inference facts}, "verdict":
    the fp16-inference sentence (None without a bf16 run), "markdown": the report's lines, "image": path}.
    """
    from .diffusion import SAMPLE_DTYPES
    from .precision import FP16_MAX
    from .samples import advance_per_frame, caption_batch, inference_facts, training_videos, write_strip

    cfg = CONFIGS[config]
    data = ShapesVideos(cfg.video_spec(), seed=seed)
    captions, ids = caption_batch(data, 1)
    dev = train_mod.resolve_device(device, 0)
    plan = [(name, name, None) for name in PRECISIONS if name in run_dirs]
    if "bf16" in run_dirs:
        plan.append(("bf16 -> fp16 inference", "bf16", torch.float16))
    rows, labels, facts, latents = [training_videos(data, 1)[0]], [f"training video: {captions[0]}"], {}, {}
    for row, run, dtype in plan:
        state = torch.load(os.path.join(run_dirs[run], "checkpoint.pt"), map_location="cpu", weights_only=False)
        model = VideoTransformer(cfg).to(state["model"]["patch_embed.weight"].dtype)
        model.load_state_dict(state["model"])
        f = inference_facts(model.to(dev), ids, dtype=dtype, steps=steps, seed=seed)
        latents[row] = f.pop("latents")
        video = data.decode(latents[row].float())[0]
        short = {d: k for k, d in SAMPLE_DTYPES.items()}
        facts[row] = dict(f, trained=run, inference=short[dtype or model.patch_embed.weight.dtype],
                          advance=advance_per_frame(video, captions[0]))
        rows.append(video)
        labels.append(f"{row}" + ("" if f["finite"] else f": {f['nonfinite']} non-finite values (magenta)"))
    image = os.path.join(out_dir, "samples_by_precision.png")
    if not write_strip(image, rows, labels):
        image = None
    verdict = None
    if "bf16" in run_dirs:
        f = facts["bf16 -> fp16 inference"]
        if not f["finite"]:
            verdict = (f"fp16 inference of the bf16-trained model went wrong on `{config}`: {f['nan']} NaN and "
                       f"{f['inf']} inf of its {f['numel']} latent values; ")
            verdict += ("v itself stayed finite" if f["first_nonfinite_step"] is None else
                        f"the model's v was first non-finite at step {f['first_nonfinite_step'] + 1} of {steps} "
                        f"({f['v_nonfinite']} non-finite v values over all steps)")
        else:
            diff = float((latents["bf16 -> fp16 inference"] - latents["bf16"]).abs().max())
            verdict = (f"fp16 inference of the bf16-trained model did not go wrong on `{config}`: all {f['numel']} "
                       f"latent values finite (max-abs {f['max_abs']:.3g}), largest |v| {f['v_max_abs']:.3g} "
                       f"(fp16's limit is {FP16_MAX:.0f}), max-abs difference from the bf16 inference {diff:.3g}")
    lines = ["## Samples", "", f"One video per run for \"{captions[0]}\" (the first training caption), seed {seed}, "
             f"{steps} DDIM steps (v-prediction, the training schedule), in the precision each run trained in; the "
             "last row is the bf16-trained model run in fp16. Advance: how far the shape's centroid moves per frame "
             f"along the caption's direction (the training video: {advance_per_frame(rows[0], captions[0]):+.3f}).", ""]
    if verdict:
        lines += [f"**{verdict}.**", ""]
    lines += ["| model | inference in | finite | NaN / inf values | max-abs latents | largest finite |v| | "
              "first non-finite step | advance / frame |", "|---|---|---|---|---|---|---|---|"]
    for f in facts.values():  # first cells unlike the runs table's, which readers of report.md key rows by
        first = "-" if f["first_nonfinite_step"] is None else str(f["first_nonfinite_step"] + 1)
        lines.append(f"| {f['trained']}-trained | {f['inference']} | {'yes' if f['finite'] else 'NO'} | "
                     f"{f['nan']} / {f['inf']} | {f['max_abs']:.3g} | {f['v_max_abs']:.3g} | {first} | "
                     f"{f['advance']:+.3f} |")
    if image:
        lines += ["", "![samples by precision](samples_by_precision.png)"]
    return dict(facts=facts, verdict=verdict, markdown=lines + [""], image=image)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogkern.precision_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--config", choices=train_mod.TRAIN_CONFIGS, default="tiny")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lean", nargs="*", choices=list(LEAN_VARIANTS), default=list(LEAN_VARIANTS), metavar="NAME",
                   help="memory-lean optimizer modes to run besides the four precisions (default: all of "
                        f"{', '.join(LEAN_VARIANTS)}; --lean alone: none)")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be at least 10")
    os.makedirs(args.out, exist_ok=True)
    runs, results, unavailable, watches, overflows = {}, {}, {}, {}, {}
    state_bytes = {}
    torch.manual_seed(args.seed)
    n_params = sum(q.numel() for q in VideoTransformer(CONFIGS[args.config]).parameters() if q.requires_grad)
    for name in list(PRECISIONS) + list(dict.fromkeys(args.lean)):
        prec, extra = VARIANTS[name]
        moments = extra[extra.index("--moments") + 1] if "--moments" in extra else "fp32"
        if moments != "fp32" and not moments_available(moments):
            unavailable[name] = f"{moments} moments are not compiled into this build's optimizer kernels"
            print(f"== {name}: skipped ({unavailable[name]})", file=sys.stderr)
            continue
        print(f"== {name}", file=sys.stderr)
        summary = train_mod.train([
            "--precision", prec, *extra, "--steps", str(args.steps), "--config", args.config,
            "--device", args.device, "--seed", str(args.seed), "--out", os.path.join(args.out, name),
            "--ckpt-every", str(10**9), "--no-plot", "--quiet", *(["--watch"] if name in WATCHED else [])])
        runs[name] = summary["rows"]
        if "watch" in summary:
            watches[name] = summary["watch"]
        if summary.get("overflow_report"):
            overflows[name] = summary["overflow_report"]
        state_bytes[name] = summary["optimizer_state_bytes"]
    for name in runs:
        results[name] = summarize(runs[name], None if name == "fp32" else runs["fp32"], state_bytes[name], n_params,
                                  kept_bytes_per_param(VARIANTS[name][0]))
    report = audit_batch(args.config, args.seed)
    choice, why = recommend(results, report, watches, overflows)
    plotted = plot(os.path.join(args.out, "precision_study.png"), runs)

    lines = [f"# Precision study: config `{args.config}`, {args.steps} steps, seed {args.seed}", "",
             f"torch {torch.__version__}, device {args.device}, {n_params:,} parameters.", "",
             f"## Recommendation: **{choice}**", ""]
    lines += [f"- {w}" for w in why]
    lines += ["", "## Runs", "",
              "| run | final loss | rel. distance from fp32 | skipped | loss scale min / max / final | "
              "tokens/s | peak MB | optimizer state B/param | kept B/param |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['final_loss']:.4f} | {r.get('rel_dist_from_fp32', 0):.1%} | {r['skipped']} | "
                     f"{r['scale_min']:.0f} / {r['scale_max']:.0f} / {r['scale_final']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mem_mb']:.0f} | {r['state_per_param']:.2f} | "
                     f"{r['kept_per_param']:.2f} |")
    for name, reason in unavailable.items():
        lines.append(f"| {name} | not run: {reason} | | | | | | | |")
    lines += ["", "fp32: fp32 params. fp16: fp16 params + fp32 master weights + dynamic loss scaling. bf16: bf16 "
              "params + fp32 master weights. bf16-sr: bf16 params, stochastic rounding, no master weights."]
    lines += [f"{name}: {_VARIANT_NOTES[name]}." for name in args.lean if name in results or name in unavailable]
    lines += ["Optimizer state: the bytes FusedAdamW allocated (`state_bytes()['total']`, step counters "
              "excluded) per parameter; kept: params + gradients + that state.", ""]
    if plotted:
        lines += ["![loss by precision](precision_study.png)", ""]
    for name, w in watches.items():
        lines += [f"## Activation watch: {name} run", "",
                  "The largest output of each module over the run (`cogkern.precision.watch`; the 8 nearest "
                  f"fp16's limit), against fp16's largest value {FP16_MAX:g}; unsafe: non-finite or within "
                  f"{w.headroom:g}x of it. All of them: `{name}/watch.csv`.", "", w.to_markdown(top=8), ""]
    lines += samples_section(args.out, args.config, {n: os.path.join(args.out, n) for n in runs}, args.seed,
                             args.device)["markdown"]
    lines += ["## Audit (one batch, fp32 model)", "", report.to_markdown(), ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"recommendation: {choice}; wrote {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
