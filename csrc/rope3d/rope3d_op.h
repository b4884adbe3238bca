// The 3D RoPE ops (cogkern::rope3d, rope3d_, rope_table, rope_table_):
// argument checks, parameter packing, and the op bodies, templated over the
// backend so that the CPU (rope3d_op.cpp) and CUDA (rope3d_op_cuda.cpp)
// registrations share one definition. Checks raise ValueError naming the
// argument, before any kernel runs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>

#include "rope3d/rope3d_math.h"
#include "common/torch/glue.h"

namespace cogkern::ops {

// x_name: what the caller calls x in its messages ("x" for the RoPE ops, "q" for attention).
inline void check_rope_x(const char* op, const at::Tensor& x, int64_t text_len, const char* x_name) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", x_name, " must be 4-D (batch, seq, heads, head_dim), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op, ": ", x_name,
                    " must be float16, bfloat16, float32 or float64, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(!(x.is_cuda() && x.scalar_type() == at::kDouble), op, ": ", x_name,
                    " of dtype float64 is supported on the CPU only");
  TORCH_CHECK_VALUE(x.size(3) % 2 == 0 && x.size(3) > 0, op, ": ", x_name,
                    "'s head_dim must be a positive even number, got ", x.size(3));
  TORCH_CHECK_VALUE(x.stride(3) == 1, op, ": ", x_name, "'s last dimension must have stride 1, got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(text_len >= 0 && text_len <= x.size(1), op, ": text_len must be an int in [0, seq=", x.size(1),
                    "], got ", text_len);
}

inline void check_inplace_target(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes, op,
                    ": x has overlapping memory (e.g. an expanded view) and cannot be rotated in place");
}

inline void fill_layout(RopeParams& P, const at::Tensor& x, const at::Tensor& out, int64_t text_len, bool inplace) {
  P.x = x.data_ptr();
  P.out = out.data_ptr();
  P.batch = x.size(0);
  P.seq = x.size(1);
  P.heads = x.size(2);
  P.head_dim = x.size(3);
  P.x_stride_b = x.stride(0);
  P.x_stride_s = x.stride(1);
  P.x_stride_h = x.stride(2);
  P.out_stride_b = out.stride(0);
  P.out_stride_s = out.stride(1);
  P.out_stride_h = out.stride(2);
  P.text_len = text_len;
  P.token_begin = inplace ? text_len : 0;
}

inline RopeParams rope3d_params(const char* op, const at::Tensor& x, const at::Tensor& out,
                                const std::optional<at::Tensor>& positions, at::IntArrayRef grid,
                                at::IntArrayRef axes, double theta, bool interleaved, int64_t text_len,
                                bool inverse, bool inplace, const char* x_name = "x") {
  check_rope_x(op, x, text_len, x_name);
  TORCH_CHECK_VALUE(grid.size() == 3, op, ": grid must have 3 entries (T, H, W), got ", grid);
  TORCH_CHECK_VALUE(axes.size() == 3, op, ": axes_dims must have 3 entries, got ", axes);
  int64_t n_video = 1;
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(grid[i] >= 1 && grid[i] < (int64_t(1) << 30), op, ": grid entries must be >= 1, got ", grid);
    n_video *= grid[i];
  }
  TORCH_CHECK_VALUE(x.size(1) == text_len + n_video, op, ": ", x_name, " has seq=", x.size(1), " but text_len + T*H*W = ",
                    text_len, " + ", n_video, " = ", text_len + n_video, " (grid ", grid, ")");
  int64_t axes_sum = 0;
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(axes[i] >= 0 && axes[i] % 2 == 0, op, ": axes_dims must be even and >= 0, got ", axes);
    axes_sum += axes[i];
  }
  TORCH_CHECK_VALUE(axes_sum <= x.size(3), op, ": axes_dims ", axes, " sum to more than ", x_name, "'s head_dim=", x.size(3));
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 0, op, ": theta must be positive and finite, got ", theta);
  if (positions.has_value()) {
    const at::Tensor& pos = *positions;
    const int64_t n = grid[0] + grid[1] + grid[2];
    TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == n, op, ": positions must be 1-D with T+H+W=", n,
                      " entries, got shape ", pos.sizes());
    TORCH_CHECK_VALUE(pos.scalar_type() == acc_dtype(x.scalar_type()), op, ": positions must be ",
                      dtype_name(acc_dtype(x.scalar_type())), " for ", x_name, " of dtype ",
                      dtype_name(x.scalar_type()), ", got ", dtype_name(pos.scalar_type()));
    TORCH_CHECK_VALUE(pos.device() == x.device(), op, ": positions is on ", pos.device(), " but ", x_name, " is on ",
                      x.device());
    TORCH_CHECK_VALUE(pos.is_contiguous(), op, ": positions must be contiguous");
  }
  if (inplace) check_inplace_target(op, x);

  RopeParams P;
  fill_layout(P, x, out, text_len, inplace);
  P.mode = RopeMode::kAngles;
  P.inverse = inverse;
  for (int i = 0; i < 3; ++i) {
    P.grid[i] = int(grid[i]);
    P.axes[i] = int(axes[i]);
  }
  P.interleaved = interleaved;
  P.log2_theta = std::log2(theta);
  P.positions = positions.has_value() ? positions->data_ptr() : nullptr;
  return P;
}

inline RopeParams rope_table_params(const char* op, const at::Tensor& x, const at::Tensor& out,
                                    const at::Tensor& cos, const at::Tensor& sin, int64_t text_len, bool transpose,
                                    bool inplace, const char* x_name = "x") {
  check_rope_x(op, x, text_len, x_name);
  const int64_t n_video = x.size(1) - text_len;
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == n_video && t->size(1) == x.size(3), op, ": rope table ", name,
                      " must have shape (seq - text_len, head_dim) = (", n_video, ", ", x.size(3), "), got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat || t->scalar_type() == x.scalar_type(), op, ": rope table ",
                      name, " must be float32 or ", x_name, "'s dtype ", dtype_name(x.scalar_type()), ", got ",
                      dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": rope table ", name, " is on ", t->device(), " but ", x_name,
                      " is on ", x.device());
    TORCH_CHECK_VALUE(t->stride(1) == 1 || t->size(1) == 1, op, ": rope table ", name,
                      "'s last dimension must have stride 1");
  }
  TORCH_CHECK_VALUE(cos.scalar_type() == sin.scalar_type(), op, ": rope tables cos and sin must have the same dtype, got ",
                    dtype_name(cos.scalar_type()), " and ", dtype_name(sin.scalar_type()));
  TORCH_CHECK_VALUE(cos.stride(0) == sin.stride(0), op, ": rope tables cos and sin must have the same strides, got ",
                    cos.strides(), " and ", sin.strides());
  if (inplace) check_inplace_target(op, x);

  RopeParams P;
  fill_layout(P, x, out, text_len, inplace);
  P.mode = RopeMode::kTable;
  P.inverse = transpose;
  P.interleaved = true;
  P.cos = cos.data_ptr();
  P.sin = sin.data_ptr();
  P.table_stride = cos.stride(0);
  return P;
}

// Backend: a type with `static void run(const RopeParams&, const at::Tensor& x, at::ScalarType table_dtype)`.
template <typename Backend>
struct RopeOps {
  static at::Tensor rope3d(const at::Tensor& x, const std::optional<at::Tensor>& positions, at::IntArrayRef grid,
                           at::IntArrayRef axes, double theta, bool interleaved, int64_t text_len, bool inverse) {
    at::Tensor out = at::empty_like(x);
    const RopeParams P =
        rope3d_params("rope3d", x, out, positions, grid, axes, theta, interleaved, text_len, inverse, false);
    Backend::run(P, x, at::kFloat);
    return out;
  }

  static void rope3d_(const at::Tensor& x, const std::optional<at::Tensor>& positions, at::IntArrayRef grid,
                      at::IntArrayRef axes, double theta, bool interleaved, int64_t text_len, bool inverse) {
    const RopeParams P =
        rope3d_params("rope3d_", x, x, positions, grid, axes, theta, interleaved, text_len, inverse, true);
    Backend::run(P, x, at::kFloat);
  }

  static at::Tensor rope_table(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t text_len,
                               bool transpose) {
    at::Tensor out = at::empty_like(x);
    const RopeParams P = rope_table_params("rope_table", x, out, cos, sin, text_len, transpose, false);
    Backend::run(P, x, cos.scalar_type());
    return out;
  }

  static void rope_table_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t text_len,
                          bool transpose) {
    const RopeParams P = rope_table_params("rope_table_", x, x, cos, sin, text_len, transpose, true);
    Backend::run(P, x, cos.scalar_type());
  }
};

}  // namespace cogkern::ops
