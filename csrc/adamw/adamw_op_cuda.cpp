// CUDA registration of the optimizer ops (kernels: csrc/adamw/adamw_launch.cu).
// Everything is enqueued on torch's current stream; nothing synchronizes.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adamw/adamw_launch.h"
#include "adamw/adamw_op.h"

namespace cogkern::ops {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cogkern ", what, " CUDA launch failed: ", cudaGetErrorString(err));
}

struct CudaBackend {
  static void adamw(const AdamWLaunch& L, DType dtype, AdamWMode mode, MomentStore moments, const at::Tensor& ref) {
    const c10::cuda::CUDAGuard guard(ref.device());
    check_launch(launch_adamw(L, dtype, mode, moments, c10::cuda::getCurrentCUDAStream()), "fused_adamw_");
  }
  static void grad_check(const GradCheckLaunch& L, DType dtype, const at::Tensor& ref) {
    const c10::cuda::CUDAGuard guard(ref.device());
    check_launch(launch_grad_check(L, dtype, c10::cuda::getCurrentCUDAStream()), "amp_grad_check_");
  }
  static void grad_check_finalize(const GradCheckFinalize& F, const at::Tensor& ref) {
    const c10::cuda::CUDAGuard guard(ref.device());
    check_launch(launch_grad_check_finalize(F, c10::cuda::getCurrentCUDAStream()), "amp_grad_check_ (finalize)");
  }
  static void loss_scale_update(float* scale, int32_t* growth, int32_t* hysteresis, const float* found_inf,
                                const LossScaleConfig& c, const at::Tensor& ref) {
    const c10::cuda::CUDAGuard guard(ref.device());
    check_launch(launch_loss_scale_update(scale, growth, hysteresis, found_inf, c, c10::cuda::getCurrentCUDAStream()),
                 "loss_scale_update_");
  }
};
using CudaAdamW = AdamWOps<CudaBackend>;

}  // namespace

TORCH_LIBRARY_IMPL(cogkern, CUDA, m) {
  m.impl("fused_adamw_", &CudaAdamW::fused_adamw_);
  m.impl("amp_grad_check_", &CudaAdamW::amp_grad_check_);
  m.impl("loss_scale_update_", &CudaAdamW::loss_scale_update_);
}

}  // namespace cogkern::ops
