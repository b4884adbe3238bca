"""One forward + backward of the CUDA fused attention per kernel path, small
enough to run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python scripts/attention_sanitize_case.py
    compute-sanitizer --tool racecheck python scripts/attention_sanitize_case.py --quick
    compute-sanitizer --tool initcheck python scripts/attention_sanitize_case.py

Paths: fp16 / bf16, head_dim 64 / 128, causal or not, S = 77 and 130 (neither a
multiple of any tile), text_len 0 and 5, the atomic and the deterministic
backward; RoPE alternates between angle and table mode, the norm between
layer_norm (with weight and bias) and rms_norm (weight only). Prints one line
per case and checks that every output is finite. Run with PYTHONPATH=python.
"""
from __future__ import annotations

import argparse
import os
import itertools
import sys

import torch

# torch.use_deterministic_algorithms(True) (the deterministic backward) makes cuBLAS insist on this.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import cogkern
from cogkern import RoPE3D

# Video grids (T, H, W) for seq - text_len.
GRIDS = {77: (7, 11, 1), 72: (2, 6, 6), 130: (2, 5, 13), 125: (5, 5, 5)}


def rope_for(case_index: int, n_video: int, head_dim: int, device):
    rope = RoPE3D(GRIDS[n_video], head_dim)
    if (case_index // 4) % 2 == 0:
        return rope
    # diffusers-style (cos, sin) tables from the same angles.
    t, h, w = rope.grid
    n = torch.arange(n_video)
    idx = (n // (h * w), (n // w) % h, n % w)
    cols = []
    for axis, d in enumerate(rope.axes_dims):
        for j in range(d // 2):
            cols.append(idx[axis].double() * rope.theta ** (-2.0 * j / d))
    angles = torch.stack(cols, 1).repeat_interleave(2, dim=1)
    pad = head_dim - angles.shape[1]
    angles = torch.nn.functional.pad(angles, (0, pad))
    return angles.cos().float().to(device), angles.sin().float().to(device)


def run_case(i, dtype, head_dim, causal, seq, text_len, deterministic, device):
    torch.use_deterministic_algorithms(deterministic)
    batch, heads = 1, 2
    shape = (batch, seq, heads, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    layer = (i // 2) % 2 == 0
    qk_norm = "layer_norm" if layer else "rms_norm"
    w = [torch.randn(head_dim, device=device, requires_grad=True) for _ in range(4)]
    kwargs = dict(
        rope=rope_for(i, seq - text_len, head_dim, device),
        text_len=text_len,
        qk_norm=qk_norm,
        q_norm_weight=w[0],
        q_norm_bias=w[1] if layer else None,
        k_norm_weight=w[2],
        k_norm_bias=w[3] if layer else None,
        causal=causal,
    )
    out, lse = cogkern.fused_attention(q, k, v, return_lse=True, **kwargs)
    (out.float().square().sum() + lse.sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [q.grad, k.grad, v.grad, w[0].grad, w[2].grad]
    finite = all(bool(torch.isfinite(t).all()) for t in [out, lse, *grads])
    print(
        f"{i:3d} {str(dtype)[6:]:9s} D={head_dim:3d} causal={causal!s:5s} S={seq:3d} text={text_len} "
        f"det={deterministic!s:5s} {qk_norm:10s} rope={'angles' if (i // 4) % 2 == 0 else 'table '} "
        f"{'ok' if finite else 'NON-FINITE'}",
        flush=True,
    )
    return finite


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one case per (dtype, head_dim, causal, det)")
    ap.add_argument("--device", default="cuda", help="cpu: dry-run this script against the CPU backend")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    seqs = (77,) if args.quick else (77, 130)
    texts = (5,) if args.quick else (0, 5)
    ok = True
    cases = itertools.product(
        (torch.float16, torch.bfloat16), (64, 128), (False, True), seqs, texts, (False, True)
    )
    for i, (dtype, d, causal, seq, text, det) in enumerate(cases):
        ok &= run_case(i, dtype, d, causal, seq, text, det, device)
    torch.use_deterministic_algorithms(False)
    print("all finite" if ok else "SOME OUTPUTS NOT FINITE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
