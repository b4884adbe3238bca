"""3D RoPE: cogkern's fused op against diffusers' eager RoPE, in GB/s against the copy ceiling.

GPU: the CogVideoX-5B attention shape (1 x 17,776 tokens x 48 heads x 64, text 226,
grid 13x30x45), fp16 and bf16. CPU: a small shape, reported as ratios to eager.

Bytes counted are the fewest the op must move: every element read once and
written once (out-of-place: all tokens; in-place: the video tokens only).

    python -m benchmarks.bench_rope [--quick] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import copy_bandwidth, device_name, report, time_fn
from cogkern import RoPE3D, apply_rope3d
from cogkern.reference.diffusers_attention import apply_rotary_emb

SHAPES = {
    # name: (batch, heads, head_dim, text_len, grid)
    "cogvideox-5b": (1, 48, 64, 226, (13, 30, 45)),
    "cpu-small": (1, 8, 64, 32, (4, 8, 12)),
    "tiny": (1, 2, 64, 8, (2, 4, 4)),
}


def run(device: str, shape: str, dtypes: list[torch.dtype], quick: bool) -> list[dict]:
    batch, heads, d, text_len, grid = SHAPES[shape]
    rope = RoPE3D(grid, d)
    table = rope.cos_sin(device)  # what diffusers' get_3d_rotary_pos_embed(use_real=True) returns
    n_video = rope.num_video_tokens
    s = text_len + n_video
    repeats = 5 if quick else 20
    ceiling = copy_bandwidth(device, nbytes=(64 << 20) if quick else (512 << 20))
    rows = [dict(impl="copy ceiling (torch copy_)", GBps=ceiling / 1e9, pct_copy=100.0)]
    for dtype in dtypes:
        x_bhsd = torch.randn(batch, heads, s, d, device=device, dtype=dtype)  # diffusers' layout
        x = x_bhsd.transpose(1, 2)  # cogkern's (B, S, H, D) view of the same memory
        elem = x.element_size()
        all_bytes = 2 * batch * s * heads * d * elem
        video_bytes = 2 * batch * n_video * heads * d * elem

        def eager():
            x_bhsd[:, :, text_len:] = apply_rotary_emb(x_bhsd[:, :, text_len:], table)

        impls = [
            ("eager (diffusers apply_rotary_emb)", eager, video_bytes),
            ("cogkern rope3d, out-of-place", lambda: apply_rope3d(x, rope, text_len=text_len), all_bytes),
            ("cogkern rope3d, in-place", lambda: apply_rope3d(x, rope, text_len=text_len, inplace=True), video_bytes),
            ("cogkern (cos, sin) table, in-place",
             lambda: apply_rope3d(x, table, text_len=text_len, inplace=True), video_bytes),
        ]
        t_eager = None
        for name, fn, nbytes in impls:
            try:
                t = time_fn(fn, device, repeats=repeats)
            except Exception as exc:  # a failing implementation is reported, never dropped
                rows.append(dict(dtype=str(dtype).replace("torch.", ""), impl=name, status=f"FAILED: {exc}"))
                continue
            t_eager = t if t_eager is None else t_eager
            rows.append(
                dict(
                    dtype=str(dtype).replace("torch.", ""),
                    impl=name,
                    ms=t * 1e3,
                    GBps=nbytes / t / 1e9,
                    pct_copy=100 * nbytes / t / ceiling,
                    speedup_vs_eager=t_eager / t,
                    status="ok",
                )
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller ceiling probe")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    shape = args.shape or ("cogvideox-5b" if args.device == "cuda" else ("tiny" if args.quick else "cpu-small"))
    dtypes = [torch.float16, torch.bfloat16] if args.device == "cuda" else [torch.float32, torch.bfloat16]
    rows = run(args.device, shape, dtypes, args.quick)
    batch, heads, d, text_len, grid = SHAPES[shape]
    title = (f"3D RoPE on {device_name(args.device)}: batch {batch}, seq {text_len}+{grid[0]}x{grid[1]}x{grid[2]}, "
             f"{heads} heads x {d}, torch {torch.__version__}")
    return report(title, rows, ["dtype", "impl", "ms", "GBps", "pct_copy", "speedup_vs_eager", "status"], args.json,
                  benchmark="rope", device=device_name(args.device), shape=shape)


if __name__ == "__main__":
    sys.exit(main())
