// CPU backend of the 3D RoPE op, parallel over tokens.
//
// The math is rope3d/rope3d_math.h's, shared with the CUDA kernel. In kAngles mode
// the trigonometry is done once per (axis position, pair) (AxisRotations) and
// looked up per token. Each token's coefficients are applied to all its
// (batch, head) rows.
#include "rope3d/rope3d_cpu.h"

#include "rope3d/rope_axis_rotations.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>
#include <vector>

namespace cogkern::cpu {
namespace {

template <typename A>
struct CoeffRow {  // structure of arrays, so the row loop vectorizes
  std::vector<A> a0, b0, a1, b1;
  explicit CoeffRow(int n) : a0(n), b0(n), a1(n), b1(n) {}
  void set(int p, const PairCoeffs<A>& k) {
    a0[p] = k.a0;
    b0[p] = k.b0;
    a1[p] = k.a1;
    b1[p] = k.b1;
  }
};

template <typename scalar_t, typename table_t>
void rope3d_typed(const RopeParams& P) {
  using A = acc_t<scalar_t>;
  const int half_d = int(P.head_dim / 2);
  const bool interleaved = P.mode == RopeMode::kTable || P.interleaved;
  std::vector<RopePair> pairs(half_d);
  for (int p = 0; p < half_d; ++p) pairs[p] = rope_pair(p, P.axes, interleaved);
  const AxisRotations<A> rotations(P);

  const scalar_t* x = static_cast<const scalar_t*>(P.x);
  scalar_t* out = static_cast<scalar_t*>(P.out);
  const int64_t rows = P.batch * P.heads;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * P.head_dim));

  at::parallel_for(P.token_begin, P.seq, grain, [&](int64_t begin, int64_t end) {
    CoeffRow<A> k(half_d);
    for (int64_t s = begin; s < end; ++s) {
      int64_t idx[3];
      rotations.indices(s - P.text_len, idx);
      for (int p = 0; p < half_d; ++p) {
        if (P.mode == RopeMode::kTable || s < P.text_len) {
          k.set(p, rope_coeffs<A, table_t>(P, s, p));
        } else {
          k.set(p, rotations.lookup(idx, pairs[p]));
        }
      }
      for (int64_t b = 0; b < P.batch; ++b) {
        for (int64_t h = 0; h < P.heads; ++h) {
          const scalar_t* xr = x + b * P.x_stride_b + s * P.x_stride_s + h * P.x_stride_h;
          scalar_t* yr = out + b * P.out_stride_b + s * P.out_stride_s + h * P.out_stride_h;
          if (interleaved) {
            for (int p = 0; p < half_d; ++p) {
              const A x0 = to_acc<A>(xr[2 * p]), x1 = to_acc<A>(xr[2 * p + 1]);
              yr[2 * p] = from_acc<scalar_t>(k.a0[p] * x0 + k.b0[p] * x1);
              yr[2 * p + 1] = from_acc<scalar_t>(k.a1[p] * x1 + k.b1[p] * x0);
            }
          } else {
            for (int p = 0; p < half_d; ++p) {
              const int c0 = pairs[p].c0, c1 = pairs[p].c1;
              const A x0 = to_acc<A>(xr[c0]), x1 = to_acc<A>(xr[c1]);
              yr[c0] = from_acc<scalar_t>(k.a0[p] * x0 + k.b0[p] * x1);
              yr[c1] = from_acc<scalar_t>(k.a1[p] * x1 + k.b1[p] * x0);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void rope3d_with_table(const RopeParams& P, DType table_dtype) {
  // Tables are float32 or x's dtype (checked by the op).
  if (P.mode == RopeMode::kAngles || table_dtype == DType::kFloat) return rope3d_typed<scalar_t, float>(P);
  return rope3d_typed<scalar_t, scalar_t>(P);
}

}  // namespace

void rope3d(const RopeParams& P, DType x_dtype, DType table_dtype) {
  switch (x_dtype) {
    case DType::kHalf:
      return rope3d_with_table<c10::Half>(P, table_dtype);
    case DType::kBFloat16:
      return rope3d_with_table<c10::BFloat16>(P, table_dtype);
    case DType::kFloat:
      return rope3d_with_table<float>(P, table_dtype);
    case DType::kDouble:
      return rope3d_with_table<double>(P, table_dtype);
  }
  throw std::invalid_argument("cogkern::cpu::rope3d: unsupported dtype");
}

}  // namespace cogkern::cpu
