"""3D RoPE on the CPU: against the float64 reference, gradients, op registration, compile, bad input."""
import pytest
import torch

from cogkern import RoPE3D, apply_rope3d
from cogkern.reference.diffusers_attention import rotary_table
from cogkern.reference.rope_math import apply_table_reference, rope3d_reference

F64 = dict(rtol=0, atol=1e-12)


def make_x(batch, text_len, grid, heads, head_dim, dtype=torch.float64, layout="bshd"):
    s = text_len + grid[0] * grid[1] * grid[2]
    if layout == "bshd":
        return torch.randn(batch, s, heads, head_dim, dtype=dtype)
    if layout == "bhsd":  # diffusers' layout, seen through a transpose: no copy
        return torch.randn(batch, heads, s, head_dim, dtype=dtype).transpose(1, 2)
    if layout == "sliced":  # e.g. q out of a fused qkv projection: row stride 3*D
        return torch.randn(batch, s, heads, 3 * head_dim, dtype=dtype)[..., head_dim : 2 * head_dim]
    raise ValueError(layout)


CASES = [
    # grid, head_dim, axes_dims, text_len, batch, heads
    ((2, 3, 5), 64, None, 0, 1, 2),
    ((3, 5, 7), 64, None, 11, 2, 3),
    ((1, 1, 1), 16, None, 1, 1, 1),
    ((4, 3, 2), 32, (8, 8, 8), 5, 2, 2),  # channels past the axes pass through
    ((2, 2, 3), 20, (2, 4, 6), 3, 1, 2),  # uneven, small axes
    ((5, 1, 3), 24, (0, 12, 8), 0, 1, 1),  # an axis with no rotary dims
]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("grid,head_dim,axes,text_len,batch,heads", CASES)
def test_matches_reference_float64(grid, head_dim, axes, text_len, batch, heads, interleaved):
    rope = RoPE3D(grid, head_dim, axes_dims=axes, interleaved=interleaved)
    x = make_x(batch, text_len, grid, heads, head_dim)
    out = apply_rope3d(x, rope, text_len=text_len)
    ref = rope3d_reference(x, grid, rope.axes_dims, interleaved=interleaved, text_len=text_len)
    torch.testing.assert_close(out, ref, **F64)
    assert torch.equal(out[:, :text_len], x[:, :text_len])  # text prefix untouched, bit for bit


@pytest.mark.parametrize("layout", ["bhsd", "sliced"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_non_contiguous_inputs(layout, interleaved):
    grid, text_len = (3, 4, 5), 7
    rope = RoPE3D(grid, 64, interleaved=interleaved)
    x = make_x(2, text_len, grid, 3, 64, layout=layout)
    assert not x.is_contiguous()
    out = apply_rope3d(x, rope, text_len=text_len)
    torch.testing.assert_close(out, rope3d_reference(x, grid, rope.axes_dims, interleaved=interleaved, text_len=text_len), **F64)


def test_fractional_positions_and_theta():
    grid = (3, 4, 6)
    positions = (torch.linspace(0, 2.5, 3), torch.linspace(0.25, 7.75, 4), torch.tensor([0.0, 1.5, 3, 4.5, 6, 7.5]))
    rope = RoPE3D(grid, 64, theta=500.0, positions=positions)
    x = make_x(2, 5, grid, 2, 64)
    out = apply_rope3d(x, rope, text_len=5)
    ref = rope3d_reference(x, grid, rope.axes_dims, theta=500.0, text_len=5, positions=positions)
    torch.testing.assert_close(out, ref, **F64)


def test_integer_positions_equal_default():
    grid = (2, 3, 4)
    x = make_x(1, 3, grid, 2, 32)
    explicit = RoPE3D(grid, 32, positions=[torch.arange(n) for n in grid])
    torch.testing.assert_close(apply_rope3d(x, explicit, text_len=3), apply_rope3d(x, RoPE3D(grid, 32), text_len=3), **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_one_rounding(dtype):
    """fp32 math inside, one rounding at the end: error at most ~1 ulp of the output dtype
    (in fp32 itself, the fp32 angle's own rounding, ~ulp(max angle), dominates)."""
    grid, text_len = (3, 5, 7), 9
    rope = RoPE3D(grid, 64)
    x = make_x(2, text_len, grid, 3, 64, dtype=dtype)
    out = apply_rope3d(x, rope, text_len=text_len)
    assert out.dtype == dtype
    ref = rope3d_reference(x, grid, rope.axes_dims, text_len=text_len)
    tol = torch.finfo(dtype).eps * (8 if dtype == torch.float32 else 1)
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= tol, (err, tol)


def test_table_mode_matches_diffusers_formula_and_rope3d():
    grid, text_len = (3, 4, 5), 6
    x = make_x(2, text_len, grid, 2, 64)
    cos, sin = rotary_table(grid, 64, dtype=torch.float64)
    out = apply_rope3d(x, (cos, sin), text_len=text_len)
    torch.testing.assert_close(out, apply_table_reference(x, cos, sin, text_len), **F64)
    # diffusers' tables and RoPE3D describe the same rotation
    torch.testing.assert_close(out, apply_rope3d(x, RoPE3D(grid, 64), text_len=text_len), **F64)


def test_table_mode_general_tables_and_float32_tables():
    """Tables need not repeat values within a pair; float32 tables with bf16 x work as in diffusers."""
    grid = (2, 2, 3)
    x = make_x(1, 2, grid, 2, 16)
    cos, sin = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    torch.testing.assert_close(apply_rope3d(x, (cos, sin), text_len=2), apply_table_reference(x, cos, sin, 2), **F64)
    xb = x.to(torch.bfloat16)
    out = apply_rope3d(xb, (cos.float(), sin.float()), text_len=2)
    ref = apply_table_reference(xb, cos.float(), sin.float(), 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("interleaved", [True, False])
def test_inverse_undoes_rotation(interleaved):
    grid = (2, 3, 4)
    rope = RoPE3D(grid, 32, interleaved=interleaved, positions=[torch.rand(n) * 10 for n in grid])
    x = make_x(2, 4, grid, 2, 32)
    y = apply_rope3d(x, rope, text_len=4)
    back = torch.ops.cogkern.rope3d(y, rope.positions_for(y), list(grid), list(rope.axes_dims), rope.theta,
                                    interleaved, 4, True)
    torch.testing.assert_close(back, x, **F64)


@pytest.mark.parametrize("use_table", [False, True])
def test_inplace(use_table):
    grid, text_len = (2, 3, 4), 5
    x = make_x(2, text_len, grid, 3, 64, layout="bhsd")
    rope = rotary_table(grid, 64, dtype=torch.float64) if use_table else RoPE3D(grid, 64)
    expected = apply_rope3d(x, rope, text_len=text_len)
    ptr = x.data_ptr()
    out = apply_rope3d(x, rope, text_len=text_len, inplace=True)
    assert out is x and x.data_ptr() == ptr
    torch.testing.assert_close(x, expected, **F64)


@pytest.mark.parametrize("use_table", [False, True])
def test_inplace_autograd(use_table):
    grid, text_len = (2, 2, 3), 2
    rope = rotary_table(grid, 16, dtype=torch.float64) if use_table else RoPE3D(grid, 16)
    leaf = make_x(1, text_len, grid, 2, 16).requires_grad_()
    g = torch.randn_like(leaf)
    (apply_rope3d(leaf * 1.0, rope, text_len=text_len, inplace=True) * g).sum().backward()
    expected = leaf.grad.clone()
    leaf.grad = None
    (apply_rope3d(leaf, rope, text_len=text_len) * g).sum().backward()
    torch.testing.assert_close(leaf.grad, expected, **F64)
    with pytest.raises(RuntimeError, match="leaf"):  # torch's own rule for in-place on leaves
        apply_rope3d(leaf, rope, text_len=text_len, inplace=True)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("text_len", [0, 3])
def test_gradcheck(interleaved, text_len):
    grid = (2, 2, 3)
    rope = RoPE3D(grid, 16, axes_dims=(4, 4, 6), interleaved=interleaved, positions=[torch.rand(n) * 3 for n in grid])
    x = make_x(2, text_len, grid, 2, 16, layout="bhsd").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rope3d(t, rope, text_len=text_len), (x,))
    assert torch.autograd.gradgradcheck(lambda t: apply_rope3d(t, rope, text_len=text_len), (x,))


def test_gradcheck_table():
    grid = (2, 2, 2)
    cos, sin = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    x = make_x(1, 2, grid, 2, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rope3d(t, (cos, sin), text_len=2), (x,))


def test_opcheck():
    grid, text_len = (2, 3, 2), 3
    x = make_x(2, text_len, grid, 2, 16, dtype=torch.float32)
    pos = torch.rand(7)
    args = (list(grid), [4, 6, 6], 10000.0, True, text_len, False)
    for positions in (None, pos):
        torch.library.opcheck(torch.ops.cogkern.rope3d, (x.clone().requires_grad_(), positions, *args))
        torch.library.opcheck(torch.ops.cogkern.rope3d_, (x.clone(), positions, *args))
    cos, sin = torch.randn(12, 16), torch.randn(12, 16)
    torch.library.opcheck(torch.ops.cogkern.rope_table, (x.clone().requires_grad_(), cos, sin, text_len, False))
    torch.library.opcheck(torch.ops.cogkern.rope_table_, (x.clone(), cos, sin, text_len, False))


def test_torch_compile_fullgraph():
    grid, text_len = (2, 3, 4), 5
    rope = RoPE3D(grid, 32)
    cos, sin = rotary_table(grid, 32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k):
        return apply_rope3d(q, rope, text_len=text_len) * 2 + apply_rope3d(k, (cos, sin), text_len=text_len)

    q = make_x(2, text_len, grid, 2, 32, dtype=torch.float32).requires_grad_()
    k = make_x(2, text_len, grid, 2, 32, dtype=torch.float32).requires_grad_()
    out = f(q, k)
    eager = apply_rope3d(q, rope, text_len=text_len) * 2 + apply_rope3d(k, (cos, sin), text_len=text_len)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    gq = q.grad.clone()
    q.grad = None
    eager.sum().backward()
    torch.testing.assert_close(gq, q.grad)


def test_torch_compile_inductor_inplace_no_grad():
    grid = (2, 2, 2)
    rope = RoPE3D(grid, 16)

    @torch.compile(fullgraph=True)
    def f(x):
        y = x + 1
        apply_rope3d(y, rope, text_len=1, inplace=True)
        return y

    x = make_x(1, 1, grid, 2, 16, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(f(x), apply_rope3d(x + 1, rope, text_len=1))


def test_cos_sin_tables_match_diffusers_construction():
    grid = (3, 4, 5)
    positions = [torch.linspace(0, 3, 3), torch.arange(4) * 0.5, torch.arange(5)]
    for rope, pos in ((RoPE3D(grid, 64), None), (RoPE3D(grid, 64, positions=positions), positions)):
        cos, sin = rope.cos_sin(dtype=torch.float64)
        ref_cos, ref_sin = rotary_table(grid, 64, positions=pos, dtype=torch.float64)
        torch.testing.assert_close(cos, ref_cos, **F64)
        torch.testing.assert_close(sin, ref_sin, **F64)
    cos, sin = RoPE3D(grid, 40, axes_dims=(8, 8, 8)).cos_sin()
    assert torch.equal(cos[:, 24:], torch.ones(60, 16)) and torch.equal(sin[:, 24:], torch.zeros(60, 16))
    with pytest.raises(ValueError, match="half-split"):
        RoPE3D(grid, 64, interleaved=False).cos_sin()


def test_default_axes_and_repr():
    r = RoPE3D((13, 30, 45), 64)
    assert r.axes_dims == (16, 24, 24) and r.num_video_tokens == 17550
    assert RoPE3D((1, 1, 1), 128).axes_dims == (32, 48, 48)
    assert "grid=(13, 30, 45)" in repr(r)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(2, 3)), "grid"),
        (dict(grid=(2, 0, 3)), "grid"),
        (dict(head_dim=15), "head_dim"),
        (dict(head_dim=8), "axes_dims"),  # default split 2/3/3 is odd
        (dict(axes_dims=(16, 24, 26)), "axes_dims"),
        (dict(axes_dims=(16, 24, 23)), "axes_dims"),
        (dict(axes_dims=(16, 24)), "axes_dims"),
        (dict(theta=0.0), "theta"),
        (dict(theta=float("inf")), "theta"),
        (dict(positions=(torch.arange(2), torch.arange(3), torch.arange(5))), "pos_w"),
        (dict(positions=(torch.arange(2),)), "positions"),
    ],
)
def test_bad_rope_construction(kwargs, match):
    args = dict(grid=(2, 3, 4), head_dim=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RoPE3D(**args)


def test_bad_apply_arguments():
    rope = RoPE3D((2, 3, 4), 64)
    x = make_x(1, 2, (2, 3, 4), 2, 64)
    cases = [
        (lambda: apply_rope3d(x[0], rope, text_len=2), "x must be 4-D"),
        (lambda: apply_rope3d(x, rope, text_len=3), "seq"),
        (lambda: apply_rope3d(x, rope, text_len=-1), "text_len"),
        (lambda: apply_rope3d(x, rope, text_len=2.0), "text_len"),
        (lambda: apply_rope3d(x.int(), rope, text_len=2), "x must be float16"),
        (lambda: apply_rope3d(x.transpose(2, 3), RoPE3D((2, 3, 4), 2), text_len=2), "head_dim|stride"),
        (lambda: apply_rope3d(make_x(1, 2, (2, 3, 4), 2, 32), rope, text_len=2), "head_dim"),
        (lambda: apply_rope3d(x, "nope", text_len=2), "rope must be"),
        (lambda: apply_rope3d(x, (torch.ones(24, 64),), text_len=2), "rope must be"),
        (lambda: apply_rope3d(x, (torch.ones(23, 64), torch.ones(23, 64)), text_len=2), "cos must have shape"),
        (lambda: apply_rope3d(x, (torch.ones(24, 64, dtype=torch.float16),) * 2, text_len=2), "float32 or x's dtype"),
        (lambda: apply_rope3d(x, (torch.ones(24, 64, requires_grad=True, dtype=torch.float64),) * 2, text_len=2),
         "detach"),
        (lambda: apply_rope3d(x.expand(2, -1, -1, -1), rope, text_len=2, inplace=True), "overlapping"),
        (lambda: apply_rope3d(x, (torch.ones(24, 64, device="meta"),) * 2, text_len=2),
         "rope cos must be on the CPU or a CUDA device"),
        (lambda: apply_rope3d(x.to("meta"), rope, text_len=2), "x must be on the CPU or a CUDA device"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_op_level_checks_raise_value_error():
    """Calling the registered op directly still gets ValueErrors naming the argument (no crash)."""
    x = torch.randn(1, 6, 1, 8)
    op = torch.ops.cogkern.rope3d
    with pytest.raises(ValueError, match="seq"):
        op(x, None, [1, 2, 2], [2, 2, 2], 10000.0, True, 0, False)
    with pytest.raises(ValueError, match="axes_dims"):
        op(x, None, [1, 2, 3], [4, 4, 4], 10000.0, True, 0, False)
    with pytest.raises(ValueError, match="positions"):
        op(x, torch.zeros(5, dtype=torch.float64), [1, 2, 3], [2, 2, 2], 10000.0, True, 0, False)
    with pytest.raises(ValueError, match="theta"):
        op(x, None, [1, 2, 3], [2, 2, 2], -1.0, True, 0, False)
    with pytest.raises(ValueError, match="stride"):
        op(torch.randn(1, 6, 1, 16)[..., ::2], None, [1, 2, 3], [2, 2, 2], 1e4, True, 0, False)
    with pytest.raises(ValueError, match="cos"):
        torch.ops.cogkern.rope_table(x, torch.ones(5, 8), torch.ones(6, 8), 0, False)
