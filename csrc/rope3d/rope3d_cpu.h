// CPU backend of the 3D RoPE op (the same math as the CUDA kernel: rope3d/rope3d_math.h).
#pragma once

#include "rope3d/rope3d_math.h"

namespace cogkern::cpu {

// x_dtype: any DType; table_dtype: kFloat or x_dtype (kTable mode only).
void rope3d(const RopeParams& P, DType x_dtype, DType table_dtype);

}  // namespace cogkern::cpu
