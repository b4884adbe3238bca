// The 3D RoPE op's CUDA launch path (csrc/rope3d/rope3d_launch.cu: launch_rope3d, its
// launch plan and dtype dispatch, compiled into the emulator) behind a C API for
// run_emu.py. The RopeParams are built here, field by field from plain arguments, as
// the op's packing (csrc/rope3d/rope3d_op.h) builds them; the rotation setters also
// fill the attention's RoPE (emu_attention.cpp: emu_attention_rope).
#include <cmath>

#include "rope3d/rope3d_kernel.cuh"  // rope_launch_plan: which layout ran
#include "rope3d/rope3d_launch.h"

using namespace cogkern;

extern "C" {

RopeParams* emu_rope_params_new() { return new RopeParams(); }
void emu_rope_params_free(RopeParams* P) { delete P; }

// x, out: [batch, seq, heads, head_dim] with element strides x_strides[0..3), out_strides[0..3) (last stride 1).
void emu_rope_set_layout(RopeParams* P, const void* x, void* out, int64_t batch, int64_t seq, int64_t heads,
                         int64_t head_dim, const int64_t* x_strides, const int64_t* out_strides, int64_t text_len,
                         int64_t token_begin, int inverse) {
  P->x = x;
  P->out = out;
  P->batch = batch;
  P->seq = seq;
  P->heads = heads;
  P->head_dim = head_dim;
  P->x_stride_b = x_strides[0];
  P->x_stride_s = x_strides[1];
  P->x_stride_h = x_strides[2];
  P->out_stride_b = out_strides[0];
  P->out_stride_s = out_strides[1];
  P->out_stride_h = out_strides[2];
  P->text_len = text_len;
  P->token_begin = token_begin;
  P->inverse = inverse != 0;
}

// Angle mode: grid (T, H, W), axes_dims, positions (T+H+W values in the math type) or null.
void emu_rope_set_angles(RopeParams* P, const int64_t* grid, const int64_t* axes, int interleaved, double theta,
                         const void* positions) {
  P->mode = RopeMode::kAngles;
  for (int i = 0; i < 3; ++i) {
    P->grid[i] = int(grid[i]);
    P->axes[i] = int(axes[i]);
  }
  P->interleaved = interleaved != 0;
  P->log2_theta = std::log2(theta);
  P->positions = positions;
}

// Table mode: [T*H*W, head_dim] cos and sin tables with row stride table_stride (interleaved pairs).
void emu_rope_set_table(RopeParams* P, const void* cos, const void* sin, int64_t table_stride) {
  P->mode = RopeMode::kTable;
  P->interleaved = true;
  P->cos = cos;
  P->sin = sin;
  P->table_stride = table_stride;
}

// x_dtype, table_dtype: DType codes (0 half, 1 bfloat16, 2 float). Returns the layout used, or -1.
int emu_rope3d(const RopeParams* P, int x_dtype, int table_dtype) {
  if (launch_rope3d(*P, DType(x_dtype), DType(table_dtype), nullptr) != cudaSuccess) return -1;
  return int(rope_launch_plan(*P, DType(x_dtype) == DType::kFloat ? 4 : 2).layout);
}

}  // extern "C"
