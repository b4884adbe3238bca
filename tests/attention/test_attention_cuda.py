"""What the CUDA fused attention kernel must meet (skipped without a GPU).

FlashAttention's rule (cogkern.reference.flash_rule): output and every gradient within 2x
the error of eager PyTorch in the same dtype, against a float32 reference,
over the shapes CogVideoX uses and the edges around them.
"""
from __future__ import annotations

import pytest
import torch

import cogkern
from cogkern.attention import CUDA_DTYPES, CUDA_HEAD_DIMS
from cogkern.reference.attention_math import reference_attention
from cogkern.reference.diffusers_attention import eager_attention
from cogkern.reference.flash_rule import check_flash_rule, rule_case

pytestmark = pytest.mark.cuda

_HAS_CUDA_KERNEL = cogkern.build_info()["cuda_kernels"]
needs_kernel = pytest.mark.skipif(not _HAS_CUDA_KERNEL, reason="this build has no CUDA kernels")

SEQS = [1, 17, 128, 1000, 4096 + 113]

_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
_HAS_SM90A = any(a.startswith("90a") for a in cogkern.build_info()["cuda_archs"])
needs_sm90 = pytest.mark.skipif(not (_HAS_CUDA_KERNEL and _HOPPER and _HAS_SM90A),
                                reason="needs a compute capability 9.0 GPU and a build with sm_90a code")

# (COGKERN_ATTENTION_SM90, COGKERN_ATTENTION_SM90_BWD): the default kernels, and the
# warp-specialized Hopper pair (TMA, mbarriers), which must keep every promise the
# default ones do before they can become the default (device_check.sh runs the
# latter in its warp-specialized step: -m sm90 -k warp).
KERNEL_PAIRS = [
    pytest.param("0", "0", id="default"),
    pytest.param("4", "3", marks=[needs_sm90, pytest.mark.sm90], id="warp-specialized"),
]


def _use_kernels(monkeypatch, forward, backward):
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", forward)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90_BWD", backward)
    q = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert tuple(torch.ops.cogkern._attention_cuda_kernels(q)) == (int(forward), int(backward))


def _configs():
    for seq in SEQS:
        for text_len in (0, 226):
            if text_len > seq:
                continue
            for head_dim in CUDA_HEAD_DIMS:
                for batch in (1, 2):
                    for dtype in CUDA_DTYPES:
                        yield pytest.param(batch, seq, head_dim, text_len, dtype,
                                           id=f"B{batch}-S{seq}-D{head_dim}-text{text_len}-{str(dtype)[6:]}")  # fmt: skip


def test_cuda_tensors_raise_clearly_in_a_cpu_only_build():
    if _HAS_CUDA_KERNEL:
        pytest.skip("this build has the CUDA kernels")
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="built without CUDA kernels"):
        cogkern.fused_attention(q, q, q)


@needs_kernel
@pytest.mark.parametrize("batch, seq, head_dim, text_len, dtype", list(_configs()))
def test_flash_attention_error_rule(batch, seq, head_dim, text_len, dtype):
    check_flash_rule(batch, seq, 3, head_dim, text_len, dtype, "cuda")


@needs_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_other_head_dims_work_or_raise_a_value_error(dtype):
    # Head dims other than CUDA_HEAD_DIMS may be unsupported, but then with a ValueError naming head_dim.
    q, k, v = (torch.randn(1, 16, 2, 40, device="cuda", dtype=dtype) for _ in range(3))
    try:
        out = cogkern.fused_attention(q, k, v)
    except ValueError as exc:
        assert "head_dim" in str(exc)
        assert all(str(d) in str(exc) for d in CUDA_HEAD_DIMS), exc  # the message lists the supported ones
        return
    ref, _ = reference_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@needs_kernel
def test_a_sequence_too_long_for_32_bit_token_indices_raises_before_any_launch():
    # Expanded views: 2**30 tokens that take no memory; the check must come first.
    q = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16).expand(1, 2**30, 1, 64)
    with pytest.raises(ValueError, match="seq must be below 2\\*\\*30"):
        cogkern.fused_attention(q, q, q)


@needs_kernel
def test_cogvideox_5b_shape():
    """batch 1, S = 17,776 (226 text + 13x30x45 video), 48 heads, D = 64, bf16: no NaN anywhere,
    and the error rule on two heads (heads are independent, so a slice is exact)."""
    seq, heads, head_dim, text_len = 17776, 48, 64, 226
    q, k, v, norms, rope, table = rule_case(1, seq, heads, head_dim, text_len, torch.bfloat16, "cuda", grid=(13, 30, 45))
    (qw, qb), (kw, kb) = norms
    kwargs = dict(rope=rope, text_len=text_len, qk_norm="layer_norm",
                  q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb)  # fmt: skip
    out = cogkern.fused_attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    dq, dk, dv, *dnorm = torch.autograd.grad(out, [q, k, v, qw, qb, kw, kb], grad_out)
    for t in (out, dq, dk, dv, *dnorm):
        assert not torch.isnan(t).any()

    heads_slice = slice(0, 2)
    parts = [t.detach()[:, :, heads_slice] for t in (q, k, v)]
    ref_in = [p.float().requires_grad_() for p in parts]
    ref_out, _ = reference_attention(*ref_in, rope=table, text_len=text_len, qk_norm="layer_norm",
                                     q_norm_weight=qw.detach().float(), q_norm_bias=qb.detach().float(),
                                     k_norm_weight=kw.detach().float(), k_norm_bias=kb.detach().float())  # fmt: skip
    g = grad_out[:, :, heads_slice]
    ref_grads = torch.autograd.grad(ref_out, ref_in, g.float())
    eager_in = [p.clone().requires_grad_() for p in parts]
    eager_out = eager_attention(*eager_in, tuple((w.detach(), b.detach()) for w, b in norms), table, text_len)
    eager_grads = torch.autograd.grad(eager_out, eager_in, g)
    ours = [out[:, :, heads_slice], dq[:, :, heads_slice], dk[:, :, heads_slice], dv[:, :, heads_slice]]
    for name, mine, eager, ref in zip(["out", "dq", "dk", "dv"], ours, [eager_out, *eager_grads], [ref_out, *ref_grads]):
        err = (mine.float() - ref).abs().max().item()
        err_eager = (eager.float() - ref).abs().max().item()
        assert err <= 2 * err_eager + 1e-5, f"{name}: {err:.3e} > 2 x {err_eager:.3e}"


# ----------------------------------------------------------------------------- determinism, streams, graphs, edges


def _norm_rope_case(seq=300, head_dim=64, dtype=torch.bfloat16, batch=1, heads=2, text_len=17):
    q, k, v, norms, rope, _ = rule_case(batch, seq, heads, head_dim, text_len, dtype, "cuda")
    (qw, qb), (kw, kb) = norms
    kwargs = dict(rope=rope, text_len=text_len, qk_norm="layer_norm",
                  q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb)  # fmt: skip
    return q, k, v, kwargs


def _forward_backward(q, k, v, kwargs, grad_out):
    out = cogkern.fused_attention(q, k, v, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@needs_kernel
@pytest.mark.parametrize("head_dim, causal", [(64, False), (128, True)])
def test_deterministic_backward_is_bitwise_reproducible(deterministic_algorithms, head_dim, causal):
    """torch.use_deterministic_algorithms(True) selects the atomic-free dq path."""
    q, k, v, kwargs = _norm_rope_case(seq=1000, head_dim=head_dim)
    kwargs["causal"] = causal
    grad_out = torch.randn_like(q)
    first = _forward_backward(q, k, v, kwargs, grad_out)
    second = _forward_backward(q, k, v, kwargs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.use_deterministic_algorithms(False)
    atomic = _forward_backward(q, k, v, kwargs, grad_out)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
@pytest.mark.parametrize("forward, backward", KERNEL_PAIRS)
def test_runs_on_the_current_stream(monkeypatch, forward, backward):
    """Every launch goes to the caller's stream: inputs written on a side stream after a long
    sleep are read only once they exist."""
    _use_kernels(monkeypatch, forward, backward)
    q, k, v, kwargs = _norm_rope_case()
    grad_out = torch.randn_like(q)
    expected = _forward_backward(q, k, v, kwargs, grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning before q2 is written
        q2 = (q.detach() * 1).requires_grad_()
        got = _forward_backward(q2, k, v, kwargs, grad_out)
    side.synchronize()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
@pytest.mark.parametrize("forward, backward", KERNEL_PAIRS)
def test_forward_and_backward_capture_into_a_cuda_graph(monkeypatch, deterministic_algorithms, forward, backward):
    """Graph replay on new inputs in the same storage gives what eager calls give (TMA tensor maps
    are kernel parameters: captured with the scratch addresses of the graph's own pool)."""
    _use_kernels(monkeypatch, forward, backward)
    q, k, v, kwargs = _norm_rope_case()
    grad_out = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph wants
        for _ in range(2):
            _forward_backward(q, k, v, kwargs, grad_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _forward_backward(q, k, v, kwargs, grad_out)
    with torch.no_grad():  # new inputs, same storage
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = _forward_backward(q, k, v, kwargs, grad_out)
    for a, b in zip(static, expected):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_large_fp16_inputs_do_not_overflow(head_dim):
    """Scores far beyond fp16's range (|q.k| ~ 1e5): fp32 scores and scaling before exp keep it finite."""
    q, k, v = (torch.randn(1, 257, 2, head_dim, device="cuda") for _ in range(3))
    q, k = q * 60, k * 60
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    out = cogkern.fused_attention(q, k, v)
    ref, _ = reference_attention(q.detach().float(), k.detach().float(), v.detach().float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@needs_kernel
def test_nan_in_one_query_row_stays_in_that_row():
    q, k, v = (torch.randn(1, 200, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q[0, 7, 1, 3] = float("nan")
    out = cogkern.fused_attention(q, k, v)
    assert torch.isnan(out[0, 7, 1]).all()
    assert int(torch.isnan(out).sum()) == 64


@needs_kernel
@pytest.mark.parametrize("forward, backward", KERNEL_PAIRS)
def test_nan_in_one_key_row_makes_every_row_of_its_head_nan(monkeypatch, forward, backward):
    """One NaN score among finite ones in every query row of head 0: the kernels' row max (fmaxf)
    drops it, so only its exponential carries it into l, lse and O (flash_common.cuh)."""
    _use_kernels(monkeypatch, forward, backward)
    q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k[0, 123, 0, 5] = float("nan")
    out, lse = cogkern.fused_attention(q, k, v, return_lse=True)
    assert torch.isnan(out[0, :, 0]).all() and not torch.isnan(out[0, :, 1]).any()
    assert torch.isnan(lse[0, 0]).all() and not torch.isnan(lse[0, 1]).any()


@needs_kernel
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_rows_not_16_byte_aligned_give_their_contiguous_copies_results(deterministic_algorithms, head_dim):
    """The row kernels load and store 16 bytes per lane: q, k and grad_out views whose rows start
    2 bytes past a 16-byte boundary go through contiguous copies, bit for bit their results."""
    def offset_view(shape):
        return torch.randn(*shape[:3], shape[3] + 1, device="cuda", dtype=torch.float16)[..., 1:]

    shape = (2, 77, 3, head_dim)
    q, k, v, grad_out = (offset_view(shape) for _ in range(4))
    w = [torch.randn(head_dim, device="cuda") for _ in range(2)]
    results = []
    for tensors in ((q, k, v, grad_out), tuple(t.contiguous() for t in (q, k, v, grad_out))):
        leaves = [t.detach().clone() if t.is_contiguous() else t.detach() for t in tensors[:3]]
        leaves = [t.requires_grad_() for t in leaves]
        weights = [t.clone().requires_grad_() for t in w]
        out = cogkern.fused_attention(*leaves, qk_norm="rms_norm", q_norm_weight=weights[0], k_norm_weight=weights[1])
        out.backward(tensors[3])
        results.append([out] + [t.grad for t in leaves + weights])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dqw", "dkw"), *results):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- Hopper (wgmma) forward


def _selected_kernels(head_dim, dtype=torch.bfloat16):
    """(forward, backward) kernels fused_attention picks now: 0 mma.sync, else the wgmma variant."""
    q = torch.empty(1, 1, 1, head_dim, device="cuda", dtype=dtype)
    return tuple(torch.ops.cogkern._attention_cuda_kernels(q))


@needs_kernel
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_the_default_kernels_are_the_mma_sync_ones(monkeypatch, head_dim):
    """The wgmma kernels are opt-in; unknown values of the switches keep the default too."""
    monkeypatch.delenv("COGKERN_ATTENTION_SM90", raising=False)
    monkeypatch.delenv("COGKERN_ATTENTION_SM90_BWD", raising=False)
    assert _selected_kernels(head_dim) == (0, 0)
    q = torch.empty(1, 1, 1, head_dim, device="cuda", dtype=torch.float16)
    assert cogkern.attention_kernels(q) == {"forward": "mma.sync", "backward": "mma.sync"}
    for forward, backward in (("yes", "4"), ("5", "0"), ("33", "12"), ("0", "0"), ("", " 1")):
        monkeypatch.setenv("COGKERN_ATTENTION_SM90", forward)
        monkeypatch.setenv("COGKERN_ATTENTION_SM90_BWD", backward)
        assert _selected_kernels(head_dim) == (0, 0)


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("mode", ["1", "2", "3", "4"],
                         ids=["plain", "pipelined", "warp-specialized", "warp-specialized-pingpong"])
@pytest.mark.parametrize("batch, seq, head_dim, text_len, dtype", [
    (1, 1, 64, 0, torch.bfloat16), (2, 17, 128, 0, torch.float16), (1, 1000, 64, 226, torch.bfloat16),
    (1, 4096 + 113, 64, 226, torch.float16), (2, 1000, 128, 226, torch.bfloat16), (1, 4096 + 113, 128, 0, torch.bfloat16),
])  # fmt: skip
def test_sm90_forward_error_rule(monkeypatch, batch, seq, head_dim, text_len, dtype, mode):
    """COGKERN_ATTENTION_SM90=1|2|3|4: the wgmma forward, plain or pipelined (flash_fwd_sm90_kernel.cuh)
    or warp-specialized with TMA loads, without or with ping-pong (flash_fwd_sm90_ws_kernel.cuh), and
    the backward on its out and lse."""
    monkeypatch.delenv("COGKERN_ATTENTION_SM90_BWD", raising=False)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", mode)
    assert _selected_kernels(head_dim, dtype) == (int(mode), 0)  # the wgmma forward really runs
    check_flash_rule(batch, seq, 3, head_dim, text_len, dtype, "cuda")


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("mode", ["1", "2", "3", "4"],
                         ids=["plain", "pipelined", "warp-specialized", "warp-specialized-pingpong"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_sm90_forward_agrees_with_the_mma_sync_forward(monkeypatch, head_dim, causal, mode):
    for name in ("COGKERN_ATTENTION_SM90", "COGKERN_ATTENTION_SM90_BWD"):
        monkeypatch.delenv(name, raising=False)
    q, k, v = (torch.randn(2, 700, 3, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    base, base_lse = cogkern.fused_attention(q, k, v, causal=causal, return_lse=True)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", mode)
    assert _selected_kernels(head_dim) == (int(mode), 0)
    out, lse = cogkern.fused_attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(lse, base_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), base.float(), rtol=2e-2, atol=2e-2)


def _v_layouts(batch, seq, heads, head_dim, dtype):
    """v as callers hand it over: contiguous, diffusers' (B, H, S, D) transposed view, a slice of a
    fused qkv projection, and with size-1 batch and heads whose strides say nothing."""
    x = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype)
    bhsd = x.transpose(1, 2).contiguous().transpose(1, 2)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=dtype)
    qkv[:, :, 2] = x
    odd = torch.empty(batch, seq, heads, head_dim, device="cuda", dtype=dtype)
    if batch == 1 and heads == 1:  # strides of size-1 dims that no contiguous tensor has
        odd = torch.empty_strided((1, seq, 1, head_dim), (8, head_dim, 24, 1), device="cuda", dtype=dtype)
    odd.copy_(x)
    return {"contiguous": x, "bhsd": bhsd, "qkv-slice": qkv[:, :, 2], "odd-strides": odd}


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("mode", ["3", "4"])
@pytest.mark.parametrize("batch, heads", [(2, 3), (1, 1)])
def test_sm90_warp_specialized_forward_reads_every_v_layout(monkeypatch, batch, heads, mode):
    """COGKERN_ATTENTION_SM90=3|4 load v through a 4-D TMA map built from v's strides: every layout
    gives the mma.sync forward's result."""
    for name in ("COGKERN_ATTENTION_SM90", "COGKERN_ATTENTION_SM90_BWD"):
        monkeypatch.delenv(name, raising=False)
    q, k = (torch.randn(batch, 300, heads, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    layouts = _v_layouts(batch, 300, heads, 64, torch.float16)
    base = cogkern.fused_attention(q, k, layouts["contiguous"])
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", mode)
    assert cogkern.attention_kernels(q)["forward"] == {"3": "wgmma-ws", "4": "wgmma-ws-pingpong"}[mode]
    for name, v in layouts.items():
        torch.testing.assert_close(cogkern.fused_attention(q, k, v).float(), base.float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda m, name=name: f"v {name}: {m}")


@needs_kernel
@pytest.mark.parametrize("forward, backward", KERNEL_PAIRS)
def test_expanded_v_and_grad_out_give_their_contiguous_copies_results(monkeypatch, deterministic_algorithms,
                                                                      forward, backward):
    """v broadcast over heads (stride 0) and a grad_out broadcast over tokens and heads (strides
    64, 0, 0, 1, as a sum's backward hands it over): every kernel gets an operand it can load (TMA
    maps take no zero strides), bit for bit the result of passing contiguous copies."""
    _use_kernels(monkeypatch, forward, backward)
    q, k = (torch.randn(2, 300, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 300, 1, 64, device="cuda", dtype=torch.bfloat16).expand(2, 300, 3, 64)
    grad_out = torch.randn(2, 1, 1, 64, device="cuda", dtype=torch.bfloat16).expand(2, 300, 3, 64)
    results = []
    for v_in, g in ((v, grad_out), (v.contiguous(), grad_out.contiguous())):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k)] + [v_in.detach().requires_grad_()]
        out = cogkern.fused_attention(*leaves)
        out.backward(g)
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- Hopper (wgmma) backward


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("forward, mode", [("mma.sync", "1"), ("sm90-pipelined", "2"), ("sm90-ws-pingpong", "3")],
                         ids=["mma.sync-fwd-2wg", "sm90-fwd-1wg", "warp-specialized-fwd-bwd"])
@pytest.mark.parametrize("batch, seq, head_dim, text_len, dtype", [
    (1, 1, 64, 0, torch.bfloat16), (2, 17, 128, 0, torch.float16), (1, 1000, 64, 226, torch.bfloat16),
    (1, 4096 + 113, 64, 226, torch.float16), (2, 1000, 128, 226, torch.bfloat16), (1, 4096 + 113, 128, 0, torch.bfloat16),
])  # fmt: skip
def test_sm90_backward_error_rule(monkeypatch, batch, seq, head_dim, text_len, dtype, forward, mode):
    """COGKERN_ATTENTION_SM90_BWD=1|2|3: the wgmma key-tile backward with two warpgroups per block
    after the mma.sync forward, with one after the pipelined wgmma forward (flash_bwd_sm90_kernel.cuh),
    and warp-specialized after the warp-specialized ping-pong forward (flash_bwd_sm90_ws_kernel.cuh)."""
    forward_mode = {"mma.sync": "0", "sm90-pipelined": "2", "sm90-ws-pingpong": "4"}[forward]
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", forward_mode)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90_BWD", mode)
    assert _selected_kernels(head_dim, dtype) == (int(forward_mode), int(mode))
    q = torch.empty(1, 1, 1, head_dim, device="cuda", dtype=dtype)
    assert cogkern.attention_kernels(q) == {
        "forward": {"0": "mma.sync", "2": "wgmma-pipelined", "4": "wgmma-ws-pingpong"}[forward_mode],
        "backward": {"1": "wgmma-2wg", "2": "wgmma-1wg", "3": "wgmma-ws"}[mode]}
    check_flash_rule(batch, seq, 3, head_dim, text_len, dtype, "cuda")


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("mode", ["1", "2", "3"], ids=["2wg", "1wg", "warp-specialized"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_sm90_backward_agrees_with_the_mma_sync_backward(monkeypatch, head_dim, causal, deterministic, mode):
    for name in ("COGKERN_ATTENTION_SM90", "COGKERN_ATTENTION_SM90_BWD"):
        monkeypatch.delenv(name, raising=False)
    q, k, v, kwargs = _norm_rope_case(seq=700, head_dim=head_dim, batch=2, heads=3)
    kwargs["causal"] = causal
    grad_out = torch.randn_like(q)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    try:
        base = _forward_backward(q, k, v, kwargs, grad_out)
        monkeypatch.setenv("COGKERN_ATTENTION_SM90_BWD", mode)
        assert _selected_kernels(head_dim) == (0, int(mode))
        got = _forward_backward(q, k, v, kwargs, grad_out)
        if deterministic:
            again = _forward_backward(q, k, v, kwargs, grad_out)
            assert all(torch.equal(a, b) for a, b in zip(got, again))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(got, base):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
