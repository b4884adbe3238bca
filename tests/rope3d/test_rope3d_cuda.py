"""3D RoPE on CUDA (skipped without a GPU). Every kernel path: vectorized,
element-wise (misaligned views), half-split pairs, table mode with fp32 and
low-precision tables, in-place, backward, the CogVideoX-5B grid."""
import pytest
import torch

from cogkern import RoPE3D, apply_rope3d
from conftest import GPU_TEST_DEVICE as DEV
from cogkern.reference.diffusers_attention import apply_rotary_emb, rotary_table
from cogkern.reference.rope_math import apply_table_reference, rope3d_reference

pytestmark = pytest.mark.cuda
CPU_DRY_RUN = True  # COGKERN_CUDA_TESTS_DEVICE=cpu runs these against the CPU backend (conftest.py)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def cuda_x(batch, s, heads, d, dtype, layout="bshd"):
    if layout == "bshd":
        return torch.randn(batch, s, heads, d, device=DEV, dtype=dtype)
    if layout == "bhsd":
        return torch.randn(batch, heads, s, d, device=DEV, dtype=dtype).transpose(1, 2)
    if layout == "misaligned":  # offset by one element: not 16-byte aligned -> element-wise path
        return torch.randn(batch, s, heads, d + 1, device=DEV, dtype=dtype)[..., 1:]
    raise ValueError(layout)


def assert_within_rounding(out, ref, dtype, angle_max):
    """Kernel: fp32 math, one rounding. Allowed: one ulp of the output dtype plus the fp32 angle error."""
    tol = torch.finfo(dtype).eps + 4 * angle_max * torch.finfo(torch.float32).eps
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "misaligned"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_matches_reference(dtype, layout, interleaved):
    grid, text_len, heads = (3, 5, 7), 13, 3
    rope = RoPE3D(grid, 64, interleaved=interleaved)
    x = cuda_x(2, text_len + 105, heads, 64, dtype, layout)
    out = apply_rope3d(x, rope, text_len=text_len)
    ref = rope3d_reference(x.cpu(), grid, rope.axes_dims, interleaved=interleaved, text_len=text_len)
    assert_within_rounding(out.cpu(), ref, dtype, angle_max=7)
    assert torch.equal(out[:, :text_len], x[:, :text_len])


@pytest.mark.parametrize("head_dim,axes", [(128, None), (72, (8, 32, 24)), (16, (2, 6, 6)), (256, (64, 96, 96))])
def test_other_head_dims(head_dim, axes):
    grid = (2, 3, 5)
    rope = RoPE3D(grid, head_dim, axes_dims=axes, positions=[torch.rand(n) * 20 for n in grid])
    x = cuda_x(1, 4 + 30, 5, head_dim, torch.bfloat16)
    out = apply_rope3d(x, rope, text_len=4)
    ref = rope3d_reference(x.cpu(), grid, rope.axes_dims, text_len=4, positions=rope.positions)
    assert_within_rounding(out.cpu(), ref, torch.bfloat16, angle_max=20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_dtype", ["float32", "same"])
def test_table_mode(dtype, table_dtype):
    grid, text_len = (3, 4, 6), 5
    tdt = torch.float32 if table_dtype == "float32" else dtype
    cos, sin = (t.to(DEV, tdt) for t in rotary_table(grid, 64))
    x = cuda_x(2, text_len + 72, 2, 64, dtype, "bhsd")
    out = apply_rope3d(x, (cos, sin), text_len=text_len)
    ref = apply_table_reference(x.cpu(), cos.cpu(), sin.cpu(), text_len)
    # the same as diffusers' own formula in the same dtype, up to one rounding
    eager = apply_rotary_emb(x[:, text_len:].transpose(1, 2), (cos, sin)).transpose(1, 2)
    err = (out[:, text_len:].double().cpu() - ref[:, text_len:]).abs().max().item()
    err_eager = (eager.double().cpu() - ref[:, text_len:]).abs().max().item()
    assert err <= max(2 * err_eager, 1e-6), (err, err_eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["rope3d", "table", "halfsplit"])
def test_inplace_and_backward(dtype, mode):
    grid, text_len = (2, 5, 3), 7
    if mode == "table":
        rope = tuple(t.to(DEV) for t in rotary_table(grid, 64))
    else:
        rope = RoPE3D(grid, 64, interleaved=mode != "halfsplit")
    x = cuda_x(2, text_len + 30, 4, 64, dtype, "bhsd")
    expected = apply_rope3d(x, rope, text_len=text_len)
    y = x.clone()
    assert apply_rope3d(y, rope, text_len=text_len, inplace=True) is y
    assert torch.equal(y, expected)  # same kernel, same rounding
    # backward: the inverse rotation, checked against the float64 autograd of the reference
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(xg)
    apply_rope3d(xg, rope, text_len=text_len).backward(g)
    x64 = x.detach().cpu().double().requires_grad_()
    if mode == "table":
        ref = apply_table_reference(x64, *(t.cpu() for t in rope), text_len)
    else:
        ref = rope3d_reference(x64, grid, rope.axes_dims, interleaved=rope.interleaved, text_len=text_len)
    ref.backward(g.cpu().double())
    assert_within_rounding(xg.grad.cpu(), x64.grad, dtype, angle_max=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cogvideox_5b_grid(dtype):
    """The 5B shape: 13 x 30 x 45 video tokens after 226 text tokens, 48 heads, D=64."""
    grid, text_len = (13, 30, 45), 226
    rope = RoPE3D(grid, 64)
    x = cuda_x(1, text_len + 17550, 48, 64, dtype, "bhsd")
    out = apply_rope3d(x, rope, text_len=text_len)
    assert torch.isfinite(out).all()
    cos, sin = (t.to(DEV) for t in rotary_table(grid, 64))
    eager = apply_rotary_emb(x[:, text_len:].transpose(1, 2), (cos, sin)).transpose(1, 2)
    # one rounding from fp32 math on both sides; they may differ by one ulp
    diff = (out[:, text_len:].float() - eager.float()).abs() / eager.float().abs().clamp_min(1.0)
    assert diff.max().item() <= 2 * torch.finfo(dtype).eps
    # a slice against the float64 reference (token positions up to 44)
    sl = slice(text_len + 17550 - 300, None)
    ref = rope3d_reference(x.cpu(), grid, rope.axes_dims, text_len=text_len)[:, sl]
    assert_within_rounding(out[:, sl].cpu(), ref, dtype, angle_max=45)


needs_real_gpu = pytest.mark.skipif(DEV != "cuda", reason="needs a real GPU")


@needs_real_gpu
def test_streams_and_graph_capture():
    grid = (2, 3, 4)
    rope = RoPE3D(grid, 64, positions=[torch.rand(n) for n in grid])
    x = cuda_x(1, 24, 2, 64, torch.bfloat16)
    expected = apply_rope3d(x, rope)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        apply_rope3d(x, rope)  # warm-up on the side stream (positions cached on device)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = apply_rope3d(x, rope)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@needs_real_gpu
def test_cuda_rejects_float64_and_device_mismatch():
    x = cuda_x(1, 6, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        apply_rope3d(x.double(), RoPE3D((1, 2, 3), 8, axes_dims=(2, 2, 2)))
    with pytest.raises(ValueError, match="cos is on"):
        apply_rope3d(x, (torch.ones(6, 8), torch.ones(6, 8)))


@needs_real_gpu
def test_cuda_rejects_a_head_dim_beyond_its_shared_memory():
    """One token's coefficients (head_dim / 2 x 16 bytes) must fit 48 KB: a clear ValueError beyond, no launch error."""
    x = cuda_x(1, 6, 1, 6146, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be at most 6144"):
        apply_rope3d(x, RoPE3D((1, 2, 3), 6146, axes_dims=(2, 2, 2)))
    apply_rope3d(x[..., :6144], RoPE3D((1, 2, 3), 6144, axes_dims=(2, 2, 2)))  # the largest one still runs
