"""cogkern.fused_attention (QK-norm + 3D RoPE + attention) against the eager CogVideoX path.

The eager path is diffusers' CogVideoXAttnProcessor2_0 from the projections on
(cogkern.reference.diffusers_attention): LayerNorm QK-norm on (B, H, S, D), diffusers' apply_rotary_emb
on the video tokens, then scaled_dot_product_attention — on each SDPA backend
(flash, cuDNN, efficient) on the GPU — and flash-attn's kernel when importable.

GPU: the CogVideoX-5B layer shape (batch 1, S = 17,776, 48 heads, D = 64, 226
text tokens) and the same width at D = 128, bf16 and fp16: forward, backward
and forward+backward TFLOP/s of the whole operation, with the matmul ceiling
measured in the same run. FLOPs (cogkern._counters): 4*B*S^2*H*D forward,
2.5x that backward. CPU: small shapes, float32, as speed-ups over eager.

    python -m benchmarks.bench_attention [--device cpu|cuda] [--quick] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

import cogkern
from benchmarks.common import device_name, matmul_rate, report
from cogkern._counters import attention_flops
from cogkern._timing import time_forward_backward
from cogkern.reference.diffusers_attention import apply_rotary_emb, eager_attention


def make_inputs(batch, seq, heads, head_dim, dtype, device):
    def t(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, dtype=dtype, device=device) * scale + shift).requires_grad_()

    q, k, v = (t(batch, seq, heads, head_dim) for _ in range(3))
    norms = tuple((t(head_dim, scale=0.1, shift=1.0), t(head_dim, scale=0.1)) for _ in range(2))
    return q, k, v, norms


def flash_attn_path(q, k, v, norms, table, text_len):
    """Eager norm + RoPE in (B, S, H, D), then flash-attn's kernel."""
    from flash_attn import flash_attn_func

    (qw, qb), (kw, kb) = norms
    q = F.layer_norm(q, (q.shape[-1],), qw, qb, 1e-6)
    k = F.layer_norm(k, (k.shape[-1],), kw, kb, 1e-6)

    def rot(x):
        return apply_rotary_emb(x.transpose(1, 2), table).transpose(1, 2)

    q = torch.cat((q[:, :text_len], rot(q[:, text_len:])), dim=1)
    k = torch.cat((k[:, :text_len], rot(k[:, text_len:])), dim=1)
    return flash_attn_func(q, k, v)


def cogkern_attention(q, k, v, norms, rope, text_len):
    (qw, qb), (kw, kb) = norms
    return cogkern.fused_attention(q, k, v, rope=rope, text_len=text_len, qk_norm="layer_norm",
                                   q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb)


@contextlib.contextmanager
def _env(**values):
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _sm90_kernels(q, expect, **values):
    """COGKERN_ATTENTION_SM90* set to `values`, and a check that fused_attention really picks the
    kernels `expect` = (forward, backward) for q: a silent fallback must not be timed under an sm90 name."""
    with _env(**values):
        got = tuple(torch.ops.cogkern._attention_cuda_kernels(q))
        if got != expect:
            raise RuntimeError(f"kernels (forward, backward) {got} selected, not {expect}: no sm_90a code or not a "
                               f"compute capability 9.0 GPU")
        yield


def impls_for(device, q, k, v, norms, rope, table, text_len, sm90=False):
    """name -> (callable, context factory); a peer that cannot run is reported by the caller."""
    impls = {"cogkern": (lambda: cogkern_attention(q, k, v, norms, rope, text_len), contextlib.nullcontext)}
    if sm90 and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        # The opt-in Hopper (wgmma) kernels: the four forwards with the mma.sync backward,
        # then the ping-pong forward with each wgmma backward (two or one warpgroups per
        # block, warp-specialized).
        for label, fwd, bwd in (("fwd plain", "1", "0"), ("fwd pipelined", "2", "0"), ("fwd ws", "3", "0"),
                                ("fwd ws pingpong", "4", "0"), ("fwd ws pingpong + bwd 2wg", "4", "1"),
                                ("fwd ws pingpong + bwd 1wg", "4", "2"), ("fwd ws pingpong + bwd ws", "4", "3")):
            env = dict(COGKERN_ATTENTION_SM90=fwd, COGKERN_ATTENTION_SM90_BWD=bwd)
            impls[f"cogkern (sm90 wgmma {label})"] = (lambda: cogkern_attention(q, k, v, norms, rope, text_len),
                                                     lambda e=env, x=(int(fwd), int(bwd)): _sm90_kernels(q, x, **e))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            impls[f"eager + sdpa-{name}"] = (lambda: eager_attention(q, k, v, norms, table, text_len),
                                             lambda b=backend: sdpa_kernel([b]))
        try:
            import flash_attn  # noqa: F401

            impls["eager + flash-attn"] = (lambda: flash_attn_path(q, k, v, norms, table, text_len),
                                           contextlib.nullcontext)
        except ImportError:
            impls["eager + flash-attn"] = (None, None)
    else:
        impls["eager + sdpa"] = (lambda: eager_attention(q, k, v, norms, table, text_len), contextlib.nullcontext)
    return impls


def run(device: torch.device, quick: bool, sm90: bool = False) -> tuple[list[dict], float]:
    if device.type == "cuda":
        text_len, grid, batch = 226, (13, 30, 45), 1
        # Every dtype and head dim the issue names, even in --quick (fewer repeats only): at
        # S = 17,776 one config takes seconds, and a rare GPU run must bring back all of them.
        dtypes = list(cogkern.attention.CUDA_DTYPES)
        configs = [(3072 // d, d) for d in cogkern.attention.CUDA_HEAD_DIMS]  # (heads, head_dim) at width 3072
        shapes = [(batch, heads, d, text_len, grid) for heads, d in configs]
        repeats = 5 if quick else 20
    else:
        dtypes = [torch.float32]
        shapes = [(1, 8, 64, 64, (4, 8, 14)), (2, 4, 64, 32, (2, 12, 20))]  # S = 512
        if not quick:
            shapes.append((1, 8, 64, 226, (4, 16, 25)))  # S = 1826
        repeats = 10
    ceiling = matmul_rate(device, n=4096 if (quick and device.type == "cuda") else None)
    rows = []
    for dtype in dtypes:
        for batch, heads, d, text_len, grid in shapes:
            seq = text_len + math.prod(grid)
            q, k, v, norms = make_inputs(batch, seq, heads, d, dtype, device)
            rope = cogkern.RoPE3D(grid, d)
            table = rope.cos_sin(device)
            grad = torch.randn_like(q)
            flops = {p: attention_flops(batch, seq, heads, d, pass_=p) for p in ("fwd", "bwd", "fwd_bwd")}
            base = dict(dtype=str(dtype).replace("torch.", ""), seq=seq, heads=heads, head_dim=d)
            results = {}
            for name, (fn, ctx) in impls_for(device, q, k, v, norms, rope, table, text_len, sm90).items():
                if fn is None:
                    rows.append(dict(base, impl=name, status="absent (not importable)"))
                    continue
                try:
                    with ctx():
                        results[name] = time_forward_backward(fn, grad, device, repeats=repeats)
                except Exception as exc:  # a peer that refuses the shape is reported, not dropped
                    rows.append(dict(base, impl=name, status=f"FAILED: {str(exc).splitlines()[0][:120]}"))
            peers = {n: t for n, t in results.items() if not n.startswith("cogkern")}
            for name, times in results.items():
                for p, t in zip(("fwd", "bwd", "fwd_bwd"), times):
                    best_peer = min((pt[("fwd", "bwd", "fwd_bwd").index(p)] for pt in peers.values()), default=None)
                    rows.append(dict(base, impl=name, **{"pass": p}, ms=t * 1e3, TFLOPs=flops[p] / t / 1e12,
                                     pct_matmul=100 * flops[p] / t / ceiling,
                                     speedup_vs_best_peer=best_peer / t if best_peer else None, status="ok"))
    return rows, ceiling


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes, fewer repeats")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None)
    p.add_argument("--sm90", action="store_true",
                   help="also the opt-in Hopper (wgmma) kernels, COGKERN_ATTENTION_SM90=1|2|3|4 and "
                        "COGKERN_ATTENTION_SM90_BWD=1|2|3 (H100/H200 only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows, ceiling = run(device, args.quick, args.sm90)
    title = (f"Fused attention on {device_name(device)} (matmul ceiling {ceiling / 1e12:.1f} TFLOP/s), "
             f"torch {torch.__version__}; speed-up of each row over the fastest peer")
    return report(title, rows, ["dtype", "seq", "heads", "head_dim", "impl", "pass", "ms", "TFLOPs", "pct_matmul",
                                "speedup_vs_best_peer", "status"], args.json, benchmark="attention",
                  device=device_name(device), matmul_ceiling_TFLOPs=ceiling / 1e12)


if __name__ == "__main__":
    sys.exit(main())
