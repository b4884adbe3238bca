"""A diffusers CogVideoXTransformer3DModel training step: stock processors against cogkern-enabled.

GPU default: 4 blocks at CogVideoX-5B's width (48 heads x 64) at the real
sequence length (226 text + 13x30x45 video tokens), batch 1, fp16 and bf16
params, torch's AdamW. CPU: a tiny model, as a ratio. Reports ms, tokens/s,
peak memory and the speed-up of cogkern-enabled over stock.

    python -m benchmarks.bench_diffusers [--quick] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import device_name, print_table, report, time_fn, write_json

SHAPES = {
    # heads, head_dim, layers, frames(latent), height, width (latent), text_len, text_dim
    "cogvideox-5b-4blocks": (48, 64, 4, 13, 60, 90, 226, 4096),
    "tiny": (2, 64, 2, 3, 8, 8, 16, 32),
}


def make_step(shape: str, dtype, device, enabled: bool):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from cogkern.integrations import diffusers as ck_diffusers

    heads, hd, layers, f, h, w, text_len, text_dim = SHAPES[shape]
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=hd, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=text_dim, num_layers=layers, sample_width=w * 8, sample_height=h * 8,
        sample_frames=(f - 1) * 4 + 1, patch_size=2, max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True,
    ).to(device=device, dtype=dtype)
    if enabled:
        ck_diffusers.enable(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    x = torch.randn(1, f, 16, h, w, device=device, dtype=dtype)
    enc = torch.randn(1, text_len, text_dim, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    rope = get_3d_rotary_pos_embed(hd, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f, device=device)
    target = torch.randn_like(x)

    def step():
        out = model(x, enc, t, image_rotary_emb=rope).sample
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = text_len + f * (h // 2) * (w // 2)
    return step, tokens


def run(device: str, shape: str, quick: bool) -> list[dict]:
    dev = torch.device(device)
    dtypes = [torch.float16, torch.bfloat16] if dev.type == "cuda" else [torch.float32]
    rows = []
    for dtype in dtypes:
        base = None
        for enabled in (False, True):
            row = dict(dtype=str(dtype).replace("torch.", ""), impl="cogkern-enabled" if enabled else "stock")
            try:
                step, tokens = make_step(shape, dtype, dev, enabled)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                secs = time_fn(step, dev, warmup=2, repeats=3 if quick else 10)
                row.update(ms=secs * 1e3, tokens_per_s=tokens / secs, status="ok")
                if dev.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                base = base or secs
                row["speedup_vs_stock"] = base / secs
            except Exception as exc:  # reported, never dropped
                row["status"] = f"FAILED: {type(exc).__name__}: {exc}"[:160]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print_table("diffusers CogVideoX training step", [dict(impl="diffusers", status="absent")], ["impl", "status"])
        if args.json:
            write_json(args.json, dict(benchmark="diffusers", rows=[]))
        return 0
    shape = args.shape or ("cogvideox-5b-4blocks" if args.device == "cuda" else "tiny")
    rows = run(args.device, shape, args.quick)
    title = f"diffusers CogVideoX training step on {device_name(args.device)}: {shape}, torch {torch.__version__}"
    return report(title, rows, ["dtype", "impl", "ms", "tokens_per_s", "peak_mem_gb", "speedup_vs_stock", "status"],
                  args.json, benchmark="diffusers", device=device_name(args.device), shape=shape)


if __name__ == "__main__":
    sys.exit(main())
