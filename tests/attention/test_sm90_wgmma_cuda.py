"""The Hopper wgmma building blocks (csrc/common/cuda/sm90_wgmma.cuh) on real
hardware: descriptors, the 128-byte swizzle, accumulator and register-A
fragments, MN-major B, MN-major (transposed) A. One attention-shaped tile
(wgmma_selftest_kernel.cuh): S = Q K^T, O = 16bit(S) V and
U = V[:, :64]^T V against float64, with the tiles loaded by ordinary stores
and by TMA (tensor maps, mbarrier; ptx_sm90_async.cuh). Needs an sm_90 GPU and a build
that includes 9.0a; the same kernel source runs under the CPU emulator in
tests/test_cuda_emulator.py."""
import pytest
import torch

import cogkern
from cogkern.attention import CUDA_DTYPES, CUDA_HEAD_DIMS

pytestmark = [pytest.mark.cuda, pytest.mark.sm90]


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _hopper(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.skipif(not any(a.startswith("90a") for a in cogkern.build_info()["cuda_archs"]),
                    reason="this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)")
@pytest.mark.parametrize("tma", [False, True], ids=["stores", "tma"])
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_tile_matches_float64(dtype, head_dim, tma):
    q, k, v = (torch.randn(64, head_dim, device="cuda").to(dtype) for _ in range(3))
    s, o, u = torch.ops.cogkern._sm90_wgmma_selftest(q, k, v, tma)
    torch.cuda.synchronize()
    s_ref = q.double() @ k.double().T
    # O's reference takes the kernel's own S rounded to 16 bits, as the kernel feeds it.
    o_ref = s.to(dtype).double() @ v.double()
    # fp32 accumulation of exact 16-bit products: a few fp32 ulps of the largest value.
    assert (s.double() - s_ref).abs().max().item() <= 1e-5 * s_ref.abs().max().item()
    assert (o.double() - o_ref).abs().max().item() <= 1e-5 * o_ref.abs().max().item()
    u_ref = v[:, :64].double().T @ v.double()
    assert (u.double() - u_ref).abs().max().item() <= 1e-5 * u_ref.abs().max().item()


@pytest.mark.skipif(not _hopper(), reason="needs a compute capability 9.0 GPU")
def test_wgmma_selftest_names_bad_arguments():
    q = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="k must have shape"):
        torch.ops.cogkern._sm90_wgmma_selftest(q, q[:32], q)
    with pytest.raises(ValueError, match="v must have q's dtype"):
        torch.ops.cogkern._sm90_wgmma_selftest(q, q, q.half())
