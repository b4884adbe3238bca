// The optimizer's CUDA launch path (csrc/adamw/adamw_launch.cu: launch_grad_check,
// launch_grad_check_finalize, launch_adamw, with their grid sizing and dtype / mode
// dispatch, compiled into the emulator) behind a C API for run_emu.py, which passes
// plain arrays. The grids come from the emulated GPU's SM count and occupancy
// (cuda_emu_runtime.h: a few SMs), so they are smaller than the chunk count and
// the grid-stride loops and the chunk-owner search run. The packing of the lists
// into one AdamWLaunch and one GradCheckLaunch is that of csrc/adamw/adamw_op.h
// (few tensors, one dtype: one launch each).
#include <cmath>
#include <cstdint>
#include <vector>

#include "adamw/adamw_launch.h"

using namespace cogkern;

namespace {

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

// Tensor i: params[i], grads[i] (dtype: DType code), exp_avgs[i], exp_avg_sqs[i], masters[i] (kMaster only; else
// masters is null), steps[i], numels[i] elements, hyper-parameter group groups[i] (of num_groups: lr[g], ...),
// stochastic-rounding id rng_ids[i]. check: run the gradient check (loss scale `scale` or null, clipping at
// max_norm, 0: none) into step_scalars[4] first. Returns 0, or the first failing launch's error.
extern "C" int emu_adamw_step(int num_tensors, void* const* params, void* const* grads, float* const* exp_avgs,
                              float* const* exp_avg_sqs, float* const* masters, float* const* steps,
                              const int64_t* numels, const int64_t* groups, const int64_t* rng_ids, int num_groups,
                              const double* lr, const double* beta1, const double* beta2, const double* eps,
                              const double* weight_decay, int dtype, int mode, const float* scale, double max_norm,
                              int check, uint64_t seed, float* step_scalars) {
  if (num_tensors > kAdamWMaxTensors || num_tensors > kGradCheckMaxTensors || num_groups > kAdamWMaxGroups) return -1;
  const DType dt = DType(dtype);
  const size_t elem = dt == DType::kFloat ? 4 : 2;
  const size_t vec_bytes = elem * kMultiTensorILP;
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
    float* master = masters != nullptr ? masters[i] : nullptr;
    AdamWTensor& d = L.tensors[L.num_tensors++];
    d.param = params[i];
    d.grad = grads[i];
    d.exp_avg = exp_avgs[i];
    d.exp_avg_sq = exp_avg_sqs[i];
    d.master = master;
    d.step = steps[i];
    d.numel = numels[i];
    d.chunk_begin = L.num_chunks;
    d.group = int(groups[i]);
    d.rng_id = uint32_t(rng_ids[i]);
    d.vector_ok = aligned(params[i], vec_bytes) && aligned(grads[i], vec_bytes) && aligned(exp_avgs[i], 16) &&
                  aligned(exp_avg_sqs[i], 16) && aligned(master, 16);
    L.num_chunks += chunks_of(numels[i]);
    if (numels[i] == 0) continue;
    GradCheckTensor& c = C.tensors[C.num_tensors++];
    c.grad = grads[i];
    c.numel = numels[i];
    c.chunk_begin = C.num_chunks;
    c.vector_ok = aligned(grads[i], vec_bytes);
    C.num_chunks += chunks_of(numels[i]);
  }
  std::vector<float> partials(2 * C.num_chunks + 1, NAN);
  cudaError_t err = cudaSuccess;
  if (check) {
    C.partials = partials.data();
    C.scale = scale;
    err = launch_grad_check(C, dt, nullptr);
    if (err == cudaSuccess)
      err = launch_grad_check_finalize(partials.data(), C.num_chunks, scale, nullptr, max_norm, step_scalars, nullptr);
    L.step_scalars = step_scalars;
  }
  L.seed = seed;
  if (err == cudaSuccess) err = launch_adamw(L, dt, AdamWMode(mode), nullptr);
  return int(err);
}
