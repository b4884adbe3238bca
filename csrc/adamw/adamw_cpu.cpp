// CPU backend of the optimizer ops. Chunks are spread over threads with
// at::parallel_for; each chunk runs the functor the CUDA kernel runs (one lane,
// kCpuILP elements per iteration instead of the GPU's 4), so both backends
// compute the same values element by element.
//
// Speed: the chunk runners are compiled per SIMD level (common/cpu/simd_clones.h),
// and this file is built with -fno-math-errno (sqrt vectorizes) and
// -ffp-contract=off (no FMA may fuse a multiply-add: the CUDA kernels round
// every operation separately, and the results must stay bit-identical).
#include "adamw/adamw_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <stdexcept>

#include "common/cpu/fp16_bits.h"
#include "common/cpu/simd_clones.h"

namespace cogkern::cpu {
namespace {

// One AVX-512 register of floats per operand and iteration.
constexpr int kCpuILP = 16;

// fp16 goes through Fp16Bits (c10::Half's bits and values, with conversions
// that vectorize). One (tensor, chunk) of a launch. Plain functions, one per instantiation,
// because function multi-versioning does not apply to templates.
using AdamWChunkFn = void (*)(const AdamWLaunch&, int, int64_t);
using GradCheckChunkFn = GradCheckPartial (*)(const GradCheckLaunch&, int, int64_t);

// int8 moments: one lane takes a whole block per group (N = kMomentBlock), so each pass over
// a block is one loop of 256 elements, which vectorizes better than 16 loops of 16.
#define COGKERN_ADAMW_RUNNER(NAME, DT, T, MODE, MS)                                                  \
  COGKERN_SIMD_CLONES void adamw_##NAME(const AdamWLaunch& L, int t, int64_t c) {                     \
    constexpr int kN = MomentStore::MS == MomentStore::kInt8 ? kMomentBlock : kCpuILP;                 \
    AdamWChunk<T, AdamWMode::MODE, MomentStore::MS, kN>{}(L, t, c, 0, 1);                             \
  }
COGKERN_ADAMW_VARIANTS(COGKERN_ADAMW_RUNNER, Fp16Bits, c10::BFloat16)
#undef COGKERN_ADAMW_RUNNER

#define COGKERN_GRAD_CHECK_RUNNER(NAME, T)                                              \
  COGKERN_SIMD_CLONES GradCheckPartial NAME(const GradCheckLaunch& L, int t, int64_t c) { \
    return GradCheckChunk<T, kCpuILP>{}(L, t, c, 0, 1);                                 \
  }
COGKERN_GRAD_CHECK_RUNNER(grad_check_f32, float)
COGKERN_GRAD_CHECK_RUNNER(grad_check_f16, Fp16Bits)
COGKERN_GRAD_CHECK_RUNNER(grad_check_bf16, c10::BFloat16)
#undef COGKERN_GRAD_CHECK_RUNNER

void run_adamw(const AdamWLaunch& L, AdamWChunkFn chunk_fn) {
  at::parallel_for(0, L.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
      chunk_fn(L, t, c - L.tensors[t].chunk_begin);
    }
  });
  // Every chunk has read the old step counts; now advance them.
  for (int t = 0; t < L.num_tensors; ++t) adamw_advance_step(L, t);
}

void run_grad_check(const GradCheckLaunch& L, GradCheckChunkFn chunk_fn) {
  at::parallel_for(0, L.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
      const GradCheckPartial p = chunk_fn(L, t, c - L.tensors[t].chunk_begin);
      store_grad_check_partial(L.partials, c, p, L.tensors[t].flag_index);
    }
  });
}

}  // namespace

void adamw(const AdamWLaunch& L, DType param_dtype, AdamWMode mode, MomentStore moments) {
#define COGKERN_ADAMW_CASE(NAME, DT, T, MODE, MS)                                          \
  if (param_dtype == DType::DT && mode == AdamWMode::MODE && moments == MomentStore::MS) \
    return run_adamw(L, adamw_##NAME);
  COGKERN_ADAMW_VARIANTS(COGKERN_ADAMW_CASE, Fp16Bits, c10::BFloat16)
#undef COGKERN_ADAMW_CASE
  throw std::invalid_argument("cogkern::cpu::adamw: unsupported dtype/mode/moments combination");
}

void grad_check(const GradCheckLaunch& L, DType grad_dtype) {
  switch (grad_dtype) {
    case DType::kFloat:
      return run_grad_check(L, grad_check_f32);
    case DType::kHalf:
      return run_grad_check(L, grad_check_f16);
    case DType::kBFloat16:
      return run_grad_check(L, grad_check_bf16);
    default:
      break;
  }
  throw std::invalid_argument("cogkern::cpu::grad_check: unsupported dtype");
}

void grad_check_finalize(const GradCheckFinalize& F) {
  float sumsq = 0.0f;
  uint32_t nonfinite = 0;
  for (int64_t i = 0; i < F.num_chunks; ++i) {
    sumsq += partial_sumsq(F.partials, i);
    nonfinite |= partial_bits(F.partials, i);
  }
  if (F.tensor_flags != nullptr) {
    std::fill(F.tensor_flags, F.tensor_flags + F.num_flags, 0);
    for (int64_t c = 0; c < F.num_chunks; ++c) tensor_flag_of_run(F, c);
  }
  finalize_grad_check(sumsq, nonfinite, F);
}

void loss_scale_update(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker, const float* found_inf,
                       const LossScaleConfig& config) {
  update_loss_scale(scale, growth_tracker, hysteresis_tracker, *found_inf != 0.0f, config);
}

}  // namespace cogkern::cpu
