// Optimizer CUDA kernels: multi-tensor AdamW update, gradient check (inf/NaN +
// sum of squares), its finalize, step-count advance and the loss-scale update.
// The math and the per-chunk bodies are in adamw_math.h, shared with the CPU
// backend; the launchers are in adamw_launch.cu. These kernels also run on the CPU
// under scripts/cuda_emu (emu_optim.cpp), with CUDA's thread and block counts.
//
// Each launch takes its whole tensor list in the parameter block
// (__grid_constant__, so it stays in the constant bank and is indexed there);
// blocks walk the global chunk index with a grid stride and find the owning
// tensor by binary search over the chunk prefix.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adamw/adamw_math.h"

namespace cogkern {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;

// int8 moments: a warp shares each block; the block's absmax is a max over the warp.
struct WarpPerBlock {
  static constexpr int kLanes = 32;
  CK_HD static uint32_t max(uint32_t x) {
#if defined(__CUDA_ARCH__) || defined(COGKERN_CUDA_EMULATION)
    for (int o = 16; o > 0; o >>= 1) {
      const uint32_t y = __shfl_xor_sync(0xFFFFFFFFu, x, o);
      x = x > y ? x : y;
    }
#endif
    return x;
  }
};

// int8 moments hold a block's new moments in registers until the warp's absmax is known (16 floats
// per lane): 3 blocks per SM leave them 80 registers, where 4 (64) spill.
template <typename T, AdamWMode MODE, MomentStore MS>
__global__ void __launch_bounds__(kThreads, MS == MomentStore::kInt8 ? 3 : 4) adamw_kernel(const __grid_constant__ AdamWLaunch L) {
  for (int64_t c = blockIdx.x; c < L.num_chunks; c += gridDim.x) {
    const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
    AdamWChunk<T, MODE, MS, kMultiTensorILP, WarpPerBlock>{}(L, t, c - L.tensors[t].chunk_begin, threadIdx.x, blockDim.x);
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

struct SumBits {
  float sum;
  uint32_t bits;
};

// Sum and bitwise OR over the block, in a fixed order (reproducible). Result in thread 0.
__device__ SumBits block_sum_or(float s, uint32_t f) {
  __shared__ float warp_s[32];
  __shared__ uint32_t warp_f[32];
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_down_sync(0xFFFFFFFFu, s, o);
    f |= __shfl_down_sync(0xFFFFFFFFu, f, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_s[warp] = s;
    warp_f[warp] = f;
  }
  __syncthreads();  // [mut:optim-reduce-barrier]
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    s = lane < nwarps ? warp_s[lane] : 0.0f;
    f = lane < nwarps ? warp_f[lane] : 0u;
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_down_sync(0xFFFFFFFFu, s, o);
      f |= __shfl_down_sync(0xFFFFFFFFu, f, o);
    }
  }
  __syncthreads();  // the scratch is reused by the next call
  return SumBits{s, f};
}

// The grad check streams each gradient once: 16 bytes per lane and load
// (kGradCheckVectorBytes), kGradCheckLoads loads in flight per lane.
constexpr int kGradCheckLoads = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_check_kernel(const __grid_constant__ GradCheckLaunch L) {
  using Chunk = GradCheckChunk<T, int(kGradCheckVectorBytes / sizeof(T)), kGradCheckLoads>;
  for (int64_t c = blockIdx.x; c < L.num_chunks; c += gridDim.x) {
    const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
    const GradCheckPartial p = Chunk{}(L, t, c - L.tensors[t].chunk_begin, threadIdx.x, blockDim.x);
    const SumBits r = block_sum_or(p.sumsq, p.nonfinite);
    if (threadIdx.x == 0) store_grad_check_partial(L.partials, c, GradCheckPartial{r.sum, r.bits}, L.tensors[t].flag_index);
  }
}

__global__ void __launch_bounds__(kFinalizeThreads) grad_check_finalize_kernel(const GradCheckFinalize F) {
  float s = 0.0f;
  uint32_t f = 0;
  for (int64_t i = threadIdx.x; i < F.num_chunks; i += blockDim.x) {
    s += partial_sumsq(F.partials, i);
    f |= partial_bits(F.partials, i);
  }
  if (F.tensor_flags != nullptr) {  // uniform over the block: every thread reaches the barrier
    for (int64_t i = threadIdx.x; i < F.num_flags; i += blockDim.x) F.tensor_flags[i] = 0;
    __syncthreads();  // the zeros land before a run's first chunk writes its tensor's entry
    for (int64_t c = threadIdx.x; c < F.num_chunks; c += blockDim.x) tensor_flag_of_run(F, c);
  }
  const SumBits r = block_sum_or(s, f);
  if (threadIdx.x == 0) finalize_grad_check(r.sum, r.bits, F);
}

__global__ void loss_scale_update_kernel(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                         const float* found_inf, const LossScaleConfig config) {
  update_loss_scale(scale, growth_tracker, hysteresis_tracker, *found_inf != 0.0f, config);
}

}  // namespace
}  // namespace cogkern
