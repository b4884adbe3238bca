"""FlashAttention's accuracy rule for low-precision attention kernels:
the kernel's output and every gradient must be within 2x the error that eager
PyTorch makes in the same dtype, both measured against a float32 reference
computed from the same (rounded) inputs.

"Eager PyTorch" is CogVideoX's path as diffusers runs it
(:func:`cogkern.reference.diffusers_attention.eager_attention`): LayerNorm, RoPE
via a (cos, sin) table computed in fp32 and cast back, scaled_dot_product_attention.
"""
from __future__ import annotations

import math

import torch

from cogkern.rope import RoPE3D
from cogkern.reference.attention_math import reference_attention
from cogkern.reference.diffusers_attention import eager_attention, rotary_table


def factor_grid(n: int) -> tuple[int, int, int]:
    """A (T, H, W) grid with n cells, as 3-D as n allows."""
    for t in (4, 3, 2):
        if n % t == 0:
            rest = n // t
            for h in range(int(math.isqrt(rest)), 0, -1):
                if rest % h == 0:
                    return (t, h, rest // h)
    return (1, 1, n)


def rule_case(batch, seq, heads, head_dim, text_len, dtype, device, seed=0, grid=None):
    """Inputs in `dtype` (leaves), their norm parameters, a RoPE3D and the matching fp32 table.
    grid: the video grid (default: a factorization of seq - text_len)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = (randn(batch, seq, heads, head_dim) for _ in range(3))
    norms = ((randn(head_dim, scale=0.2, shift=1.0), randn(head_dim, scale=0.2)),
             (randn(head_dim, scale=0.2, shift=1.0), randn(head_dim, scale=0.2)))  # fmt: skip
    n_video = seq - text_len
    if n_video == 0:
        return q, k, v, norms, None, None
    rope = RoPE3D(grid or factor_grid(n_video), head_dim)
    table = tuple(t.to(device) for t in rotary_table(rope.grid, head_dim, rope.theta, dtype=torch.float32))
    return q, k, v, norms, rope, table


def errors_against(fn, inputs, ref_out, ref_grads, grad_out, perturb=None):
    """Max abs error of fn's output and of each input's gradient. perturb(out, grads) -> (out, grads),
    if given, is applied to fn's results first (the first-use guard's fault injection)."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    if perturb is not None:
        out, grads = perturb(out, grads)
    errs = [(out.to(ref_out.dtype) - ref_out).abs().max().item()]
    errs += [(g.to(r.dtype) - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    return errs, finite


RULE_NAMES = ("out", "dq", "dk", "dv", "dq_weight", "dq_bias", "dk_weight", "dk_bias")


def rule_errors(kernel_attention, batch, seq, heads, head_dim, text_len, dtype, device, seed=0, grid=None,
                perturb=None):
    """(kernel errors, eager errors, kernel results finite) for RULE_NAMES.

    kernel_attention(q, k, v, **kwargs) takes fused_attention's arguments (rope, text_len, qk_norm,
    norm weights and biases). The reference is float32 for 16-bit inputs and float64 for float32 and
    float64 inputs, from the same rounded inputs; eager PyTorch runs in the inputs' dtype. Every
    random number comes from generators seeded by `seed` (the global RNG is left alone)."""
    q, k, v, norms, rope, table = rule_case(batch, seq, heads, head_dim, text_len, dtype, device, seed, grid)
    (qw, qb), (kw, kb) = norms
    inputs = [q, k, v, qw, qb, kw, kb]
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
    ref_table = eager_table = None
    if rope is not None:
        ref_table = tuple(t.to(device) for t in rotary_table(rope.grid, head_dim, rope.theta, dtype=ref_dtype))
        eager_table = table if dtype != torch.float64 else ref_table  # diffusers builds it in fp32

    ref_inputs = [t.detach().to(ref_dtype).requires_grad_() for t in inputs]
    rq, rk, rv, rqw, rqb, rkw, rkb = ref_inputs
    ref_out, _ = reference_attention(
        rq, rk, rv, rope=ref_table, text_len=text_len, qk_norm="layer_norm",
        q_norm_weight=rqw, q_norm_bias=rqb, k_norm_weight=rkw, k_norm_bias=rkb,
    )  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    grad_out = torch.randn(ref_out.shape, generator=g).to(device=device, dtype=dtype)  # rounded once, used by all three
    ref_grads = [r.detach() for r in torch.autograd.grad(ref_out, ref_inputs, grad_out.to(ref_dtype))]
    ref_out = ref_out.detach()

    def kernel(q, k, v, qw, qb, kw, kb):
        return kernel_attention(
            q, k, v, rope=rope, text_len=text_len, qk_norm="layer_norm",
            q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb,
        )  # fmt: skip

    def eager(q, k, v, qw, qb, kw, kb):
        return eager_attention(q, k, v, ((qw, qb), (kw, kb)), eager_table, text_len)

    err_kernel, finite = errors_against(kernel, inputs, ref_out, ref_grads, grad_out, perturb)
    err_eager, _ = errors_against(eager, inputs, ref_out, ref_grads, grad_out)
    return err_kernel, err_eager, finite


def check_flash_rule(batch, seq, heads, head_dim, text_len, dtype, device, slack=1e-5):
    """Asserts the rule for cogkern.fused_attention; returns (cogkern errors, eager errors)."""
    from cogkern.attention import fused_attention

    err_fused, err_eager, finite = rule_errors(fused_attention, batch, seq, heads, head_dim, text_len, dtype, device)
    assert finite, "cogkern's output or gradients are not finite"
    for name, ef, ee in zip(RULE_NAMES, err_fused, err_eager):
        assert ef <= 2 * ee + slack, f"{name}: cogkern error {ef:.3e} > 2 x eager error {ee:.3e}"
    return err_fused, err_eager
