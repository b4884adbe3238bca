// Launcher of the 3D RoPE CUDA kernel (rope3d_kernel.cuh): dtype dispatch.
#include "rope3d/rope3d_kernel.cuh"
#include "rope3d/rope3d_launch.h"
#include "common/cuda/device_seam.h"  // launch_kernel

namespace cogkern {
namespace {

static_assert(kRopeCudaMaxHeadDim / 2 * sizeof(PairCoeffs<float>) <= 48 * 1024,
              "one token's coefficients must fit the default shared memory (no cudaFuncSetAttribute here)");

template <typename scalar_t, typename table_t>
cudaError_t launch_typed(const RopeParams& P, cudaStream_t stream) {
  const RopeLaunchPlan plan = rope_launch_plan(P, sizeof(scalar_t));
  if (plan.blocks == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto go = [&](auto kernel) {
    return launch_kernel(kernel, dim3(unsigned(plan.blocks)), dim3(plan.bx, plan.by), plan.smem, stream, P,
                         plan.tokens_per_block);
  };
  switch (plan.layout) {
    case kVector: return go(rope3d_kernel<scalar_t, table_t, kVector, VEC>);
    case kPairScalar: return go(rope3d_kernel<scalar_t, table_t, kPairScalar, 2>);
    case kHalfSplit: return go(rope3d_kernel<scalar_t, table_t, kHalfSplit, 2>);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_rope3d(const RopeParams& P, DType x_dtype, DType table_dtype, cudaStream_t stream) {
  const bool table_is_float = P.mode == RopeMode::kAngles || table_dtype == DType::kFloat;
  switch (x_dtype) {
    case DType::kHalf:
      return table_is_float ? launch_typed<__half, float>(P, stream) : launch_typed<__half, __half>(P, stream);
    case DType::kBFloat16:
      return table_is_float ? launch_typed<__nv_bfloat16, float>(P, stream)
                            : launch_typed<__nv_bfloat16, __nv_bfloat16>(P, stream);
    case DType::kFloat:
      return launch_typed<float, float>(P, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cogkern
