// The 3D RoPE rotation of every (axis, position, pair) of a grid, for the CPU
// backends (RoPE op and attention prologue/epilogue).
//
// The CPU pays for trigonometry far more than a GPU does. In kAngles mode the
// rotation of pair p of a video token depends on one axis position only, so it
// is computed once per (axis position, pair) -- T*dt/2 + H*dh/2 + W*dw/2 sincos
// in all -- and looked up per token. Same arithmetic as rope_coeffs
// (rope3d/rope3d_math.h), so the same bits.
#pragma once

#include <cstdint>
#include <vector>

#include "rope3d/rope3d_math.h"

namespace cogkern::cpu {

template <typename A>
class AxisRotations {
 public:
  explicit AxisRotations(const RopeParams& P) : P_(P) {
    if (P.mode != RopeMode::kAngles) return;
    int n = 0;
    for (int a = 0; a < 3; ++a) {
      offset_[a] = n;
      n += P.grid[a] * (P.axes[a] / 2);
    }
    coeffs_.resize(n);
    for (int a = 0; a < 3; ++a) {
      const int half = P.axes[a] / 2;
      for (int idx = 0; idx < P.grid[a]; ++idx) {
        // a video token whose axis-a index is idx (the others 0), for rope_position
        const int64_t v = a == 0 ? int64_t(idx) * P.grid[1] * P.grid[2] : a == 1 ? int64_t(idx) * P.grid[2] : idx;
        const A pos = rope_position<A>(P, v, a);
        for (int j = 0; j < half; ++j)
          coeffs_[offset_[a] + idx * half + j] =
              rotation_coeffs<A>(pos * rope_inv_freq<A>(j, P.axes[a], P.log2_theta), P.inverse);
      }
    }
  }

  // The (t, h, w) grid indices of video token v (token s = text_len + v).
  void indices(int64_t v, int64_t idx[3]) const {
    idx[0] = v / (int64_t(P_.grid[1]) * P_.grid[2]);
    idx[1] = (v / P_.grid[2]) % P_.grid[1];
    idx[2] = v % P_.grid[2];
  }

  // Coefficients of pair `pr` for the video token at grid indices idx
  // (kAngles mode; identity for channels outside the three axes).
  PairCoeffs<A> lookup(const int64_t idx[3], const RopePair& pr) const {
    if (pr.axis < 0) return identity_coeffs<A>();
    const int a = pr.axis;
    return coeffs_[offset_[a] + idx[a] * (P_.axes[a] / 2) + pr.j];
  }

 private:
  const RopeParams& P_;
  std::vector<PairCoeffs<A>> coeffs_;
  int offset_[3] = {0, 0, 0};  // start of axis a's [grid[a]][axes[a]/2] block
};

}  // namespace cogkern::cpu
