// 3D rotary position embedding (CogVideoX) — the math, shared by the CUDA
// kernel (rope3d_launch.cu) and the CPU backend (csrc/rope3d/rope3d_cpu.cpp).
//
// x is [batch, seq, heads, head_dim]. Tokens [0, text_len) are the text prefix
// and are never rotated; token text_len + v is video token v, ordered t-major,
// then h, then w. The head dim is split into three axis slices (t, h, w) of
// `axes[i]` channels each; channels past their sum pass through.
//
// Every output channel pair is a 2x2 mix of the input pair:
//     y0 = a0 * x0 + b0 * x1,     y1 = a1 * x1 + b1 * x0
// A rotation by angle r is (a0, b0, a1, b1) = (cos r, -sin r, cos r, sin r).
// The kernels first compute these coefficients once per (token, pair) and then
// apply them to every (batch, head) row of that token, so the trigonometry is
// amortized over batch * heads rows.
#pragma once

#include "common/host_device.h"

namespace cogkern {

enum class RopeMode : int {
  kAngles = 0,  // angles computed in-kernel from positions and theta
  kTable = 1,   // per-(token, channel) cos/sin tables as diffusers builds them
};

struct RopeParams {
  const void* x = nullptr;
  void* out = nullptr;  // == x for the in-place op
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
  int64_t x_stride_b = 0, x_stride_s = 0, x_stride_h = 0;  // in elements; last stride is 1
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
  int64_t text_len = 0;     // tokens [0, text_len) pass through unchanged
  int64_t token_begin = 0;  // first token written: 0 (out-of-place) or text_len (in-place)
  RopeMode mode = RopeMode::kAngles;
  bool inverse = false;  // angles: rotate by -angle; table: apply the transposed mix

  // kAngles
  int grid[3] = {1, 1, 1};   // T, H, W
  int axes[3] = {0, 0, 0};   // rotary channels of the t, h, w slices (each even)
  bool interleaved = true;   // pairs (2j, 2j+1) of a slice, else (j, j + d/2)
  double log2_theta = 0.0;   // log2 of the frequency base
  const void* positions = nullptr;  // nullptr: integer positions; else T+H+W values (math type)

  // kTable (always interleaved pairs)
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t table_stride = 0;  // row stride of the [T*H*W, head_dim] tables
};

// One channel pair of the head dim: output channels c0 (first) and c1 (second).
struct RopePair {
  int c0, c1;
  int axis;  // 0, 1, 2; -1: pass-through
  int j;     // frequency index inside the axis: angle = pos * theta^(-2j/dim)
  int dim;   // the axis' rotary dim
};

// Pair p of the head dim, 0 <= p < head_dim / 2. Pairs are numbered so that
// pair p always owns channel 2p in interleaved mode; in half-split mode, pair p
// of an axis slice at offset o owns channels o + j and o + j + dim/2.
CK_HD RopePair rope_pair(int p, const int axes[3], bool interleaved) {
  int offset = 0;
  for (int a = 0; a < 3; ++a) {
    const int d = axes[a];
    if (2 * p < offset + d) {
      const int j = p - offset / 2;
      if (interleaved) return {offset + 2 * j, offset + 2 * j + 1, a, j, d};
      return {offset + j, offset + j + d / 2, a, j, d};
    }
    offset += d;
  }
  return {2 * p, 2 * p + 1, -1, 0, 0};
}

template <typename A>
struct PairCoeffs {
  A a0, b0, a1, b1;
};

template <typename A>
CK_HD PairCoeffs<A> identity_coeffs() {
  return {A(1), A(0), A(1), A(0)};
}

// Rotation by `angle` (or by -angle when inverse: the transpose of a rotation).
template <typename A>
CK_HD PairCoeffs<A> rotation_coeffs(A angle, bool inverse) {
  A s, c;
  sincos_acc(angle, &s, &c);
  if (inverse) s = -s;
  return {c, -s, c, s};
}

// diffusers' apply_rotary_emb: y = x * cos + rotate_half(x) * sin, with
// rotate_half(x)[2j] = -x[2j+1], rotate_half(x)[2j+1] = x[2j]. The tables need
// not repeat their values within a pair, so the backward is the exact transpose.
template <typename A>
CK_HD PairCoeffs<A> table_coeffs(A cos0, A cos1, A sin0, A sin1, bool transpose) {
  if (!transpose) return {cos0, -sin0, cos1, sin1};
  return {cos0, sin1, cos1, -sin0};
}

// Position of video token v along `axis` (integer index or the given position).
template <typename A>
CK_HD A rope_position(const RopeParams& P, int64_t v, int axis) {
  const int64_t hw = int64_t(P.grid[1]) * P.grid[2];
  int64_t idx;
  int offset;
  if (axis == 0) {
    idx = v / hw;
    offset = 0;
  } else if (axis == 1) {
    idx = (v / P.grid[2]) % P.grid[1];
    offset = P.grid[0];
  } else {
    idx = v % P.grid[2];
    offset = P.grid[0] + P.grid[1];
  }
  if (P.positions == nullptr) return A(idx);
  return static_cast<const A*>(P.positions)[offset + idx];
}

// theta^(-2j/d) as exp2(-(2j/d) * log2(theta)).
template <typename A>
CK_HD A rope_inv_freq(int j, int d, double log2_theta) {
  return exp2_acc(-(A(2 * j) / A(d)) * A(log2_theta));
}

// The coefficients of pair p for token s (a token index into the full sequence).
// T is the table element type (unused in kAngles mode).
template <typename A, typename T>
CK_HD PairCoeffs<A> rope_coeffs(const RopeParams& P, int64_t s, int p) {
  if (s < P.text_len) return identity_coeffs<A>();
  const int64_t v = s - P.text_len;
  if (P.mode == RopeMode::kTable) {
    const T* cr = static_cast<const T*>(P.cos) + v * P.table_stride + 2 * p;
    const T* sr = static_cast<const T*>(P.sin) + v * P.table_stride + 2 * p;
    return table_coeffs<A>(to_acc<A>(cr[0]), to_acc<A>(cr[1]), to_acc<A>(sr[0]), to_acc<A>(sr[1]), P.inverse);
  }
  const RopePair pr = rope_pair(p, P.axes, P.interleaved);
  if (pr.axis < 0) return identity_coeffs<A>();
  const A angle = rope_position<A>(P, v, pr.axis) * rope_inv_freq<A>(pr.j, pr.dim, P.log2_theta);
  return rotation_coeffs<A>(angle, P.inverse);
}

template <typename A>
CK_HD void rope_mix(A x0, A x1, const PairCoeffs<A>& k, A* y0, A* y1) {
  *y0 = k.a0 * x0 + k.b0 * x1;
  *y1 = k.a1 * x1 + k.b1 * x0;
}

}  // namespace cogkern
