// Optimizer CUDA kernels: multi-tensor AdamW update, gradient check (inf/NaN +
// sum of squares), its finalize, step-count advance and the loss-scale update.
// The math and the per-chunk bodies are in adamw.h, shared with the CPU backend.
//
// Each launch takes its whole tensor list in the parameter block
// (__grid_constant__, so it stays in the constant bank and is indexed there);
// blocks walk the global chunk index with a grid stride and find the owning
// tensor by binary search over the chunk prefix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/adamw_launch.h"

namespace cogkern {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;

template <typename T, AdamWMode MODE>
__global__ void __launch_bounds__(kThreads, 4) adamw_kernel(const __grid_constant__ AdamWLaunch L) {
  for (int64_t c = blockIdx.x; c < L.num_chunks; c += gridDim.x) {
    const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
    AdamWChunk<T, MODE>{}(L, t, c - L.tensors[t].chunk_begin, threadIdx.x, blockDim.x);
  }
}

// Only the step pointers: a small parameter block for a tiny launch.
struct StepAdvance {
  float* steps[kAdamWMaxTensors];
  const float* step_scalars;
  int num_tensors;
};

__global__ void advance_steps_kernel(const __grid_constant__ StepAdvance A) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= A.num_tensors) return;
  if (A.step_scalars != nullptr && A.step_scalars[kFoundInf] != 0.0f) return;  // same rule as adamw_advance_step
  *A.steps[t] += 1.0f;
}

// Sum and max over the block, in a fixed order (reproducible). Result in thread 0.
__device__ float2 block_sum_max(float s, float f) {
  __shared__ float warp_s[32], warp_f[32];
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_down_sync(0xFFFFFFFFu, s, o);
    f = fmaxf(f, __shfl_down_sync(0xFFFFFFFFu, f, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_s[warp] = s;
    warp_f[warp] = f;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    s = lane < nwarps ? warp_s[lane] : 0.0f;
    f = lane < nwarps ? warp_f[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_down_sync(0xFFFFFFFFu, s, o);
      f = fmaxf(f, __shfl_down_sync(0xFFFFFFFFu, f, o));
    }
  }
  __syncthreads();  // the scratch is reused by the next call
  return make_float2(s, f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_check_kernel(const __grid_constant__ GradCheckLaunch L) {
  for (int64_t c = blockIdx.x; c < L.num_chunks; c += gridDim.x) {
    const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
    const GradCheckPartial p = GradCheckChunk<T>{}(L, t, c - L.tensors[t].chunk_begin, threadIdx.x, blockDim.x);
    const float2 r = block_sum_max(p.sumsq, p.nonfinite);
    if (threadIdx.x == 0) {
      L.partials[2 * c] = r.x;
      L.partials[2 * c + 1] = r.y;
    }
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    grad_check_finalize_kernel(const float* partials, int64_t num_chunks, const float* scale,
                               const float* found_inf_in, double max_norm, float* out) {
  float s = 0.0f, f = 0.0f;
  for (int64_t i = threadIdx.x; i < num_chunks; i += blockDim.x) {
    s += partials[2 * i];
    f = fmaxf(f, partials[2 * i + 1]);
  }
  const float2 r = block_sum_max(s, f);
  if (threadIdx.x == 0) finalize_grad_check(r.x, r.y, scale, found_inf_in, max_norm, out);
}

__global__ void loss_scale_update_kernel(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                         const float* found_inf, const LossScaleConfig config) {
  update_loss_scale(scale, growth_tracker, hysteresis_tracker, *found_inf != 0.0f, config);
}

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

template <typename T, AdamWMode MODE>
cudaError_t launch_update(const AdamWLaunch& L, cudaStream_t stream) {
  if (L.num_chunks > 0) {
    adamw_kernel<T, MODE><<<grid_for<adamw_kernel<T, MODE>>(L.num_chunks), kThreads, 0, stream>>>(L);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  StepAdvance A;
  A.num_tensors = L.num_tensors;
  A.step_scalars = L.step_scalars;
  for (int t = 0; t < L.num_tensors; ++t) A.steps[t] = L.tensors[t].step;
  advance_steps_kernel<<<unsigned(ceil_div(L.num_tensors, 128)), 128, 0, stream>>>(A);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_check(const GradCheckLaunch& L, cudaStream_t stream) {
  grad_check_kernel<T><<<grid_for<grad_check_kernel<T>>(L.num_chunks), kThreads, 0, stream>>>(L);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adamw(const AdamWLaunch& L, DType param_dtype, AdamWMode mode, cudaStream_t stream) {
  if (L.num_tensors == 0) return cudaSuccess;
  switch (param_dtype) {
    case DType::kFloat:
      if (mode == AdamWMode::kPlain) return launch_update<float, AdamWMode::kPlain>(L, stream);
      break;
    case DType::kHalf:
      if (mode == AdamWMode::kPlain) return launch_update<__half, AdamWMode::kPlain>(L, stream);
      if (mode == AdamWMode::kMaster) return launch_update<__half, AdamWMode::kMaster>(L, stream);
      break;
    case DType::kBFloat16:
      if (mode == AdamWMode::kPlain) return launch_update<__nv_bfloat16, AdamWMode::kPlain>(L, stream);
      if (mode == AdamWMode::kMaster) return launch_update<__nv_bfloat16, AdamWMode::kMaster>(L, stream);
      if (mode == AdamWMode::kStochastic) return launch_update<__nv_bfloat16, AdamWMode::kStochastic>(L, stream);
      break;
    default:
      break;
  }
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

cudaError_t launch_grad_check_finalize(const float* partials, int64_t num_chunks, const float* scale,
                                       const float* found_inf_in, double max_norm, float* out, cudaStream_t stream) {
  grad_check_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, num_chunks, scale, found_inf_in, max_norm,
                                                                 out);
  return cudaGetLastError();
}

cudaError_t launch_loss_scale_update(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                     const float* found_inf, const LossScaleConfig& config, cudaStream_t stream) {
  loss_scale_update_kernel<<<1, 1, 0, stream>>>(scale, growth_tracker, hysteresis_tracker, found_inf, config);
  return cudaGetLastError();
}

}  // namespace cogkern
