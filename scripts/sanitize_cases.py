"""One small call of each CUDA kernel path, for compute-sanitizer and ncu.

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py
    python scripts/sanitize_cases.py --only rope   # a subset, by name prefix

Small shapes with odd sizes (sequence not a multiple of any tile, misaligned
views) so out-of-bounds accesses show. Each new CUDA op adds its cases here.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from cogkern.attention import CUDA_DTYPES, CUDA_HEAD_DIMS

# The deterministic attention backward runs under torch.use_deterministic_algorithms(True),
# which makes cuBLAS insist on this.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rope_cases():
    from cogkern import RoPE3D, apply_rope3d

    grid, text_len = (3, 5, 7), 11
    s = text_len + 105
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        base = torch.randn(2, 3, s, 65, device="cuda", dtype=dtype)
        views = {"vector": base[..., :64].transpose(1, 2), "misaligned": base[..., 1:].transpose(1, 2)}
        for name, x in views.items():
            for interleaved in (True, False):
                rope = RoPE3D(grid, 64, interleaved=interleaved, positions=[torch.rand(n) for n in grid])
                xg = x.detach().requires_grad_()
                apply_rope3d(xg, rope, text_len=text_len).sum().backward()  # forward + inverse
                apply_rope3d(x.clone(), rope, text_len=text_len, inplace=True)
                yield f"rope3d {dtype} {name} interleaved={interleaved}"
        t = torch.rand(105, 64, device="cuda")
        apply_rope3d(views["vector"].detach().requires_grad_(), (t, t.flip(0)), text_len=text_len).sum().backward()
        apply_rope3d(views["misaligned"].clone(), (t.to(dtype), t.to(dtype)), text_len=text_len, inplace=True)
        yield f"rope_table {dtype}"


def optimizer_cases():
    from cogkern.amp import DynamicLossScaler
    from cogkern.optim import FusedAdamW

    shapes = [(7,), (33, 5), (1000, 3), (65537,)]  # odd sizes, one chunk boundary crossed
    for dtype, kwargs in ((torch.float32, {}), (torch.float16, {}), (torch.bfloat16, {}),
                          (torch.bfloat16, dict(stochastic_rounding=True)), (torch.float32, dict(max_grad_norm=1.0))):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
        opt = FusedAdamW(params, lr=1e-3, **kwargs)
        scaler = DynamicLossScaler(init_scale=2.0**8) if dtype == torch.float16 else None
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            if step == 1:
                params[2].grad.view(-1)[5] = float("inf")  # an overflow step
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        yield f"FusedAdamW {dtype} {kwargs or ''}"


def attention_cases(quick: bool = True):
    """Every kernel path of the fused attention: fp16/bf16, head_dim 64/128, causal or
    not, atomic and deterministic backward, RoPE by angles and by table, LayerNorm
    (weight + bias) and RMSNorm (weight), S = 77 (and 130) with text_len 5 (and 0)."""
    import itertools

    from cogkern import RoPE3D, fused_attention

    grids = {72: (2, 6, 6), 77: (7, 11, 1), 125: (5, 5, 5), 130: (2, 5, 13)}  # seq - text_len -> (T, H, W)
    seqs, texts = ((77,), (5,)) if quick else ((77, 130), (0, 5))
    cases = itertools.product(CUDA_DTYPES, CUDA_HEAD_DIMS, (False, True), seqs, texts, (False, True))
    for i, (dtype, d, causal, s, text_len, deterministic) in enumerate(cases):
        torch.use_deterministic_algorithms(deterministic)
        rope = RoPE3D(grids[s - text_len], d)
        if (i // 4) % 2:
            rope = rope.cos_sin("cuda")
        layer = (i // 2) % 2 == 0
        q, k, v = (torch.randn(1, s, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        w = [torch.randn(d, device="cuda", requires_grad=True) for _ in range(4)]
        out, lse = fused_attention(q, k, v, rope=rope, text_len=text_len, causal=causal, return_lse=True,
                                   qk_norm="layer_norm" if layer else "rms_norm", q_norm_weight=w[0],
                                   q_norm_bias=w[1] if layer else None, k_norm_weight=w[2],
                                   k_norm_bias=w[3] if layer else None)
        (out.float().square().sum() + lse.sum()).backward()
        finite = all(bool(torch.isfinite(t).all()) for t in (out, lse, q.grad, k.grad, v.grad, w[0].grad, w[2].grad))
        torch.use_deterministic_algorithms(False)
        if not finite:
            raise RuntimeError(f"non-finite output or gradient in attention case {i}")
        yield (f"fused_attention {dtype} D={d} S={s} text={text_len} causal={causal} det={deterministic} "
               f"{'layer' if layer else 'rms'}_norm rope={'table' if (i // 4) % 2 else 'angles'}")


def wgmma_cases(skip_ws: bool = False):
    """The Hopper wgmma conformance tile (tests/attention/test_sm90_wgmma_cuda.py) and the opt-in wgmma
    attention kernels; nothing on other GPUs. skip_ws: without the warp-specialized ones (they hung)."""
    if torch.cuda.get_device_capability() != (9, 0):
        return
    for dtype in (torch.bfloat16, torch.float16):
        for d in CUDA_HEAD_DIMS:
            q, k, v = (torch.randn(64, d, device="cuda", dtype=dtype) for _ in range(3))
            for tma in (False, True):
                torch.ops.cogkern._sm90_wgmma_selftest(q, k, v, tma)
                yield f"sm90 wgmma tile {dtype} D={d}{' (TMA loads)' if tma else ''}"
    # The wgmma attention forward (opt-in), key-tile tails and causal masks.
    from cogkern import fused_attention

    try:
        # plain, pipelined, warp-specialized (TMA), warp-specialized with ping-pong
        for mode in ("1", "2") if skip_ws else ("1", "2", "3", "4"):
            os.environ["COGKERN_ATTENTION_SM90"] = mode
            for dtype, d, causal in ((torch.bfloat16, 64, False), (torch.float16, 128, True)):
                q, k, v = (torch.randn(1, 300, 2, d, device="cuda", dtype=dtype) for _ in range(3))
                out = fused_attention(q, k, v, causal=causal)
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError("non-finite output from the sm90 attention forward")
                yield f"sm90 attention forward mode {mode} {dtype} D={d} S=300 causal={causal}"
        # The wgmma backward (opt-in), two and one warpgroups per block and warp-specialized,
        # atomic and deterministic dq^.
        for mode, dtype, d, causal, det in (("1", torch.bfloat16, 64, False, False), ("1", torch.float16, 128, True, True),
                                            ("2", torch.float16, 64, True, False), ("2", torch.bfloat16, 128, False, True),
                                            ("3", torch.bfloat16, 64, True, False), ("3", torch.float16, 128, False, True)):
            if skip_ws and mode == "3":
                continue
            os.environ["COGKERN_ATTENTION_SM90_BWD"] = mode
            q, k, v = (torch.randn(1, 300, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            torch.use_deterministic_algorithms(det)
            try:
                grads = torch.autograd.grad(fused_attention(q, k, v, causal=causal), (q, k, v),
                                            torch.randn_like(q))
            finally:
                torch.use_deterministic_algorithms(False)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                raise RuntimeError("non-finite gradient from the sm90 attention backward")
            yield f"sm90 attention backward mode {mode} {dtype} D={d} S=300 causal={causal} deterministic={det}"
    finally:
        os.environ.pop("COGKERN_ATTENTION_SM90", None)
        os.environ.pop("COGKERN_ATTENTION_SM90_BWD", None)


CASES = {"rope": rope_cases, "optimizer": optimizer_cases, "attention": attention_cases, "wgmma": wgmma_cases}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated case groups: " + ",".join(CASES))
    p.add_argument("--skip-ws", action="store_true", help="leave out the warp-specialized wgmma kernels (they hung)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA GPU", file=sys.stderr)
        return 2
    wanted = [w for w in args.only.split(",") if w] or list(CASES)
    unknown = [w for w in wanted if w not in CASES]
    if unknown:
        p.error(f"unknown case group(s) {unknown}; choose from {list(CASES)}")
    n = 0
    for group in wanted:
        for label in (CASES[group](args.skip_ws) if group == "wgmma" else CASES[group]()):
            torch.cuda.synchronize()
            n += 1
            print("ok", label, flush=True)
    print(f"sanitize_cases: {n} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
