// Launcher of the 3D RoPE CUDA kernel (rope3d_kernel.cuh): dtype dispatch.
#include "kernels/rope3d_kernel.cuh"
#include "kernels/rope3d_launch.h"

namespace cogkern {
namespace {

static_assert(kRopeCudaMaxHeadDim / 2 * sizeof(PairCoeffs<float>) <= 48 * 1024,
              "one token's coefficients must fit the default shared memory (no cudaFuncSetAttribute here)");

template <typename scalar_t, typename table_t>
cudaError_t launch_typed(const RopeParams& P, cudaStream_t stream) {
  const RopeLaunchPlan plan = rope_launch_plan(P, sizeof(scalar_t));
  if (plan.blocks == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const dim3 block(plan.bx, plan.by);
  const unsigned grid = unsigned(plan.blocks);
  switch (plan.layout) {
    case kVector:
      rope3d_kernel<scalar_t, table_t, kVector, VEC><<<grid, block, plan.smem, stream>>>(P, plan.tokens_per_block);
      break;
    case kPairScalar:
      rope3d_kernel<scalar_t, table_t, kPairScalar, 2><<<grid, block, plan.smem, stream>>>(P, plan.tokens_per_block);
      break;
    case kHalfSplit:
      rope3d_kernel<scalar_t, table_t, kHalfSplit, 2><<<grid, block, plan.smem, stream>>>(P, plan.tokens_per_block);
      break;
  }
  return cudaGetLastError();
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
