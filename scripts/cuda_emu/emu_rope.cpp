// The 3D RoPE CUDA kernel (csrc/kernels/rope3d_kernel.cuh) under the emulator,
// launched with the plan rope3d.cu uses (rope_launch_plan), behind a C API for
// run_emu.py. The dtype dispatch mirrors launch_rope3d.
#include "kernels/rope3d_kernel.cuh"

using namespace cogkern;

namespace {

template <typename scalar_t, typename table_t>
void run(const RopeParams& P) {
  const RopeLaunchPlan plan = rope_launch_plan(P, sizeof(scalar_t));
  if (plan.blocks == 0) return;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto go = [&](auto kernel) {
    cuda_emu::launch(unsigned(plan.blocks), unsigned(plan.bx), unsigned(plan.by), plan.smem,
                     [&] { kernel(P, plan.tokens_per_block); });
  };
  switch (plan.layout) {
    case kVector:
      go(rope3d_kernel<scalar_t, table_t, kVector, VEC>);
      break;
    case kPairScalar:
      go(rope3d_kernel<scalar_t, table_t, kPairScalar, 2>);
      break;
    case kHalfSplit:
      go(rope3d_kernel<scalar_t, table_t, kHalfSplit, 2>);
      break;
  }
}

}  // namespace

// x_dtype, table_dtype: DType codes (0 half, 1 bfloat16, 2 float). Returns the layout used, or -1.
extern "C" int emu_rope3d(const RopeParams* P, int x_dtype, int table_dtype) {
  const bool table_is_float = P->mode == RopeMode::kAngles || DType(table_dtype) == DType::kFloat;
  switch (DType(x_dtype)) {
    case DType::kHalf:
      table_is_float ? run<__half, float>(*P) : run<__half, __half>(*P);
      break;
    case DType::kBFloat16:
      table_is_float ? run<__nv_bfloat16, float>(*P) : run<__nv_bfloat16, __nv_bfloat16>(*P);
      break;
    case DType::kFloat:
      run<float, float>(*P);
      break;
    default:
      return -1;
  }
  return int(rope_launch_plan(*P, DType(x_dtype) == DType::kFloat ? 4 : 2).layout);
}

extern "C" int emu_rope_params_size() { return int(sizeof(RopeParams)); }
