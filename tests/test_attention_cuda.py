"""What the CUDA fused attention kernel must meet (skipped without a GPU).

FlashAttention's rule (attention_rule.py): output and every gradient within 2x
the error of eager PyTorch in the same dtype, against a float32 reference,
over the shapes CogVideoX uses and the edges around them.
"""
from __future__ import annotations

import pytest
import torch

import cogkern
from attention_reference import reference_attention
from attention_rule import check_flash_rule, eager_attention, rule_case

pytestmark = pytest.mark.cuda

_HAS_CUDA_KERNEL = cogkern.build_info()["cuda_kernels"]
needs_kernel = pytest.mark.skipif(not _HAS_CUDA_KERNEL, reason="this build has no CUDA kernels")

SEQS = [1, 17, 128, 1000, 4096 + 113]


def _configs():
    for seq in SEQS:
        for text_len in (0, 226):
            if text_len > seq:
                continue
            for head_dim in (64, 128):
                for batch in (1, 2):
                    for dtype in (torch.float16, torch.bfloat16):
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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_head_dims_work_or_raise_a_value_error(dtype):
    # Head dims other than 64 and 128 may be unsupported, but then with a ValueError naming head_dim.
    q, k, v = (torch.randn(1, 16, 2, 40, device="cuda", dtype=dtype) for _ in range(3))
    try:
        out = cogkern.fused_attention(q, k, v)
    except ValueError as exc:
        assert "head_dim" in str(exc)
        return
    ref, _ = reference_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


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


# ----------------------------------------------------------------------------- Hopper (wgmma) forward

_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
_HAS_SM90A = any(a.startswith("90a") for a in cogkern.build_info()["cuda_archs"])
needs_sm90 = pytest.mark.skipif(not (_HAS_CUDA_KERNEL and _HOPPER and _HAS_SM90A),
                                reason="needs a compute capability 9.0 GPU and a build with sm_90a code")


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("mode", ["1", "2"], ids=["plain", "pipelined"])
@pytest.mark.parametrize("batch, seq, head_dim, text_len, dtype", [
    (1, 1, 64, 0, torch.bfloat16), (2, 17, 128, 0, torch.float16), (1, 1000, 64, 226, torch.bfloat16),
    (1, 4096 + 113, 64, 226, torch.float16), (2, 1000, 128, 226, torch.bfloat16), (1, 4096 + 113, 128, 0, torch.bfloat16),
])  # fmt: skip
def test_sm90_forward_error_rule(monkeypatch, batch, seq, head_dim, text_len, dtype, mode):
    """COGKERN_ATTENTION_SM90=1|2: the wgmma forward (flash_fwd_sm90_kernel.cuh), plain or pipelined,
    and the backward on its out and lse."""
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", mode)
    check_flash_rule(batch, seq, 3, head_dim, text_len, dtype, "cuda")


@needs_sm90
@pytest.mark.sm90
@pytest.mark.parametrize("mode", ["1", "2"], ids=["plain", "pipelined"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_forward_agrees_with_the_mma_sync_forward(monkeypatch, head_dim, causal, mode):
    q, k, v = (torch.randn(2, 700, 3, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    base, base_lse = cogkern.fused_attention(q, k, v, causal=causal, return_lse=True)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", mode)
    out, lse = cogkern.fused_attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(lse, base_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), base.float(), rtol=2e-2, atol=2e-2)
