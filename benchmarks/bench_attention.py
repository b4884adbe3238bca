"""Speed of cogkern.fused_attention (QK-norm + 3D RoPE + attention) against the
eager CogVideoX path (LayerNorm + diffusers-style RoPE + scaled_dot_product_attention).

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick]

CPU (default without a GPU): the ratio eager time / cogkern time at small
shapes, forward and forward+backward (> 1 means cogkern is faster).

CUDA: the CogVideoX-5B layer shape (batch 1, S = 17,776, 48 heads, D = 64, 226
text tokens) and the same width at D = 128, bf16 and fp16: forward, backward
and forward+backward TFLOP/s of the whole operation for cogkern, for the eager
path on each SDPA backend (flash, cuDNN, efficient) and for flash-attn when
importable, with the bf16 matmul ceiling measured in the same run. FLOPs:
4 * B * S^2 * H * D forward, 2.5x that backward.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import cogkern  # noqa: E402
from cogkern.rope import default_axes_dims  # noqa: E402


# ----------------------------------------------------------------------------
# The eager path, as diffusers' CogVideoXAttnProcessor2_0 runs it.
# ----------------------------------------------------------------------------


def rope_table(grid, head_dim, theta=10000.0, device="cpu"):
    """diffusers' get_3d_rotary_pos_embed(use_real=True) for integer positions: (cos, sin), [T*H*W, D], fp32."""
    axes = default_axes_dims(head_dim)
    t, h, w = grid
    n = torch.arange(t * h * w, device=device)
    index = (n // (h * w), (n // w) % h, n % w)
    parts = []
    for pos, d in zip(index, axes):
        inv_freq = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)
        parts.append(pos[:, None].double() * inv_freq[None, :])
    angles = torch.cat(parts, dim=1).repeat_interleave(2, dim=1).float()
    return angles.cos(), angles.sin()


def apply_rotary_emb(x, cos, sin):
    """diffusers' apply_rotary_emb (use_real, unbind dim -1) on (B, H, S, D)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def eager_attention(q, k, v, norms, cos, sin, text_len):
    """q, k, v: (B, S, H, D). The diffusers processor's steps from the projections on."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views, as diffusers has them
    (qw, qb), (kw, kb) = norms
    q = F.layer_norm(q, (q.shape[-1],), qw, qb, 1e-6)
    k = F.layer_norm(k, (k.shape[-1],), kw, kb, 1e-6)
    q = torch.cat((q[:, :, :text_len], apply_rotary_emb(q[:, :, text_len:], cos, sin)), dim=2)
    k = torch.cat((k[:, :, :text_len], apply_rotary_emb(k[:, :, text_len:], cos, sin)), dim=2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def cogkern_attention(q, k, v, norms, rope, text_len):
    (qw, qb), (kw, kb) = norms
    return cogkern.fused_attention(
        q, k, v, rope=rope, text_len=text_len, qk_norm="layer_norm",
        q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb,
    )  # fmt: skip


# ----------------------------------------------------------------------------


def make_inputs(batch, seq, heads, head_dim, dtype, device, requires_grad):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_(requires_grad)

    q, k, v = (t(batch, seq, heads, head_dim) for _ in range(3))
    norms = tuple((t(head_dim, scale=0.1) + 1, t(head_dim, scale=0.1)) for _ in range(2))
    norms = tuple((w.detach().requires_grad_(requires_grad), b) for w, b in norms)
    return q, k, v, norms


def time_fn(fn, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def fwd_bwd(attn, grad):
    def run():
        out = attn()
        out.backward(grad)

    return run


def bench_cpu(args):
    shapes = [  # (batch, heads, head_dim, text_len, grid)
        (1, 8, 64, 64, (4, 8, 14)),  # S = 512
        (2, 4, 64, 32, (2, 12, 20)),  # S = 512
    ]
    if not args.quick:
        shapes.append((1, 8, 64, 226, (4, 16, 25)))  # S = 1826
    min_time = 0.5 if args.quick else 2.0
    print(f"CPU, {torch.get_num_threads()} threads, float32; ratio = eager / cogkern (> 1: cogkern faster)")
    print(f"{'shape (B, S, H, D, text)':32} {'pass':10} {'eager ms':>9} {'cogkern ms':>11} {'ratio':>6}")
    for batch, heads, head_dim, text_len, grid in shapes:
        seq = text_len + math.prod(grid)
        q, k, v, norms = make_inputs(batch, seq, heads, head_dim, torch.float32, "cpu", requires_grad=True)
        cos, sin = rope_table(grid, head_dim)
        rope = cogkern.RoPE3D(grid, head_dim)

        def eager():
            return eager_attention(q, k, v, norms, cos, sin, text_len)

        def fused():
            return cogkern_attention(q, k, v, norms, rope, text_len)

        with torch.no_grad():
            err = (eager() - fused()).abs().max().item()
        assert err < 1e-4, f"cogkern and eager disagree by {err}"
        grad = torch.randn(batch, seq, heads, head_dim)
        label = f"({batch}, {seq}, {heads}, {head_dim}, {text_len})"
        for name, make in (("forward", lambda f: f), ("fwd+bwd", lambda f: fwd_bwd(f, grad))):
            with torch.set_grad_enabled(name != "forward"):
                t_eager = time_fn(make(eager), min_time)
                t_fused = time_fn(make(fused), min_time)
            print(f"{label:32} {name:10} {t_eager * 1e3:9.2f} {t_fused * 1e3:11.2f} {t_eager / t_fused:6.2f}")


# ----------------------------------------------------------------------------
# GPU mode.
# ----------------------------------------------------------------------------


def matmul_ceiling(dtype, min_time):
    n = 8192
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    t = time_fn(lambda: torch.mm(a, b), min_time)
    return 2 * n**3 / t / 1e12


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def flash_attn_eager(q, k, v, norms, cos, sin, text_len):
    """Eager norm + RoPE in (B, S, H, D), then flash-attn's kernel."""
    from flash_attn import flash_attn_func

    (qw, qb), (kw, kb) = norms
    q = F.layer_norm(q, (q.shape[-1],), qw, qb, 1e-6)
    k = F.layer_norm(k, (k.shape[-1],), kw, kb, 1e-6)
    rot = lambda x: apply_rotary_emb(x.transpose(1, 2), cos, sin).transpose(1, 2)  # noqa: E731
    q = torch.cat((q[:, :text_len], rot(q[:, text_len:])), dim=1)
    k = torch.cat((k[:, :text_len], rot(k[:, text_len:])), dim=1)
    return flash_attn_func(q, k, v)


def bench_cuda(args):
    from torch.nn.attention import sdpa_kernel

    min_time = 0.3 if args.quick else 1.0
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
    configs = [(48, 64)] if args.quick else [(48, 64), (24, 128)]  # (heads, head_dim) at width 3072
    text_len, grid = 226, (13, 30, 45)
    seq = text_len + math.prod(grid)
    batch = 1
    print(f"GPU: {torch.cuda.get_device_name()}, S = {seq}, batch {batch}, text {text_len}")
    for dtype in dtypes:
        print(f"matmul ceiling ({dtype}, 8192^3): {matmul_ceiling(dtype, min_time):.0f} TFLOP/s")
    have_flash_attn = True
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        have_flash_attn = False
    fused_on_cuda = cogkern.attention._HAS_CUDA_KERNEL
    print(f"{'dtype':9} {'H x D':8} {'impl':12} {'fwd TF/s':>9} {'bwd TF/s':>9} {'f+b TF/s':>9}")
    for dtype in dtypes:
        for heads, head_dim in configs:
            q, k, v, norms = make_inputs(batch, seq, heads, head_dim, dtype, "cuda", requires_grad=True)
            cos, sin = rope_table(grid, head_dim, device="cuda")
            rope = cogkern.RoPE3D(grid, head_dim)
            grad = torch.randn_like(q)
            flops_fwd = 4 * batch * seq**2 * heads * head_dim
            impls = {}
            if fused_on_cuda:
                impls["cogkern"] = (lambda: cogkern_attention(q, k, v, norms, rope, text_len), None)
            for name, backend in sdpa_backends().items():
                impls[f"sdpa-{name}"] = (lambda: eager_attention(q, k, v, norms, cos, sin, text_len), backend)
            if have_flash_attn and dtype in (torch.float16, torch.bfloat16):
                impls["flash-attn"] = (lambda: flash_attn_eager(q, k, v, norms, cos, sin, text_len), None)
            for name, (fn, backend) in impls.items():
                ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
                try:
                    with ctx:
                        with torch.no_grad():
                            t_fwd = time_fn(fn, min_time)
                        t_fb = time_fn(fwd_bwd(fn, grad), min_time)
                except RuntimeError as exc:  # a backend that refuses the shape
                    print(f"{str(dtype):9} {heads}x{head_dim:<5} {name:12} unavailable: {str(exc).splitlines()[0]}")
                    continue
                t_bwd = max(t_fb - t_fwd, 1e-9)
                print(
                    f"{str(dtype):9} {heads}x{head_dim:<5} {name:12} {flops_fwd / t_fwd / 1e12:9.1f} "
                    f"{2.5 * flops_fwd / t_bwd / 1e12:9.1f} {3.5 * flops_fwd / t_fb / 1e12:9.1f}"
                )
            if not fused_on_cuda:
                print(f"{str(dtype):9} {heads}x{head_dim:<5} {'cogkern':12} skipped: the CUDA kernel is not built yet")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cuda":
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
