// The 3D RoPE op's CUDA launch path (csrc/rope3d/rope3d_launch.cu: launch_rope3d, its
// launch plan and dtype dispatch, compiled into the emulator) behind a C API for
// run_emu.py.
#include "rope3d/rope3d_kernel.cuh"  // rope_launch_plan: which layout ran
#include "rope3d/rope3d_launch.h"

using namespace cogkern;

// x_dtype, table_dtype: DType codes (0 half, 1 bfloat16, 2 float). Returns the layout used, or -1.
extern "C" int emu_rope3d(const RopeParams* P, int x_dtype, int table_dtype) {
  if (launch_rope3d(*P, DType(x_dtype), DType(table_dtype), nullptr) != cudaSuccess) return -1;
  return int(rope_launch_plan(*P, DType(x_dtype) == DType::kFloat ? 4 : 2).layout);
}

extern "C" int emu_rope_params_size() { return int(sizeof(RopeParams)); }
