// CUDA registration of the fused attention ops (kernels:
// csrc/attention/attention_launch.cu, flash_fwd_launch.cu, flash_bwd_launch.cu). The op
// bodies and argument checks are AttentionOps (attention/attention_op.h); this
// backend adds the CUDA-only checks, allocates the scratch buffers through
// the caching allocator (stream-ordered, CUDA-graph capturable) and launches
// on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "attention/attention_launch.h"
#include "attention/attention_op.h"

namespace cogkern::ops {
namespace {

// A [batch, seq, heads, head_dim] operand the kernels can load: the view
// itself when its rows are 16-byte aligned and no dimension is expanded
// (attention_rows_loadable), else a contiguous copy (kept alive in `keep`).
BshdTensor loadable_rows(const BshdTensor& t, const AttentionParams& P, const at::Tensor& q, at::Tensor& keep) {
  if (attention_rows_loadable(t, P)) return t;
  const at::Tensor view = at::from_blob(const_cast<void*>(t.ptr), q.sizes(),
                                        {t.stride_b, t.stride_s, t.stride_h, 1}, q.options());
  keep = view.clone(at::MemoryFormat::Contiguous);
  return bshd(keep);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cogkern fused_attention: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

struct CudaBackend {
  // Called by AttentionOps after the common checks, before any allocation or launch.
  static void check_supported(const char* op, const AttentionParams& P) {
    TORCH_CHECK_VALUE(is_cuda_dtype(P.dtype), op,
                      ": q must be float16 or bfloat16 on CUDA, got ",
                      P.dtype == DType::kFloat ? "float32" : "float64", " (float32 and float64 run on the CPU backend)");
    TORCH_CHECK_VALUE(attention_cuda_supported(P.dtype, P.head_dim), op,
                      ": q's head_dim must be ", attention_head_dims_text(), " on CUDA, got ", P.head_dim);
    // The kernels index tokens with 32-bit integers (and TMA coordinates are 32-bit).
    TORCH_CHECK_VALUE(P.seq < (int64_t(1) << 30), op, ": q's seq must be below 2**30 on CUDA, got ", P.seq);
  }

  static void forward(const AttentionParams& params, const at::Tensor& q) {
    check_supported("fused_attention", params);  // again: forward() must never launch on unsupported input
    const c10::cuda::CUDAGuard guard(q.device());
    AttentionParams P = params;
    at::Tensor v_copy;
    P.v = loadable_rows(P.v, P, q, v_copy);

    const auto shape = {P.batch, P.heads, P.seq, P.head_dim};
    const at::Tensor q_hat = at::empty(shape, q.options()), k_hat = at::empty(shape, q.options());
    AttentionScratch s;
    s.q_hat = q_hat.data_ptr();
    s.k_hat = k_hat.data_ptr();
    check_launch(launch_attention_forward(P, s, c10::cuda::getCurrentCUDAStream()), "forward");
  }

  static void backward(const AttentionParams& params, const at::Tensor& q) {
    check_supported("fused_attention_bwd", params);
    const c10::cuda::CUDAGuard guard(q.device());
    AttentionParams P = params;
    at::Tensor v_copy, grad_out_copy;
    P.v = loadable_rows(P.v, P, q, v_copy);
    P.grad_out = loadable_rows(P.grad_out, P, q, grad_out_copy);

    const auto shape = {P.batch, P.heads, P.seq, P.head_dim};
    const auto f32 = q.options().dtype(at::kFloat);
    const at::Tensor q_hat = at::empty(shape, q.options()), k_hat = at::empty(shape, q.options());
    const at::Tensor delta = at::empty({P.batch, P.heads, P.seq}, f32);
    const at::Tensor dq_hat = at::empty(shape, f32), dk_hat = at::empty(shape, f32);
    at::Tensor partials;
    AttentionScratch s;
    s.q_hat = q_hat.data_ptr();
    s.k_hat = k_hat.data_ptr();
    s.delta = delta.data_ptr<float>();
    s.dq_hat = dq_hat.data_ptr<float>();
    s.dk_hat = dk_hat.data_ptr<float>();
    if (P.norm != NormKind::kNone) {
      partials = at::empty({4 * P.head_dim * attention_norm_partial_blocks(P)}, f32);
      s.norm_partials = partials.data_ptr<float>();
    }
    // P.deterministic (torch.use_deterministic_algorithms(True)) selects the atomic-free dq path.
    check_launch(launch_attention_backward(P, s, P.deterministic, c10::cuda::getCurrentCUDAStream()), "backward");
  }
};
using CudaAttention = AttentionOps<CudaBackend>;

// [forward, backward]: the kernels fused_attention picks for q's dtype and head dim on q's device
// (attention_kernel_modes). For tests and benchmarks that must know which kernel they measured.
// The dtype of a q whose kernels are asked about (by `op`): float16 or bfloat16, a listed head dim.
DType kernel_query_dtype(const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda() && q.dim() == 4, op, ": q must be a 4-d CUDA tensor");
  TORCH_CHECK_VALUE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                    op, ": q must be float16 or bfloat16 on CUDA, got ", dtype_name(q.scalar_type()));
  const DType dtype = q.scalar_type() == at::kHalf ? DType::kHalf : DType::kBFloat16;
  TORCH_CHECK_VALUE(attention_cuda_supported(dtype, q.size(3)),
                    op, ": q's head_dim must be ", attention_head_dims_text(), ", got ", q.size(3));
  return dtype;
}

std::vector<int64_t> attention_cuda_kernels(const at::Tensor& q) {
  const DType dtype = kernel_query_dtype(q, "_attention_cuda_kernels");
  const c10::cuda::CUDAGuard guard(q.device());
  int forward = 0, backward = 0;
  check_launch(attention_kernel_modes(dtype, q.size(3), &forward, &backward), "kernel query");
  return {forward, backward};
}

// The first-use guard's verdict on a Hopper kernel mode (python/cogkern/_guard.py):
// retired for q's dtype and head dim on q's device (retire_attention_kernel_mode).
void attention_cuda_retire_kernel(const at::Tensor& q, bool backward, int64_t mode) {
  const DType dtype = kernel_query_dtype(q, "_attention_cuda_retire_kernel");
  TORCH_CHECK_VALUE(mode >= 1 && mode <= 4, "_attention_cuda_retire_kernel: mode must be a Hopper mode 1..4, got ",
                    mode);
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(retire_attention_kernel_mode(dtype, q.size(3), backward, static_cast<int>(mode)), "kernel retire");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cogkern, m) {
  m.def("_attention_cuda_kernels(Tensor q) -> int[]");
  m.def("_attention_cuda_retire_kernel(Tensor q, bool backward, int mode) -> ()");
}

TORCH_LIBRARY_IMPL(cogkern, CUDA, m) {
  m.impl("fused_attention_fwd", &CudaAttention::fwd);
  m.impl("fused_attention_bwd", &CudaAttention::bwd);
  m.impl("_attention_cuda_kernels", &attention_cuda_kernels);
  m.impl("_attention_cuda_retire_kernel", &attention_cuda_retire_kernel);
}

}  // namespace cogkern::ops
