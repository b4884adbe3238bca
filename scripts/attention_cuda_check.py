"""Everything the CUDA fused attention must get right, in one GPU run.

    PYTHONPATH=python python scripts/attention_cuda_check.py [--quick] [--no-5b]

Checks, each printed as one line (FAIL lines say why), summary last:
  * FlashAttention's error rule: output, lse and every gradient (q, k, v, the
    norm weights and biases) within 2x the error of eager PyTorch in the same
    dtype, both measured against an fp32 reference on the same inputs, over
    fp16/bf16, D 64/128, S in {1, 17, 128, 1000, 4209}, text_len 0/226,
    batch 1/2, causal or not, RoPE by angles or tables, both norms;
  * the deterministic backward: bitwise equal over two runs, and within the
    rule like the atomic one;
  * NaN in -> NaN out (only where it should be), fp16 inputs of magnitude 300
    without a norm (scores ~1e6) stay finite and accurate;
  * strided (B, H, S, D)-transposed views and a misaligned v;
  * CUDA-graph capture and replay of forward + backward;
  * the CogVideoX-5B shape (S = 17,776, 48 heads, D = 64, bf16): no NaN, the
    rule on a slice of query rows, and forward / backward times.
"""
from __future__ import annotations

import argparse
import os
import math
import sys
import time

import torch

# torch.use_deterministic_algorithms(True) (the deterministic backward) makes cuBLAS insist on this.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import cogkern
from cogkern.attention import CUDA_DTYPES, CUDA_HEAD_DIMS
from cogkern.reference.attention_math import reference_attention
from cogkern import RoPE3D

FAILS: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def factor_grid(n: int) -> tuple[int, int, int]:
    """Some (T, H, W) with T*H*W = n."""
    t = next(d for d in (13, 7, 5, 3, 2, 1) if n % d == 0)
    rest = n // t
    h = next(d for d in range(int(math.isqrt(rest)), 0, -1) if rest % d == 0)
    return t, h, rest // h


def table_from(rope: RoPE3D, head_dim: int, device):
    t, h, w = rope.grid
    n = torch.arange(t * h * w)
    idx = (n // (h * w), (n // w) % h, n % w)
    cols = [idx[a].double() * rope.theta ** (-2.0 * j / d) for a, d in enumerate(rope.axes_dims) for j in range(d // 2)]
    ang = torch.stack(cols, 1).repeat_interleave(2, dim=1)
    ang = torch.nn.functional.pad(ang, (0, head_dim - ang.shape[1]))
    return ang.cos().float().to(device), ang.sin().float().to(device)


def make_case(batch, seq, heads, d, text_len, qk_norm, rope_mode, device):
    n_video = seq - text_len
    rope = None
    if rope_mode != "none" and n_video > 0:
        rope = RoPE3D(factor_grid(n_video), d)
        if rope_mode == "table":
            rope = table_from(rope, d, device)
    shape = (batch, seq, heads, d)
    q, k, v = (torch.randn(shape, device=device) for _ in range(3))
    dout = torch.randn(shape, device=device)
    dlse = torch.randn(batch, heads, seq, device=device)
    params = [None] * 4
    if qk_norm is not None:
        params = [1 + 0.1 * torch.randn(d, device=device), 0.1 * torch.randn(d, device=device),
                  1 + 0.1 * torch.randn(d, device=device), 0.1 * torch.randn(d, device=device)]
        if qk_norm == "rms_norm":
            params[1] = params[3] = None
    return dict(q=q, k=k, v=v, dout=dout, dlse=dlse, params=params, rope=rope, text_len=text_len, qk_norm=qk_norm)


def run(fn, c, dtype, causal):
    """Forward + backward of fn (cogkern or the reference); returns [out, lse, dq, dk, dv, d params...]."""
    q, k, v = (c[n].detach().to(dtype).requires_grad_() for n in "qkv")
    params = [None if p is None else p.clone().requires_grad_() for p in c["params"]]
    kw = dict(rope=c["rope"], text_len=c["text_len"], qk_norm=c["qk_norm"], q_norm_weight=params[0],
              q_norm_bias=params[1], k_norm_weight=params[2], k_norm_bias=params[3], causal=causal)
    if fn is cogkern.fused_attention:
        out, lse = fn(q, k, v, return_lse=True, **kw)
    else:
        out, lse = fn(q, k, v, **kw)
    torch.autograd.backward([out, lse], [c["dout"].to(out.dtype), c["dlse"].to(lse.dtype)])
    res = [out, lse, q.grad, k.grad, v.grad] + [p.grad for p in params if p is not None]
    return [t.detach().float() for t in res]


NAMES = ["out", "lse", "dq", "dk", "dv", "dqw", "dqb", "dkw", "dkb"]


def rule(name, got, eager, ref, ok_all):
    worst = ""
    ok = True
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        err = (g - r).abs().max().item()
        err_e = (e - r).abs().max().item()
        bound = 2 * err_e + 1e-5 * (1 + r.abs().max().item())
        finite = bool(torch.isfinite(g).all())
        if not finite or not err <= bound:
            ok = False
            worst += f" {NAMES[i]}: err {err:.3g} > 2x eager {err_e:.3g}{'' if finite else ' NON-FINITE'};"
    ratios = " ".join(
        f"{NAMES[i]}={(g - r).abs().max().item() / max((e - r).abs().max().item(), 1e-12):.2f}"
        for i, (g, e, r) in enumerate(zip(got, eager, ref))
    )
    report(name, ok, worst if not ok else f"(err / eager err: {ratios})")
    return ok_all and ok


def error_rule_sweep(device, quick):
    seqs = (1, 17, 128, 1000) if quick else (1, 17, 128, 1000, 4096 + 113)
    i = 0
    for dtype in CUDA_DTYPES:
        for d in CUDA_HEAD_DIMS:
            for seq in seqs:
                for text_len in (0, 226):
                    if text_len > seq:
                        continue
                    for batch in (1, 2):
                        if quick and batch == 2 and seq > 128:
                            continue
                        causal = i % 3 == 1
                        qk_norm = ("layer_norm", "rms_norm", None)[i % 3]
                        rope_mode = ("angles", "table", "none")[(i // 2) % 3]
                        i += 1
                        c = make_case(batch, seq, 2, d, text_len, qk_norm, rope_mode, device)
                        ref = run(reference_attention, c, torch.float32, causal)
                        eager = run(reference_attention, c, dtype, causal)
                        got = run(cogkern.fused_attention, c, dtype, causal)
                        name = (f"rule {str(dtype)[6:]} D={d} S={seq} text={text_len} B={batch} causal={causal} "
                                f"norm={qk_norm} rope={rope_mode}")
                        rule(name, got, eager, ref, True)
                        if seq in (17, 1000) and batch == 1:
                            torch.use_deterministic_algorithms(True)
                            try:
                                det1 = run(cogkern.fused_attention, c, dtype, causal)
                                det2 = run(cogkern.fused_attention, c, dtype, causal)
                            finally:
                                torch.use_deterministic_algorithms(False)
                            same = all(torch.equal(a, b) for a, b in zip(det1, det2))
                            report(f"deterministic bitwise {name}", same)
                            rule(f"deterministic {name}", det1, eager, ref, True)


def special_inputs(device):
    for dtype in CUDA_DTYPES:
        # NaN in one q row: that row's output is NaN, every other row finite.
        q, k, v = (torch.randn(1, 40, 2, 64, device=device, dtype=dtype) for _ in range(3))
        q[0, 7, 1, 3] = float("nan")
        out = cogkern.fused_attention(q, k, v, qk_norm="layer_norm")
        bad = torch.isnan(out)
        ok = bool(bad[0, 7, 1].all()) and int(bad.sum()) == 64
        report(f"NaN in q -> NaN in that row only ({dtype})", ok, f"nan count {int(bad.sum())}")
        # NaN in k: every row of that head is NaN (non-causal).
        q, k, v = (torch.randn(1, 40, 2, 64, device=device, dtype=dtype) for _ in range(3))
        k[0, 9, 0, 0] = float("nan")
        out = cogkern.fused_attention(q, k, v)
        report(f"NaN in k -> NaN in its head ({dtype})", bool(torch.isnan(out[:, :, 0]).all())
               and bool(torch.isfinite(out[:, :, 1]).all()))
        # NaN in grad_out reaches the grads.
        q, k, v = (torch.randn(1, 40, 2, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        out = cogkern.fused_attention(q, k, v)
        g = torch.randn_like(out)
        g[0, 3, 0, 0] = float("nan")
        out.backward(g)
        report(f"NaN in grad_out -> NaN grads ({dtype})", bool(torch.isnan(v.grad).any()) and
               bool(torch.isnan(q.grad[0, 3, 0]).all()))

    # fp16 large magnitudes without a norm: raw scores ~1e6.
    c = make_case(1, 300, 2, 64, 0, None, "none", device)
    for n in "qk":
        c[n] = (c[n] * 300).half().float()  # the reference sees exactly the fp16 inputs
    ref = run(reference_attention, c, torch.float32, False)
    got = run(cogkern.fused_attention, c, torch.float16, False)
    err = (got[0] - ref[0]).abs().max().item()
    report("fp16 |q|,|k| ~ 300: finite, out close to fp32", bool(torch.isfinite(got[0]).all()) and err < 2e-2,
           f"out err {err:.3g}")


def layouts(device):
    b, s, h, d = 2, 133, 3, 64
    base = [torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)  # diffusers' (B, H, S, D) memory
    got = cogkern.fused_attention(q, k, v, qk_norm="layer_norm")
    want = cogkern.fused_attention(q.contiguous(), k.contiguous(), v.contiguous(), qk_norm="layer_norm")
    report("transposed (B,H,S,D) views == contiguous", torch.equal(got, want))
    # v whose rows are not 16-byte aligned (a slice at element offset 1).
    big = torch.randn(b, s, h, d + 1, device=device, dtype=torch.bfloat16)
    v_odd = big[..., 1:]
    qc = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    kc = torch.randn_like(qc, requires_grad=True)
    v1 = v_odd.detach().requires_grad_()
    out1 = cogkern.fused_attention(qc, kc, v1)
    out1.sum().backward()
    g1 = [qc.grad.clone(), kc.grad.clone(), v1.grad.clone()]
    qc.grad = kc.grad = None
    v2 = v_odd.contiguous().requires_grad_()
    out2 = cogkern.fused_attention(qc, kc, v2)
    out2.sum().backward()
    ok = torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, [qc.grad, kc.grad, v2.grad]))
    report("misaligned v == contiguous v (forward and grads)", ok)


def graph_capture(device):
    c = make_case(1, 300, 2, 64, 44, "layer_norm", "angles", device)
    q, k, v = (c[n].detach().to(torch.bfloat16).requires_grad_() for n in "qkv")
    w = [p.clone().requires_grad_() for p in c["params"]]
    dout = c["dout"].to(torch.bfloat16)

    def step():
        for t in (q, k, v, *w):
            t.grad = None
        out = cogkern.fused_attention(q, k, v, rope=c["rope"], text_len=44, qk_norm="layer_norm",
                                      q_norm_weight=w[0], q_norm_bias=w[1], k_norm_weight=w[2], k_norm_bias=w[3])
        out.backward(dout)
        return out

    torch.use_deterministic_algorithms(True)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                eager_out = step().detach().clone()
                eager_grads = [t.grad.clone() for t in (q, k, v, *w)]
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        for t in (q, k, v, *w):
            t.grad = None
        with torch.cuda.graph(graph):
            static_out = step()
        graph.replay()
        torch.cuda.synchronize()
        ok = torch.equal(static_out, eager_out) and all(
            torch.equal(t.grad, g) for t, g in zip((q, k, v, *w), eager_grads))
        report("CUDA graph capture + replay (fwd + bwd) == eager", ok)
    except Exception as e:  # noqa: BLE001
        report("CUDA graph capture + replay (fwd + bwd) == eager", False, repr(e))
    finally:
        torch.use_deterministic_algorithms(False)


def shape_5b(device):
    b, s, h, d, text = 1, 17776, 48, 64, 226
    rope = RoPE3D((13, 30, 45), d)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    w = [torch.ones(d, device=device, requires_grad=True), torch.zeros(d, device=device, requires_grad=True)] * 2
    kw = dict(rope=rope, text_len=text, qk_norm="layer_norm", q_norm_weight=w[0], q_norm_bias=w[1],
              k_norm_weight=w[2], k_norm_bias=w[3])
    out, lse = cogkern.fused_attention(q, k, v, return_lse=True, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    finite = all(bool(torch.isfinite(t).all()) for t in (out, lse, q.grad, k.grad, v.grad))
    report("5B shape: forward + backward finite", finite)
    # Error rule on a slice: 2 heads, query rows [0, 256) and the last 200, all keys.
    heads = [0, 47]
    rows = torch.cat([torch.arange(256), torch.arange(s - 200, s)]).to(device)
    from cogkern.reference.attention_math import norm_rows, rotate_video_tokens

    def prepared(x, dt):
        x = x.detach()[:, :, heads].to(dt)
        return rotate_video_tokens(norm_rows(x, "layer_norm", None, None, 1e-6), rope, text)

    errs = []
    for dt in (torch.float32, dtype):
        qh, kh = prepared(q, dt), prepared(k, dt)
        vh = v.detach()[:, :, heads].to(dt)
        sc = torch.einsum("bihd,bjhd->bhij", qh[:, rows], kh) / math.sqrt(d)
        o = torch.einsum("bhij,bjhd->bihd", sc.float().softmax(-1).to(dt), vh)
        errs.append(o.float())
    got = out.detach()[:, rows][:, :, heads].float()
    err, err_e = (got - errs[0]).abs().max().item(), (errs[1] - errs[0]).abs().max().item()
    report("5B shape: output slice within 2x eager bf16 error", err <= 2 * err_e + 1e-5, f"{err:.3g} vs {err_e:.3g}")

    flops = 4 * b * s * s * h * d

    def timed(label, fn, f):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 5
        print(f"time 5B {label}: {ms:.2f} ms, {f / ms / 1e9:.0f} TFLOP/s", flush=True)

    timed("cogkern forward", lambda: cogkern.fused_attention(q, k, v, **kw), flops)
    timed("cogkern backward", lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 2.5 * flops)
    torch.use_deterministic_algorithms(True)
    try:
        timed("cogkern backward (deterministic)",
              lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 2.5 * flops)
    finally:
        torch.use_deterministic_algorithms(False)
    # Peers: attention core only (no norm / RoPE), (B, H, S, D) layout.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs, ks, vs = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
                timed(f"sdpa {backend.name} forward", lambda: torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs), flops)
                g = torch.randn_like(o)
                timed(f"sdpa {backend.name} backward",
                      lambda: torch.autograd.grad(o, (qs, ks, vs), g, retain_graph=True), 2.5 * flops)
        except Exception as e:  # noqa: BLE001
            print(f"sdpa {backend.name}: unavailable ({type(e).__name__})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-5b", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: dry-run this script against the CPU backend")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    sections = [special_inputs, layouts, lambda dev: error_rule_sweep(dev, args.quick)]
    if device.type == "cuda":
        sections.insert(2, graph_capture)
    for section in sections:
        try:
            section(device)
        except Exception as e:  # noqa: BLE001
            report(f"section {getattr(section, '__name__', '?')} raised", False, repr(e))
    if not args.no_5b and device.type == "cuda":
        try:
            shape_5b(device)
        except Exception as e:  # noqa: BLE001
            report("5B shape raised", False, repr(e))
    print(f"\n{len(FAILS)} failed ({time.time() - t0:.0f} s)" + "".join(f"\n  {f}" for f in FAILS))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
