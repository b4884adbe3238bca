// The optimizer's CUDA launch path (csrc/adamw/adamw_launch.cu: launch_grad_check,
// launch_grad_check_finalize, launch_adamw, with their grid sizing and dtype / mode
// dispatch, compiled into the emulator) behind a C API for run_emu.py, which passes
// plain arrays. The grids come from the emulated GPU's SM count and occupancy
// (cuda_emu_runtime.h: a few SMs), so they are smaller than the chunk count and
// the grid-stride loops and the chunk-owner search run. The tensors are packed by
// the op glue's own append_tensor (csrc/adamw/adamw_math.h), into one AdamWLaunch
// and one GradCheckLaunch (few tensors, one dtype).
#include <cmath>
#include <cstdint>
#include <vector>

#include "adamw/adamw_launch.h"

using namespace cogkern;

// Tensor i: params[i], grads[i] (dtype: DType code), exp_avgs[i], exp_avg_sqs[i] (moments: MomentStore code;
// with int8 moments, one fp32 scale per block in exp_avg_scales[i], exp_avg_sq_scales[i]; else those are null),
// masters[i] (kMaster: fp32, kRemainder: int16; else masters is null), steps[i], numels[i] elements,
// hyper-parameter group groups[i] (of num_groups: lr[g], ...), stochastic-rounding id rng_ids[i]. check: run the
// gradient check (loss scale `scale` or null, clipping at max_norm, 0: none) into step_scalars[4] first,
// and its per-tensor inf/NaN bits into tensor_flags[num_tensors + 1] (the summary last; null: none).
// Returns 0, or the first failing launch's error.
extern "C" int emu_adamw_step(int num_tensors, void* const* params, void* const* grads, void* const* exp_avgs,
                              void* const* exp_avg_sqs, void* const* masters, float* const* steps,
                              const int64_t* numels, const int64_t* groups, const int64_t* rng_ids, int num_groups,
                              const double* lr, const double* beta1, const double* beta2, const double* eps,
                              const double* weight_decay, int dtype, int mode, const float* scale, double max_norm,
                              int check, uint64_t seed, float* step_scalars, int moments,
                              float* const* exp_avg_scales, float* const* exp_avg_sq_scales, int32_t* tensor_flags) {
  if (num_tensors > kAdamWMaxTensors || num_tensors > kGradCheckMaxTensors || num_groups > kAdamWMaxGroups) return -1;
  const DType dt = DType(dtype);
  const MomentStore ms = MomentStore(moments);
  const size_t elem = dt == DType::kFloat ? 4 : 2;
  const size_t moment_bytes = ms == MomentStore::kF32 ? 4 : ms == MomentStore::kBF16 ? 2 : 1;
  const size_t master_bytes = AdamWMode(mode) == AdamWMode::kRemainder ? 2 : 4;
  GradCheckLaunch C;
  AdamWLaunch L;
  for (int g = 0; g < num_groups; ++g) {
    L.groups[g].lr = lr[g];
    L.groups[g].beta1 = beta1[g];
    L.groups[g].beta2 = beta2[g];
    L.groups[g].eps = eps[g];
    L.groups[g].weight_decay = weight_decay[g];
  }
  for (int i = 0; i < num_tensors; ++i) {
    AdamWTensor d;
    d.param = params[i];
    d.grad = grads[i];
    d.exp_avg = exp_avgs[i];
    d.exp_avg_sq = exp_avg_sqs[i];
    d.exp_avg_scale = exp_avg_scales != nullptr ? exp_avg_scales[i] : nullptr;
    d.exp_avg_sq_scale = exp_avg_sq_scales != nullptr ? exp_avg_sq_scales[i] : nullptr;
    d.master = masters != nullptr ? masters[i] : nullptr;
    d.step = steps[i];
    d.numel = numels[i];
    d.group = int(groups[i]);
    d.rng_id = uint32_t(rng_ids[i]);
    append_tensor(L, d, elem, moment_bytes, master_bytes);
    if (numels[i] > 0) append_tensor(C, grads[i], numels[i], elem, i);
  }
  std::vector<float> partials(kGradCheckPartialWords * C.num_chunks + 1, NAN);
  cudaError_t err = cudaSuccess;
  if (check) {
    C.partials = partials.data();
    C.scale = scale;
    err = launch_grad_check(C, dt, nullptr);
    GradCheckFinalize F;
    F.partials = partials.data();
    F.num_chunks = C.num_chunks;
    F.scale = scale;
    F.max_norm = max_norm;
    F.out = step_scalars;
    F.tensor_flags = tensor_flags;
    F.num_flags = num_tensors;
    F.scanned = true;
    if (err == cudaSuccess) err = launch_grad_check_finalize(F, nullptr);
    L.step_scalars = step_scalars;
  }
  L.seed = seed;
  if (err == cudaSuccess) err = launch_adamw(L, dt, AdamWMode(mode), ms, nullptr);
  return int(err);
}
