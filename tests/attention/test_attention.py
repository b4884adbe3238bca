"""cogkern.fused_attention and cogkern.FusedAttention on the CPU, against the
independent eager reference in attention_reference.py."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cogkern
from cogkern import FusedAttention, RoPE3D, fused_attention
from cogkern.reference.attention_math import reference_attention
from cogkern.reference.diffusers_attention import cogvideox_attention, rotary_table
from cogkern.reference.flash_rule import check_flash_rule, factor_grid

_ops = torch.ops.cogkern


# ----------------------------------------------------------------------------
# Test cases
# ----------------------------------------------------------------------------


def make_rope(kind, seq, text_len, head_dim, dtype, generator):
    """kind: None | 'angles' | 'halfsplit' (non-interleaved, fractional positions) | 'table'."""
    n_video = seq - text_len
    if kind is None:
        return None
    if kind == "table":
        # Independent angles per channel: the table path is diffusers' formula
        # for any table, not only for pair-repeated ones.
        angles = torch.rand(n_video, head_dim, generator=generator, dtype=torch.float64) * 2 * math.pi
        return angles.cos().to(dtype), angles.sin().to(dtype)
    grid = factor_grid(n_video)
    axes = (2, 2, 2) if head_dim == 8 else None  # head_dim 8: a pass-through pair too
    if kind == "angles":
        return RoPE3D(grid, head_dim, axes_dims=axes)
    assert kind == "halfsplit"
    positions = [torch.linspace(0, 3.5, g, dtype=torch.float64) for g in grid]
    return RoPE3D(grid, head_dim, axes_dims=axes, theta=500.0, interleaved=False, positions=positions)


def make_case(batch, seq, heads, head_dim, text_len, norm, rope_kind, dtype=torch.float64, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    q, k, v = (randn(batch, seq, heads, head_dim) for _ in range(3))
    kwargs = dict(rope=make_rope(rope_kind, seq, text_len, head_dim, dtype, g), text_len=text_len, qk_norm=norm)
    if norm is not None and affine:
        kwargs.update(
            q_norm_weight=randn(head_dim, scale=0.2, shift=1.0),
            q_norm_bias=randn(head_dim, scale=0.2) if norm == "layer_norm" else None,
            k_norm_weight=randn(head_dim, scale=0.2, shift=1.0),
            k_norm_bias=randn(head_dim, scale=0.2),
        )
    return q, k, v, kwargs


def differentiable_inputs(q, k, v, kwargs):
    names = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")
    return [q, k, v] + [kwargs[n] for n in names if kwargs.get(n) is not None]


# (batch, seq, heads, head_dim, text_len, qk_norm, rope, causal)
CASES = {
    "S1": (1, 1, 1, 8, 0, None, None, False),
    "S1-text1-causal": (1, 1, 2, 8, 1, "layer_norm", "table", True),
    "ln-angles": (2, 34, 2, 8, 4, "layer_norm", "angles", False),
    "rms-table-causal": (1, 150, 2, 16, 6, "rms_norm", "table", True),
    "ln-angles-causal-multitile": (1, 600, 1, 16, 24, "layer_norm", "angles", True),
    "ln-table-text0-multitile": (2, 600, 1, 16, 0, "layer_norm", "table", False),
    "rms-halfsplit-positions": (1, 70, 2, 16, 10, "rms_norm", "halfsplit", False),
    "all-text": (1, 40, 1, 16, 40, "layer_norm", "table", False),
    "no-norm-no-rope-causal": (1, 130, 3, 8, 0, None, None, True),
    "one-head-three-key-tiles-causal": (1, 1100, 1, 8, 20, "rms_norm", "table", True),
}


# ----------------------------------------------------------------------------
# Exactness against the reference (float64)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64_reference(case):
    batch, seq, heads, head_dim, text_len, norm, rope_kind, causal = case
    q, k, v, kwargs = make_case(batch, seq, heads, head_dim, text_len, norm, rope_kind)
    out, lse = fused_attention(q, k, v, causal=causal, return_lse=True, **kwargs)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (batch, heads, seq) and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)

    # Gradients through both outputs (the lse term exercises grad_lse).
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    inputs = differentiable_inputs(q, k, v, kwargs)
    grads = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse * grad_lse).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_default_scale_and_explicit_scale():
    q, k, v, kwargs = make_case(1, 20, 2, 16, 0, "layer_norm", None)
    for scale in (None, 0.7):
        out = fused_attention(q, k, v, scale=scale, **kwargs)
        ref, _ = reference_attention(q, k, v, scale=scale, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_norm_without_affine_parameters():
    q, k, v, kwargs = make_case(1, 30, 2, 16, 6, "layer_norm", "angles", affine=False)
    out = fused_attention(q, k, v, norm_eps=1e-3, **kwargs)
    ref, _ = reference_attention(q, k, v, norm_eps=1e-3, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------
# gradcheck
# ----------------------------------------------------------------------------

GRADCHECK_CASES = {
    "S1": (1, 1, 2, 8, 0, "layer_norm", None, False),
    "S7-ln-angles-text3-causal": (1, 7, 2, 8, 3, "layer_norm", "angles", True),
    "S9-rms-table-text0": (1, 9, 1, 8, 0, "rms_norm", "table", False),
    "S6-none-halfsplit": (2, 6, 1, 8, 2, None, "halfsplit", False),
    "S131-two-query-tiles": (1, 131, 1, 4, 5, "layer_norm", "table", True),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradcheck(case):
    batch, seq, heads, head_dim, text_len, norm, rope_kind, causal = case
    q, k, v, kwargs = make_case(batch, seq, heads, head_dim, text_len, norm, rope_kind)
    inputs = differentiable_inputs(q, k, v, kwargs)
    names = [n for n in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias") if kwargs.get(n) is not None]

    def fn(q, k, v, *params):
        kw = dict(kwargs, **dict(zip(names, params)))
        return fused_attention(q, k, v, causal=causal, return_lse=True, **kw)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=seq > 100)


# ----------------------------------------------------------------------------
# Storage dtypes, strides, edge values
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_close_to_reference(dtype):
    q, k, v, kwargs = make_case(2, 300, 2, 16, 12, "layer_norm", "angles", dtype=dtype)
    out, lse = fused_attention(q, k, v, return_lse=True, **kwargs)
    assert out.dtype == dtype and lse.dtype == torch.float32
    as64 = {n: (t.double() if torch.is_tensor(t) else t) for n, t in kwargs.items()}
    ref, _ = reference_attention(q.double(), k.double(), v.double(), **as64)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(out.float().square().sum(), differentiable_inputs(q, k, v, kwargs))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq, text_len", [(17, 0), (300, 44)])
def test_flash_attention_error_rule_on_cpu(seq, text_len, dtype):
    # The rule the CUDA kernel must meet (test_attention_cuda.py), here for the CPU kernel in 16-bit storage.
    check_flash_rule(2, seq, 2, 64, text_len, dtype, "cpu")


def test_large_fp16_inputs_do_not_overflow():
    # Scores reach ~1e6, far past fp16's 65504: the kernel must hold them in fp32.
    q, k, v, _ = make_case(1, 64, 2, 32, 0, None, None, dtype=torch.float16)
    with torch.no_grad():
        q, k = q * 150, k * 150
    out, lse = fused_attention(q, k, v, return_lse=True)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # fp32 rounding of scores of size ~1e5 moves the (very peaked) softmax by ~1e-3.
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_nan_out(where):
    q, k, v, kwargs = make_case(1, 40, 2, 8, 4, "layer_norm", "table")
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[where][0, 10, 1, 3] = math.nan
    out = fused_attention(q, k, v, **kwargs)
    ref, _ = reference_attention(q, k, v, **kwargs)
    assert torch.isnan(out).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    out.sum().backward()  # must not crash
    assert torch.isnan(q.grad).any()


def test_strided_views_give_identical_results():
    q, k, v, kwargs = make_case(2, 50, 3, 16, 5, "layer_norm", "angles", dtype=torch.float32)
    # diffusers' layout: (B, H, S, D) tensors seen through .transpose(1, 2); and a fused qkv projection.
    q_bhsd = q.detach().transpose(1, 2).contiguous().requires_grad_()
    qkv = torch.stack([k.detach(), v.detach()], dim=3).requires_grad_()  # (B, S, H, 2, D)
    q_view, k_view, v_view = q_bhsd.transpose(1, 2), qkv[:, :, :, 0], qkv[:, :, :, 1]
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    out = fused_attention(q, k, v, **kwargs)
    out_view = fused_attention(q_view, k_view, v_view, **kwargs)
    assert torch.equal(out, out_view)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    grad_q_view, grad_qkv = torch.autograd.grad(out_view, (q_bhsd, qkv), grad)
    assert torch.equal(grads[0], grad_q_view.transpose(1, 2))
    assert torch.equal(grads[1], grad_qkv[:, :, :, 0]) and torch.equal(grads[2], grad_qkv[:, :, :, 1])


@pytest.mark.parametrize(
    "batch, heads, seq, causal",
    # 2 x 2 heads: the backward runs one (batch, head) per task; 1 x 1 over
    # several key tiles: with more than one thread it splits dK/dV and dQ.
    [(2, 2, 300, False), (1, 1, 1100, False), (1, 1, 1100, True)],
    ids=["bh-parallel", "tile-parallel", "tile-parallel-causal"],
)
def test_results_do_not_depend_on_thread_count(batch, heads, seq, causal):
    q, k, v, kwargs = make_case(batch, seq, heads, 16, 12, "layer_norm", "angles", dtype=torch.float32)
    inputs = differentiable_inputs(q, k, v, kwargs)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = fused_attention(q, k, v, causal=causal, **kwargs)
            results.append([out.detach(), *torch.autograd.grad(out.square().sum(), inputs)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v, kwargs = make_case(0, 12, 2, 8, 2, "layer_norm", "angles", dtype=torch.float32)
    out, lse = fused_attention(q, k, v, return_lse=True, **kwargs)
    assert out.shape == q.shape and lse.shape == (0, 2, 12)
    out.sum().backward()
    assert q.grad.shape == q.shape
    assert torch.equal(kwargs["q_norm_weight"].grad, torch.zeros(8))


# ----------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ----------------------------------------------------------------------------


def op_args(q, k, v, kwargs, causal=False):
    """The positional arguments of cogkern::fused_attention_fwd for a make_case() case."""
    rope = kwargs.get("rope")
    if isinstance(rope, RoPE3D):
        rope_args = (rope.positions_for(q), list(rope.grid), list(rope.axes_dims), rope.theta, rope.interleaved, None, None)
    elif rope is not None:
        rope_args = (None, [], [], 10000.0, True, *rope)
    else:
        rope_args = (None, [], [], 10000.0, True, None, None)
    norm = [kwargs.get(n) for n in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")]
    return (
        q, k, v, kwargs.get("qk_norm") or "none", *norm, 1e-6, *rope_args,
        kwargs.get("text_len", 0), 1.0 / math.sqrt(q.shape[-1]), causal,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [(1, 20, 2, 8, 4, "layer_norm", "angles", torch.float64), (2, 9, 1, 8, 0, "rms_norm", "table", torch.float32)],
    ids=["ln-angles-f64", "rms-table-f32"],
)
def test_opcheck(case):
    *shape, dtype = case
    q, k, v, kwargs = make_case(*shape, dtype=dtype)
    args = op_args(q, k, v, kwargs, causal=True)
    torch.library.opcheck(_ops.fused_attention_fwd, args)
    out, lse = _ops.fused_attention_fwd(*args)
    # The backward op has no autograd of its own (no double backward): plain tensors.
    plain = [a.detach() if torch.is_tensor(a) else a for a in args]
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), *plain[:3], out.detach(), lse.detach(), *plain[3:])
    torch.library.opcheck(_ops.fused_attention_bwd, bwd_args)


@pytest.mark.parametrize("rope_kind", ["angles", "halfsplit", "table"])
def test_torch_compile_fullgraph(rope_kind):
    q, k, v, kwargs = make_case(2, 40, 2, 16, 8, "layer_norm", rope_kind, dtype=torch.float32)
    inputs = differentiable_inputs(q, k, v, kwargs)

    def step(q, k, v, qw, qb, kw, kb):
        kw_ = dict(kwargs, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb)
        return fused_attention(q, k, v, **kw_).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_eager = step(*inputs)
    grads_eager = torch.autograd.grad(loss_eager, inputs)
    loss_compiled = compiled(*inputs)
    grads_compiled = torch.autograd.grad(loss_compiled, inputs)
    torch.testing.assert_close(loss_compiled, loss_eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------


class EagerCogVideoXAttention(nn.Module):
    """diffusers' Attention + CogVideoXAttnProcessor2_0, written out eagerly, same parameter names."""

    def __init__(self, dim, heads, head_dim, qk_norm, eps=1e-6):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        make_norm = {"layer_norm": lambda: nn.LayerNorm(head_dim, eps=eps), "rms_norm": lambda: nn.RMSNorm(head_dim, eps=eps)}
        self.norm_q = make_norm[qk_norm]() if qk_norm else None
        self.norm_k = make_norm[qk_norm]() if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, hidden_states, rope_table, text_len):
        return cogvideox_attention(self, hidden_states, rope_table, text_len)


def test_module_state_dict_keys_follow_diffusers():
    module = FusedAttention(64, 4)
    assert set(module.state_dict()) == {
        "to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias",
        "norm_q.weight", "norm_q.bias", "norm_k.weight", "norm_k.bias", "to_out.0.weight", "to_out.0.bias",
    }  # fmt: skip
    assert module.norm_q.eps == 1e-6 and module.head_dim == 16
    assert set(FusedAttention(64, 4, qk_norm="rms_norm", bias=False, out_bias=False).state_dict()) == {
        "to_q.weight", "to_k.weight", "to_v.weight", "norm_q.weight", "norm_k.weight", "to_out.0.weight",
    }  # fmt: skip
    assert not any(n.startswith("norm") for n in FusedAttention(64, 4, head_dim=8, qk_norm=None).state_dict())


@pytest.mark.parametrize("qk_norm", ["layer_norm", "rms_norm", None])
def test_module_matches_eager_module_with_same_weights(qk_norm):
    torch.manual_seed(3)
    dim, heads, head_dim, text_len, grid = 48, 3, 16, 5, (2, 3, 4)
    seq = text_len + math.prod(grid)
    eager = EagerCogVideoXAttention(dim, heads, head_dim, qk_norm).double()
    with torch.no_grad():  # non-trivial norm parameters
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = FusedAttention(dim, heads, head_dim, qk_norm=qk_norm).double()
    fused.load_state_dict(eager.state_dict())
    rope = RoPE3D(grid, head_dim)
    # The table the eager module uses, built as diffusers' get_3d_rotary_pos_embed builds it.
    table = rotary_table(grid, head_dim, rope.theta, dtype=torch.float64)

    x = torch.randn(2, seq, dim, dtype=torch.float64, requires_grad=True)
    out_fused = fused(x, rope=rope, text_len=text_len)
    out_eager = eager(x, table, text_len)
    torch.testing.assert_close(out_fused, out_eager, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out_eager)
    grads_fused = torch.autograd.grad(out_fused, [x, *fused.parameters()], grad)
    grads_eager = torch.autograd.grad(out_eager, [x, *eager.parameters()], grad)
    for a, b in zip(grads_fused, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # The module also takes the table itself.
    torch.testing.assert_close(fused(x, rope=table, text_len=text_len), out_eager, rtol=1e-10, atol=1e-10)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        FusedAttention(50, 4)
    with pytest.raises(ValueError, match="qk_norm"):
        FusedAttention(64, 4, qk_norm="group_norm")
    with pytest.raises(ValueError, match="hidden_states"):
        FusedAttention(64, 4)(torch.randn(2, 64))


# ----------------------------------------------------------------------------
# Bad input: ValueError naming the argument, before any kernel runs
# ----------------------------------------------------------------------------


def _base():
    q, k, v, kwargs = make_case(1, 14, 2, 8, 2, "layer_norm", "angles", dtype=torch.float32)
    return [t.detach() for t in (q, k, v)], {n: (t.detach() if torch.is_tensor(t) else t) for n, t in kwargs.items()}


BAD_INPUTS = {
    "q-3d": (lambda a, kw: (a.__setitem__(0, a[0][0]),), "q must be 4-D"),
    "k-shape": (lambda a, kw: (a.__setitem__(1, a[1][:, :7]),), "k must have q's shape"),
    "v-dtype": (lambda a, kw: (a.__setitem__(2, a[2].double()),), "v must have q's dtype"),
    "q-int": (lambda a, kw: [a.__setitem__(i, a[i].to(torch.int32)) for i in range(3)], "q must be float16"),
    "q-stride": (lambda a, kw: (a.__setitem__(0, a[0].transpose(2, 3).contiguous().transpose(2, 3)),), "stride 1"),
    "q-meta": (lambda a, kw: [a.__setitem__(i, a[i].to("meta")) for i in range(3)], "CPU or a CUDA device"),
    "qk_norm": (lambda a, kw: kw.update(qk_norm="batch_norm"), "qk_norm must be"),
    "norm-weight-shape": (lambda a, kw: kw.update(q_norm_weight=torch.ones(7)), "q_norm_weight must have shape"),
    "norm-bias-without-norm": (
        lambda a, kw: kw.update(qk_norm=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None),
        r"k_norm_bias was given but qk_norm is None \('none'\)",
    ),
    "norm-weight-int": (lambda a, kw: kw.update(k_norm_weight=torch.ones(8, dtype=torch.int64)), "k_norm_weight must be"),
    "norm-weight-meta": (lambda a, kw: kw.update(q_norm_weight=torch.ones(8, device="meta")),
                         "q_norm_weight must be on the CPU or a CUDA device"),
    "rope-table-meta": (lambda a, kw: kw.update(rope=(torch.ones(12, 8, device="meta"),) * 2),
                        "rope cos must be on the CPU or a CUDA device"),
    "rope-grid": (lambda a, kw: kw.update(rope=RoPE3D((2, 2, 2), 8, axes_dims=(2, 2, 2))), r"rope grid \[2, 2, 2\] has 8 video tokens but q has seq - text_len = 14 - 2 = 12"),
    "rope-head-dim": (lambda a, kw: kw.update(rope=RoPE3D((1, 3, 4), 16)), "head_dim"),
    "rope-table-shape": (lambda a, kw: kw.update(rope=(torch.ones(11, 8), torch.zeros(11, 8))), "cos must have shape"),
    "rope-type": (lambda a, kw: kw.update(rope="rotary"), "rope must be"),
    "text_len-large": (lambda a, kw: kw.update(text_len=15, rope=None), "text_len"),
    "text_len-negative": (lambda a, kw: kw.update(text_len=-1, rope=None), "text_len"),
    "scale": (lambda a, kw: kw.update(scale=0.0), "scale"),
    "norm_eps": (lambda a, kw: kw.update(norm_eps=-1.0), "norm_eps"),
    "causal": (lambda a, kw: kw.update(causal=1), "causal"),
}


@pytest.mark.parametrize("mutate, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error(mutate, message):
    args, kwargs = _base()
    mutate(args, kwargs)
    with pytest.raises(ValueError, match=message):
        fused_attention(*args, **kwargs)


def test_op_checks_its_arguments_too():
    # Calling the op directly (no Python checks in front) still gets ValueErrors naming the argument.
    (q, k, v), kwargs = _base()
    args = list(op_args(q, k, v, kwargs))
    cases = [
        (1, k[:, :5], "fused_attention: k must have q's shape"),
        (3, "group_norm", "qk_norm must be"),
        (4, torch.ones(3), "q_norm_weight must have shape"),
        (10, [3, 1, 1], "rope grid"),
        (17, -2.0, "scale must be a positive finite number, got -2"),
        (16, 99, r"text_len must be an int in \[0, seq=14\], got 99"),
    ]
    for index, value, message in cases:
        bad = list(args)
        bad[index] = value
        with pytest.raises(ValueError, match=message):
            _ops.fused_attention_fwd(*bad)
    out, lse = _ops.fused_attention_fwd(*args)
    with pytest.raises(ValueError, match="lse must have shape"):
        _ops.fused_attention_bwd(torch.ones_like(out), None, q, k, v, out, lse[:, :1], *args[3:])
    with pytest.raises(ValueError, match="grad_lse must be"):
        _ops.fused_attention_bwd(torch.ones_like(out), lse.double(), q, k, v, out, lse, *args[3:])


# ----------------------------------------------------------------------------
# No seq x seq matrix
# ----------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import resource, sys, torch
sys.path.insert(0, {python_dir!r})
import cogkern
torch.set_num_threads(1)
seq = 10000
q, k, v = (torch.randn(1, seq, 1, 8, requires_grad=True) for _ in range(3))
small = [t[:, :64].detach().requires_grad_() for t in (q, k, v)]
cogkern.fused_attention(*small, causal=True).sum().backward()  # warm up allocator and thread pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cogkern.fused_attention(q, k, v, qk_norm="layer_norm").sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_memory_stays_linear_in_seq():
    # One fp32 seq x seq matrix at seq = 10,000 is 400 MB; everything the kernel
    # needs here (inputs, scratch panels, tiles) is a few MB.
    import os
    import subprocess
    import sys

    python_dir = os.path.dirname(os.path.dirname(cogkern.__file__))
    probe = _MEMORY_PROBE.format(python_dir=python_dir)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    assert grown < 100 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MB"


def test_attention_kernels_reports_the_cpu_backend_and_names_bad_input():
    q = torch.randn(1, 5, 2, 64)
    assert cogkern.attention_kernels(q) == {"forward": "cpu", "backward": "cpu"}
    with pytest.raises(ValueError, match="q must be"):
        cogkern.attention_kernels(q[0])
