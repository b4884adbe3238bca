// CPU backend of the optimizer ops. Chunks are spread over threads with
// at::parallel_for; each chunk runs the functor the CUDA kernel runs, with a
// single lane, so both backends compute the same values element by element.
#include "cpu/adamw_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>

namespace cogkern::cpu {
namespace {

template <typename T, AdamWMode MODE>
void adamw_typed(const AdamWLaunch& L) {
  at::parallel_for(0, L.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
      AdamWChunk<T, MODE>{}(L, t, c - L.tensors[t].chunk_begin, 0, 1);
    }
  });
  // Every chunk has read the old step counts; now advance them.
  for (int t = 0; t < L.num_tensors; ++t) adamw_advance_step(L, t);
}

template <typename T>
void grad_check_typed(const GradCheckLaunch& L) {
  at::parallel_for(0, L.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int t = find_chunk_owner(L.num_tensors, c, [&](int i) { return L.tensors[i].chunk_begin; });
      const GradCheckPartial p = GradCheckChunk<T>{}(L, t, c - L.tensors[t].chunk_begin, 0, 1);
      L.partials[2 * c] = p.sumsq;
      L.partials[2 * c + 1] = p.nonfinite;
    }
  });
}

}  // namespace

void adamw(const AdamWLaunch& L, DType param_dtype, AdamWMode mode) {
  switch (param_dtype) {
    case DType::kFloat:
      if (mode == AdamWMode::kPlain) return adamw_typed<float, AdamWMode::kPlain>(L);
      break;
    case DType::kHalf:
      if (mode == AdamWMode::kPlain) return adamw_typed<c10::Half, AdamWMode::kPlain>(L);
      if (mode == AdamWMode::kMaster) return adamw_typed<c10::Half, AdamWMode::kMaster>(L);
      break;
    case DType::kBFloat16:
      if (mode == AdamWMode::kPlain) return adamw_typed<c10::BFloat16, AdamWMode::kPlain>(L);
      if (mode == AdamWMode::kMaster) return adamw_typed<c10::BFloat16, AdamWMode::kMaster>(L);
      if (mode == AdamWMode::kStochastic) return adamw_typed<c10::BFloat16, AdamWMode::kStochastic>(L);
      break;
    default:
      break;
  }
  throw std::invalid_argument("cogkern::cpu::adamw: unsupported dtype/mode combination");
}

void grad_check(const GradCheckLaunch& L, DType grad_dtype) {
  switch (grad_dtype) {
    case DType::kFloat:
      return grad_check_typed<float>(L);
    case DType::kHalf:
      return grad_check_typed<c10::Half>(L);
    case DType::kBFloat16:
      return grad_check_typed<c10::BFloat16>(L);
    default:
      break;
  }
  throw std::invalid_argument("cogkern::cpu::grad_check: unsupported dtype");
}

void grad_check_finalize(const float* partials, int64_t num_chunks, const float* scale, const float* found_inf_in,
                         double max_norm, float* out) {
  float sumsq = 0.0f, nonfinite = 0.0f;
  for (int64_t i = 0; i < num_chunks; ++i) {
    sumsq += partials[2 * i];
    nonfinite = partials[2 * i + 1] > nonfinite ? partials[2 * i + 1] : nonfinite;
  }
  finalize_grad_check(sumsq, nonfinite, scale, found_inf_in, max_norm, out);
}

void loss_scale_update(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker, const float* found_inf,
                       const LossScaleConfig& config) {
  update_loss_scale(scale, growth_tracker, hysteresis_tracker, *found_inf != 0.0f, config);
}

}  // namespace cogkern::cpu
