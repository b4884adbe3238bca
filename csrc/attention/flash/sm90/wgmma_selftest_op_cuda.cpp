// torch.ops.cogkern._sm90_wgmma_selftest: runs the wgmma conformance kernel
// (csrc/attention/flash/sm90/wgmma_selftest_kernel.cuh) for tests/test_sm90_wgmma_cuda.py;
// tma=True loads its tiles through TMA and an mbarrier.
// A developer check of the Hopper building blocks, not part of the public API.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "attention/flash/sm90/wgmma_selftest_launch.h"
#include "common/dispatch.h"

namespace cogkern::ops {
namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                    " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == 64 && is_attention_head_dim(t.size(1)) && t.size(1) == q.size(1),
                    name, " must have shape (64, head_dim), head_dim ", attention_head_dims_text(), ", like q; got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wgmma_selftest(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                              bool tma) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor s = at::empty({64, 64}, f32), o = at::empty({64, q.size(1)}, f32), u = at::empty({64, q.size(1)}, f32);
  const cudaError_t err = sm90::launch_wgmma_selftest(q.data_ptr(), k.data_ptr(), v.data_ptr(), s.data_ptr<float>(),
                                                      o.data_ptr<float>(), u.data_ptr<float>(), int(q.size(1)),
                                                      q.scalar_type() == at::kBFloat16, tma,
                                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cogkern _sm90_wgmma_selftest: ", cudaGetErrorString(err),
              " (needs a compute capability 9.0 GPU and a build with TORCH_CUDA_ARCH_LIST including 9.0a)");
  return {s, o, u};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cogkern, m) {
  m.def("_sm90_wgmma_selftest(Tensor q, Tensor k, Tensor v, bool tma=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cogkern, CUDA, m) { m.impl("_sm90_wgmma_selftest", &wgmma_selftest); }

}  // namespace cogkern::ops
