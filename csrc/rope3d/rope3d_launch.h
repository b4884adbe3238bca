// Host entry points of the 3D RoPE CUDA kernel (defined in rope3d_launch.cu). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include "rope3d/rope3d_math.h"

namespace cogkern {

// The largest head_dim the kernel takes: one token's mixing coefficients
// (head_dim / 2 pairs of 16 bytes) must fit the 48 KB of shared memory a block
// gets without opting in (rope3d_launch.cu checks it).
constexpr int64_t kRopeCudaMaxHeadDim = 6144;

// Applies the mix described by P to tokens [P.token_begin, P.seq) of every
// (batch, head) row. x_dtype: kHalf, kBFloat16 or kFloat; table_dtype: kFloat
// or x_dtype (read only in kTable mode). Returns the launch error, if any.
cudaError_t launch_rope3d(const RopeParams& P, DType x_dtype, DType table_dtype, cudaStream_t stream);

}  // namespace cogkern
