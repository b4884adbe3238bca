"""The first-use guard (cogkern._guard, checks in cogkern._validate).

On the CPU through its test hooks: `cpu_for_tests` applies the guard to CPU tensors (the CPU
backend plays the kernel) and `inject_failure` makes a check see corrupted kernel results, as a
wrong kernel would give. Then: one warning naming the kernel and its error, the composite path's
results still correct (against float64), no second warning, COGKERN_VALIDATE=0 and strict, the
optimizer's RuntimeError, torch.compile. On a GPU (marker cuda): a retired Hopper mode falls back
to mma.sync, a configuration first met inside a CUDA graph capture is a clear error, the cost.
"""
import warnings

import pytest
import torch

import cogkern
from cogkern import _guard, _validate
from cogkern.optim import FusedAdamW
from cogkern.reference.attention_math import reference_attention
from cogkern.reference.rope_math import rope3d_reference


@pytest.fixture
def guarded(monkeypatch):
    monkeypatch.delenv("COGKERN_VALIDATE", raising=False)
    with _guard.cpu_for_tests():
        yield


def _case(dtype=torch.float64, seq=13 + 30, heads=3, head_dim=16, norm="layer_norm", rope_kind="rope3d", seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    text_len, grid = 13, (2, 3, 5)
    q, k, v = (randn(2, seq, heads, head_dim) for _ in range(3))
    rope = cogkern.RoPE3D(grid, head_dim)
    if rope_kind == "table":
        rope = rope.cos_sin(dtype=dtype)
    kwargs = dict(rope=rope, text_len=text_len, qk_norm=norm, q_norm_weight=randn(head_dim, scale=0.2, shift=1.0),
                  k_norm_weight=randn(head_dim, scale=0.2, shift=1.0))
    if norm == "layer_norm":
        kwargs.update(q_norm_bias=randn(head_dim, scale=0.2), k_norm_bias=randn(head_dim, scale=0.2))
    return q, k, v, kwargs


def _inputs(q, k, v, kwargs):
    return [q, k, v] + [t for n, t in kwargs.items() if n.endswith(("weight", "bias"))]


def _reference_kwargs(kwargs):
    ref = dict(kwargs)
    if isinstance(ref["rope"], cogkern.RoPE3D):
        ref["rope"] = ref["rope"].cos_sin(dtype=torch.float64)
    return ref


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, RuntimeWarning) and "cogkern" in str(w.message)]


# ---------------------------------------------------------------------------- attention


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("norm, rope_kind, causal", [("layer_norm", "rope3d", False), ("rms_norm", "table", True)])
def test_failed_attention_kernel_falls_back_to_composite_with_one_warning(guarded, direction, norm, rope_kind, causal):
    q, k, v, kwargs = _case(norm=norm, rope_kind=rope_kind)
    with _guard.inject_failure(f"attention.{direction}", "cpu"):
        (out, lse), caught = _warnings_of(
            lambda: cogkern.fused_attention(q, k, v, causal=causal, return_lse=True, **kwargs))
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"attention.{direction}[cpu]" in message and "> 2 x eager" in message and "composite" in message
    assert cogkern.attention_kernels(q) == {"forward": "composite", "backward": "composite"}

    # The composite path is right: against float64, output, lse and every gradient.
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, **_reference_kwargs(kwargs))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    inputs = _inputs(q, k, v, kwargs)
    got = torch.autograd.grad((out * grad).sum() + lse.sum(), inputs)
    want = torch.autograd.grad((ref_out * grad).sum() + ref_lse.sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    # The verdict holds: no second check, no second warning (the injection is over, too).
    out2, caught = _warnings_of(lambda: cogkern.fused_attention(q, k, v, causal=causal, **kwargs))
    assert caught == [] and torch.equal(out2, out)


def test_low_precision_composite_meets_the_flash_rule(guarded):
    # What the composite path gives a bf16 user is as good as eager PyTorch's (it is eager PyTorch).
    from cogkern.reference.flash_rule import RULE_NAMES, rule_errors

    with _guard.inject_failure("attention.forward", "cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cogkern.fused_attention(*(torch.randn(1, 8, 2, 64, dtype=torch.bfloat16) for _ in range(3)))
    assert cogkern.attention_kernels(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16))["forward"] == "composite"
    err, err_eager, finite = rule_errors(cogkern.fused_attention, 1, 13 + 60, 2, 64, 13, torch.bfloat16, "cpu")
    assert finite
    for name, e, ee in zip(RULE_NAMES, err, err_eager):
        assert e <= 2 * ee + 1e-5, (name, e, ee)


def test_passing_kernels_stay_in_use_silently_and_the_cost_is_recorded(guarded):
    q, k, v, kwargs = _case(dtype=torch.float32)
    out, caught = _warnings_of(lambda: cogkern.fused_attention(q, k, v, **kwargs))
    assert caught == []
    assert cogkern.attention_kernels(q)["forward"] == "cpu"
    costs = {key: s for key, s in _guard.check_costs().items() if key[0] == "attention"}
    assert len(costs) == 1 and all(0 < s < 30 for s in costs.values())
    print(f"first-use attention check on the CPU: {list(costs.values())[0] * 1e3:.0f} ms")  # pytest -s shows it
    # The check did not touch the caller's RNG.
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    _guard.reset()
    cogkern.fused_attention(q, k, v, **kwargs)
    assert torch.equal(torch.rand(3), before)


def test_validate_0_skips_the_checks(guarded, monkeypatch):
    monkeypatch.setenv("COGKERN_VALIDATE", "0")
    q, k, v, kwargs = _case()
    with _guard.inject_failure("attention.forward", "cpu"):
        _, caught = _warnings_of(lambda: cogkern.fused_attention(q, k, v, **kwargs))
    assert caught == [] and _guard.check_costs() == {}
    assert cogkern.attention_kernels(q)["forward"] == "cpu"


def test_validate_strict_raises(guarded, monkeypatch):
    monkeypatch.setenv("COGKERN_VALIDATE", "strict")
    q, k, v, kwargs = _case()
    with _guard.inject_failure("attention.backward", "cpu"), pytest.raises(RuntimeError, match=r"strict"):
        cogkern.fused_attention(q, k, v, **kwargs)


def test_a_bad_validate_setting_is_named(guarded, monkeypatch):
    monkeypatch.setenv("COGKERN_VALIDATE", "maybe")
    q, k, v, kwargs = _case()
    with pytest.raises(ValueError, match="COGKERN_VALIDATE"):
        cogkern.fused_attention(q, k, v, **kwargs)


def test_the_guard_traces_into_torch_compile_without_a_graph_break(guarded):
    q, k, v, kwargs = _case(dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v):
        return cogkern.fused_attention(q, k, v, **kwargs)

    torch._dynamo.reset()
    with _guard.inject_failure("attention.forward", "cpu"):
        out, caught = _warnings_of(lambda: attend(q, k, v))  # the check ran while tracing ...
    assert len(caught) == 1
    assert cogkern.attention_kernels(q)["forward"] == "composite"  # ... and the composite path was traced
    ref, _ = reference_attention(*(t.double() for t in (q, k, v)), **_reference_kwargs(
        {n: (t.double() if torch.is_tensor(t) else t) for n, t in kwargs.items()}))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("rope_kind", ["rope3d", "table"])
def test_failed_rope_kernel_falls_back_to_composite(guarded, inplace, rope_kind):
    grid, text_len, d = (3, 4, 5), 7, 32
    rope = cogkern.RoPE3D(grid, d)
    table = rope if rope_kind == "rope3d" else rope.cos_sin(dtype=torch.float64)
    x = torch.randn(2, text_len + 60, 3, d, dtype=torch.float64)
    ref = rope3d_reference(x, grid, rope.axes_dims, text_len=text_len)
    with _guard.inject_failure("rope", "cpu"):
        out, caught = _warnings_of(lambda: cogkern.apply_rope3d(x.clone() if inplace else x, table, text_len, inplace))
    assert len(caught) == 1 and "rope[cpu]" in str(caught[0].message)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Differentiable: the backward is the inverse rotation.
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    (gx,) = torch.autograd.grad(cogkern.apply_rope3d(xg, table, text_len), xg, grad)
    torch.testing.assert_close(gx, rope3d_reference(grad, grid, rope.axes_dims, text_len=text_len, inverse=True),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- optimizer


def test_failed_optimizer_check_raises_naming_the_check(guarded):
    p = torch.randn(10, 3, requires_grad=True)
    opt = FusedAdamW([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with _guard.inject_failure("optimizer", "fp32"):
        with pytest.raises(RuntimeError, match=r"optimizer\[fp32\] on cpu.*relative error"):
            opt.step()
    assert torch.equal(p.detach(), before)  # nothing was applied
    with pytest.raises(RuntimeError, match=r"optimizer\[fp32\]"):  # and never will be, in this process
        opt.step()


def test_passing_optimizer_modes_step_normally(guarded):
    for name, dtype, kw in _validate.OPTIMIZER_MODES:
        p = torch.randn(40, dtype=torch.float64).to(dtype).requires_grad_()
        opt = FusedAdamW([p], lr=1e-2, **kw)
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        opt.step()
        assert not torch.equal(p.detach(), before), name
        assert any(key[0] == "optimizer" and key[1] == dtype for key in _guard.check_costs()), name


# ---------------------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_checks_pass_on_the_cpu_backend_and_fail_on_injection(dtype):
    checks = _validate.check_attention(dtype, 64, "cpu") + [_validate.check_rope(dtype, "cpu")]
    assert all(c.passed for c in checks), [(c.name, c.error) for c in checks]
    assert all(c.figures and c.seconds > 0 for c in checks)
    with _guard.inject_failure("attention.backward", "cpu"), _guard.inject_failure("rope", "cpu"):
        fwd, bwd = _validate.check_attention(dtype, 64, "cpu")
        rope = _validate.check_rope(dtype, "cpu")
    assert fwd.passed and not bwd.passed and "dq error" in bwd.error and not rope.passed


# ---------------------------------------------------------------------------- on a GPU

cuda = pytest.mark.cuda


@cuda
def test_cuda_configuration_first_met_inside_a_capture_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("COGKERN_VALIDATE", raising=False)
    _guard.reset()
    q = torch.randn(1, 80, 2, 64, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(graph):
            cogkern.fused_attention(q, q, q)
    _guard.reset()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_first_use_checks_pass_and_cost_under_100_ms(monkeypatch, dtype):
    monkeypatch.delenv("COGKERN_VALIDATE", raising=False)
    _guard.reset()
    for head_dim in cogkern.attention.CUDA_HEAD_DIMS:
        q = torch.randn(1, 80, 2, head_dim, device="cuda", dtype=dtype)
        _, caught = _warnings_of(lambda: cogkern.fused_attention(q, q, q))
        assert caught == [], [str(w.message) for w in caught]
    x = torch.randn(1, 4 + 30, 2, 64, device="cuda", dtype=dtype)
    cogkern.apply_rope3d(x, cogkern.RoPE3D((2, 3, 5), 64), text_len=4)
    p = torch.randn(100, device="cuda", dtype=dtype, requires_grad=True)
    p.grad = torch.randn_like(p)
    FusedAdamW([p]).step()
    costs = _guard.check_costs()
    print({" ".join(map(str, k)): f"{s * 1e3:.1f} ms" for k, s in costs.items()})
    # The goal is 100 ms per configuration; the first one also pays for CUDA/cuBLAS start-up.
    assert sorted(costs.values())[len(costs) // 2] < 0.1, costs


@cuda
def test_cuda_failed_hopper_mode_is_retired_and_mma_sync_takes_over(monkeypatch):
    q = torch.randn(1, 80, 2, 128, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", "1")
    if cogkern.attention_kernels(q)["forward"] != "wgmma":
        pytest.skip("needs a Hopper GPU and an sm_90a build")
    monkeypatch.delenv("COGKERN_VALIDATE", raising=False)
    _guard.reset()
    try:
        with _guard.inject_failure("attention.forward", "wgmma"):
            out, caught = _warnings_of(lambda: cogkern.fused_attention(q, q, q))
        assert len(caught) == 1 and "attention.forward[wgmma]" in str(caught[0].message)
        assert "mma.sync" in str(caught[0].message)
        assert cogkern.attention_kernels(q)["forward"] == "mma.sync"  # retired for this process
        monkeypatch.setenv("COGKERN_VALIDATE", "0")
        monkeypatch.setenv("COGKERN_ATTENTION_SM90", "0")
        assert torch.equal(out, cogkern.fused_attention(q, q, q))  # what runs now is mma.sync
    finally:
        _guard.reset(retired=True)  # the later tests want their wgmma back
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", "1")
    assert cogkern.attention_kernels(q)["forward"] == "wgmma"
