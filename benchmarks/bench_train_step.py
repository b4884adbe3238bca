"""One training step of a CogVideoX-shaped model: cogkern against the diffusers way.

cogkern: FusedAttention (QK-norm + RoPE + attention fused) and FusedAdamW on
16-bit params with fp32 master weights (+ DynamicLossScaler for fp16).
diffusers way: eager QK-norm + diffusers' RoPE + SDPA, fp32 params under
autocast, torch AdamW (fused on GPU) + GradScaler for fp16.
Reports tokens/s and peak memory; the GPU default is 4 blocks at CogVideoX-5B's
width and real sequence length (226 + 17,550 tokens), the CPU default the tiny
demo model.

    python -m benchmarks.bench_train_step [--quick] [--device cpu|cuda] [--config NAME] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import device_name, report, time_fn
from cogkern.diffusion import DDPMSchedule, v_loss
from cogkern.model import CONFIGS, VideoTransformer
from cogkern.train import Stepper, build_parser, cast_model

BASELINE = "diffusers way (sdpa + torch AdamW/AMP)"
RECIPES = {
    # name: (attention, optimizer); the baseline first: speedups are relative to it
    BASELINE: ("sdpa", "torch"),
    "cogkern": ("cogkern", "cogkern"),
}


def make_step(cfg, attention, optimizer, precision, batch, device):
    device = torch.device(device)
    # The demo's own defaults for every flag (a flag added there is not missing here), then ours.
    args = build_parser().parse_args([])
    for name, value in dict(precision=precision, optimizer=optimizer, lr=1e-4, warmup=0, weight_decay=0.01,
                            max_grad_norm=1.0, seed=0).items():
        setattr(args, name, value)
    torch.manual_seed(0)
    model = cast_model(VideoTransformer(cfg, attention=attention), args).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = Stepper(model, args, device)
    sched = DDPMSchedule()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, *cfg.latent_shape, generator=g)
    t = sched.sample_timesteps(batch, g)
    xt, v = sched.noisy_and_target(latents, torch.randn(latents.shape, generator=g), t)
    ids = torch.randint(0, cfg.vocab, (batch, cfg.text_len), generator=g)
    xt, v, ids, t = xt.to(device), v.to(device), ids.to(device), t.to(device)

    def step():
        with stepper.autocast():
            loss = v_loss(model(xt, ids, t), v)
        stepper.step(loss, params)

    step.model = model  # for benchmarks that instrument it (bench_watch)
    return step


def run(device: str, config: str, precisions: list[str], batch: int, quick: bool) -> list[dict]:
    cfg = CONFIGS[config]
    tokens = batch * cfg.seq_len
    rows = []
    for precision in precisions:
        base = None
        for name, (attention, optimizer) in RECIPES.items():
            row = dict(precision=precision, impl=name)
            step = None
            try:
                step = make_step(cfg, attention, optimizer, precision, batch, device)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time_fn(step, device, warmup=2, repeats=3 if quick else 10)
                row.update(ms=t * 1e3, tokens_per_s=tokens / t, status="ok")
                if device == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                base = base or t
                row["speedup"] = base / t
            except Exception as exc:  # reported, never dropped
                row["status"] = f"FAILED: {type(exc).__name__}: {exc}"[:160]
            rows.append(row)
            del step
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    config = args.config or ("cogvideox-5b-4blocks" if args.device == "cuda" else "tiny")
    batch = args.batch_size or (1 if args.device == "cuda" else 8)
    precisions = ["fp16", "bf16"] if args.device == "cuda" else ["fp32", "bf16"]  # CPUs have no fast fp16 GEMM
    rows = run(args.device, config, precisions, batch, args.quick)
    cfg = CONFIGS[config]
    title = (f"Training step on {device_name(args.device)}: config {config} ({cfg.layers} blocks, dim {cfg.dim}, "
             f"seq {cfg.seq_len}), batch {batch}, torch {torch.__version__}; speedup vs the diffusers way")
    return report(title, rows, ["precision", "impl", "ms", "tokens_per_s", "peak_mem_gb", "speedup", "status"],
                  args.json, benchmark="train_step", device=device_name(args.device), config=config)


if __name__ == "__main__":
    sys.exit(main())
