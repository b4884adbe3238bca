// CPU backend of the 3D RoPE op. Parallel over tokens: each task computes the
// mixing coefficients of its tokens once (kernels/rope3d.h, shared with CUDA)
// and applies them to every (batch, head) row of those tokens.
#include "cpu/rope3d_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>
#include <vector>

namespace cogkern::cpu {
namespace {

template <typename scalar_t, typename table_t>
void rope3d_typed(const RopeParams& P) {
  using A = acc_t<scalar_t>;
  const int half_d = int(P.head_dim / 2);
  const scalar_t* x = static_cast<const scalar_t*>(P.x);
  scalar_t* out = static_cast<scalar_t*>(P.out);
  const int64_t rows = P.batch * P.heads;
  // Small grains still give each task a few thousand elements.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, rows * P.head_dim));

  at::parallel_for(P.token_begin, P.seq, grain, [&](int64_t begin, int64_t end) {
    std::vector<PairCoeffs<A>> k(half_d);
    std::vector<int> c0(half_d), c1(half_d);
    for (int p = 0; p < half_d; ++p) {
      const bool interleaved = P.mode == RopeMode::kTable || P.interleaved;
      const RopePair pr = rope_pair(p, P.axes, interleaved);
      c0[p] = pr.c0;
      c1[p] = pr.c1;
    }
    for (int64_t s = begin; s < end; ++s) {
      for (int p = 0; p < half_d; ++p) k[p] = rope_coeffs<A, table_t>(P, s, p);
      for (int64_t b = 0; b < P.batch; ++b) {
        for (int64_t h = 0; h < P.heads; ++h) {
          const scalar_t* xr = x + b * P.x_stride_b + s * P.x_stride_s + h * P.x_stride_h;
          scalar_t* yr = out + b * P.out_stride_b + s * P.out_stride_s + h * P.out_stride_h;
          for (int p = 0; p < half_d; ++p) {
            A y0, y1;
            rope_mix<A>(to_acc<A>(xr[c0[p]]), to_acc<A>(xr[c1[p]]), k[p], &y0, &y1);
            yr[c0[p]] = from_acc<scalar_t>(y0);
            yr[c1[p]] = from_acc<scalar_t>(y1);
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
