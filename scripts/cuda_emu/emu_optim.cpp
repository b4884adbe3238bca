// The optimizer's CUDA kernels (csrc/adamw/adamw_kernels.cuh) under the
// emulator, with CUDA's block size and a small grid (so the grid-stride loops
// and the chunk-owner search run), behind a C API for run_emu.py. The launch
// packing mirrors csrc/adamw/adamw_op.h (one launch here: few tensors, one
// dtype): keep them in step.
#include <vector>

#include "adamw/adamw_kernels.cuh"

using namespace cogkern;

extern "C" {
struct EmuOptTensor {
  void* param;
  void* grad;
  float *exp_avg, *exp_avg_sq, *master, *step;  // master: kMaster only
  int64_t numel;
  int32_t group;
  uint32_t rng_id;
};
struct EmuOptSpec {
  int32_t num_tensors;
  EmuOptTensor* tensors;
  int32_t num_groups;
  const double *lr, *beta1, *beta2, *eps, *weight_decay;  // [num_groups]
  int32_t dtype;  // DType of params and grads: 0 half, 1 bfloat16, 2 float
  int32_t mode;   // AdamWMode
  const float* scale;      // loss scale or null
  double max_norm;         // 0: no clipping
  int32_t check;           // run the gradient check (else: no step scalars)
  uint64_t seed;
  float* step_scalars;     // [4], written by the check
  int32_t grid;            // blocks of the check and update launches
};
}

namespace {

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, AdamWMode MODE>
void run(const EmuOptSpec& s) {
  const size_t vec_bytes = sizeof(T) * kMultiTensorILP;  // the 16-bit types' vector is 8 bytes, float's 16
  GradCheckLaunch C;
  AdamWLaunch L;
  for (int g = 0; g < s.num_groups; ++g) {
    L.groups[g].lr = s.lr[g];
    L.groups[g].beta1 = s.beta1[g];
    L.groups[g].beta2 = s.beta2[g];
    L.groups[g].eps = s.eps[g];
    L.groups[g].weight_decay = s.weight_decay[g];
  }
  for (int i = 0; i < s.num_tensors; ++i) {
    const EmuOptTensor& e = s.tensors[i];
    AdamWTensor& d = L.tensors[L.num_tensors++];
    d.param = e.param;
    d.grad = e.grad;
    d.exp_avg = e.exp_avg;
    d.exp_avg_sq = e.exp_avg_sq;
    d.master = e.master;
    d.step = e.step;
    d.numel = e.numel;
    d.chunk_begin = L.num_chunks;
    d.group = e.group;
    d.rng_id = e.rng_id;
    d.vector_ok = aligned(e.param, vec_bytes) && aligned(e.grad, vec_bytes) && aligned(e.exp_avg, 16) &&
                  aligned(e.exp_avg_sq, 16) && aligned(e.master, 16);
    L.num_chunks += chunks_of(e.numel);
    if (e.numel == 0) continue;
    GradCheckTensor& c = C.tensors[C.num_tensors++];
    c.grad = e.grad;
    c.numel = e.numel;
    c.chunk_begin = C.num_chunks;
    c.vector_ok = aligned(e.grad, vec_bytes);
    C.num_chunks += chunks_of(e.numel);
  }
  const unsigned grid = unsigned(s.grid);
  std::vector<float> partials(2 * C.num_chunks + 1, NAN);
  if (s.check) {
    C.partials = partials.data();
    C.scale = s.scale;
    if (C.num_chunks > 0) cuda_emu::launch(grid, kThreads, 0, [&] { grad_check_kernel<T>(C); });
    cuda_emu::launch(1, kFinalizeThreads, 0, [&] {
      grad_check_finalize_kernel(partials.data(), C.num_chunks, s.scale, nullptr, s.max_norm, s.step_scalars);
    });
    L.step_scalars = s.step_scalars;
  }
  L.seed = s.seed;
  if (L.num_chunks > 0) cuda_emu::launch(grid, kThreads, 0, [&] { adamw_kernel<T, MODE>(L); });
  StepAdvance A;
  A.num_tensors = L.num_tensors;
  A.step_scalars = L.step_scalars;
  for (int t = 0; t < L.num_tensors; ++t) A.steps[t] = L.tensors[t].step;
  cuda_emu::launch(unsigned(ceil_div(L.num_tensors, 128)), 128, 0, [&] { advance_steps_kernel(A); });
}

}  // namespace

extern "C" int emu_adamw_step(const EmuOptSpec* s) {
  const AdamWMode mode = AdamWMode(s->mode);
  switch (DType(s->dtype)) {
    case DType::kFloat:
      if (mode == AdamWMode::kPlain) return run<float, AdamWMode::kPlain>(*s), 0;
      break;
    case DType::kHalf:
      if (mode == AdamWMode::kPlain) return run<__half, AdamWMode::kPlain>(*s), 0;
      if (mode == AdamWMode::kMaster) return run<__half, AdamWMode::kMaster>(*s), 0;
      break;
    case DType::kBFloat16:
      if (mode == AdamWMode::kPlain) return run<__nv_bfloat16, AdamWMode::kPlain>(*s), 0;
      if (mode == AdamWMode::kMaster) return run<__nv_bfloat16, AdamWMode::kMaster>(*s), 0;
      if (mode == AdamWMode::kStochastic) return run<__nv_bfloat16, AdamWMode::kStochastic>(*s), 0;
      break;
    default:
      break;
  }
  return 1;
}
