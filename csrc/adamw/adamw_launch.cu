// Launchers of the optimizer CUDA kernels (adamw_kernels.cuh): grid sizes,
// dtype / mode dispatch. The grids of the grid-stride kernels come from the
// device (SM count, occupancy) through the runtime; under the CPU emulator,
// whose emulated GPU has few SMs (scripts/cuda_emu/cuda_emu_runtime.h), they
// are smaller than the work, so the grid-stride loops run there too.
#include <algorithm>

#include "adamw/adamw_kernels.cuh"
#include "adamw/adamw_launch.h"
#include "common/cuda/device_seam.h"  // launch_kernel

namespace cogkern {
namespace {

int sm_count() {
  int device = 0;
  cudaGetDevice(&device);
  static int cache[256] = {};
  if (device < 0 || device >= 256) return 132;
  if (cache[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

// Enough resident blocks to fill the GPU, never more than there are chunks.
// One occupancy query per kernel (the template parameter is the kernel itself).
template <auto kKernel>
unsigned grid_for(int64_t num_chunks) {
  static const int blocks_per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0) != cudaSuccess || n < 1) n = 1;
    return n;
  }();
  const int64_t full = int64_t(sm_count()) * blocks_per_sm;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(num_chunks, full)));
}

template <typename T, AdamWMode MODE, MomentStore MS>
cudaError_t launch_update(const AdamWLaunch& L, cudaStream_t stream) {
  if (L.num_chunks > 0) {
    const cudaError_t err = launch_kernel(adamw_kernel<T, MODE, MS>, grid_for<adamw_kernel<T, MODE, MS>>(L.num_chunks),
                                          kThreads, 0, stream, L);
    if (err != cudaSuccess) return err;
  }
  StepAdvance A;
  A.num_tensors = L.num_tensors;
  A.step_scalars = L.step_scalars;
  for (int t = 0; t < L.num_tensors; ++t) A.steps[t] = L.tensors[t].step;
  return launch_kernel(advance_steps_kernel, unsigned(ceil_div(L.num_tensors, 128)), 128, 0, stream, A);
}

template <typename T>
cudaError_t launch_check(const GradCheckLaunch& L, cudaStream_t stream) {
  return launch_kernel(grad_check_kernel<T>, grid_for<grad_check_kernel<T>>(L.num_chunks), kThreads, 0, stream, L);
}

}  // namespace

cudaError_t launch_adamw(const AdamWLaunch& L, DType param_dtype, AdamWMode mode, MomentStore moments,
                         cudaStream_t stream) {
  if (L.num_tensors == 0) return cudaSuccess;
#define COGKERN_ADAMW_CASE(NAME, DT, T, MODE, MS)                                          \
  if (param_dtype == DType::DT && mode == AdamWMode::MODE && moments == MomentStore::MS) \
    return launch_update<T, AdamWMode::MODE, MomentStore::MS>(L, stream);
  COGKERN_ADAMW_VARIANTS(COGKERN_ADAMW_CASE, __half, __nv_bfloat16)
#undef COGKERN_ADAMW_CASE
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad_check(const GradCheckLaunch& L, DType grad_dtype, cudaStream_t stream) {
  if (L.num_chunks == 0) return cudaSuccess;
  switch (grad_dtype) {
    case DType::kFloat:
      return launch_check<float>(L, stream);
    case DType::kHalf:
      return launch_check<__half>(L, stream);
    case DType::kBFloat16:
      return launch_check<__nv_bfloat16>(L, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_grad_check_finalize(const GradCheckFinalize& F, cudaStream_t stream) {
  return launch_kernel(grad_check_finalize_kernel, 1, kFinalizeThreads, 0, stream, F);
}

cudaError_t launch_loss_scale_update(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                     const float* found_inf, const LossScaleConfig& config, cudaStream_t stream) {
  return launch_kernel(loss_scale_update_kernel, 1, 1, 0, stream, scale, growth_tracker, hysteresis_tracker, found_inf,
                       config);
}

}  // namespace cogkern
