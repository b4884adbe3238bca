// Fused attention (CogVideoX): per-head QK-norm, then 3D RoPE on the video
// tokens, then softmax(scale * q k^T) v — the parameters and the math shared by
// the CPU backend (csrc/attention/attention_cpu.cpp) and the CUDA kernel.
//
// Layout: q, k, v, out, grad_out, grad_q/k/v are [batch, seq, heads, head_dim]
// with any strides whose last is 1; lse is [batch, heads, seq], contiguous.
// Per (batch, head), with x_s the row of token s:
//     q^_s = R_s(norm_q(q_s)),   k^_s = R_s(norm_k(k_s))     (R_s = identity for s < text_len)
//     P_ij = exp(scale * q^_i . k^_j - lse_i),   lse_i = log sum_j exp(scale * q^_i . k^_j)
//     out_i = sum_j P_ij v_j                               (j <= i when causal)
// The backward recomputes q^, k^ and P (from lse), then
//     dv_j  = sum_i P_ij do_i,        dP_ij = do_i . v_j,
//     dS_ij = P_ij (dP_ij - delta_i) with delta_i = do_i . out_i - dlse_i,
//     dq^_i = scale sum_j dS_ij k^_j, dk^_j = scale sum_i dS_ij q^_i,
// and pulls dq^, dk^ back through R^T (transposed rotation) and the norm.
#pragma once

#include "common/host_device.h"
#include "rope3d/rope3d_math.h"

namespace cogkern {

enum class NormKind : int { kNone = 0, kLayerNorm = 1, kRMSNorm = 2 };

// A [batch, seq, heads, head_dim] tensor: base pointer and strides in elements (last stride 1).
struct BshdTensor {
  const void* ptr = nullptr;
  int64_t stride_b = 0, stride_s = 0, stride_h = 0;
  CK_HD int64_t offset(int64_t b, int64_t s, int64_t h) const { return b * stride_b + s * stride_s + h * stride_h; }
};
struct BshdTensorMut {
  void* ptr = nullptr;
  int64_t stride_b = 0, stride_s = 0, stride_h = 0;
  CK_HD int64_t offset(int64_t b, int64_t s, int64_t h) const { return b * stride_b + s * stride_s + h * stride_h; }
};

// Per-head normalization of q or k over head_dim. The affine parameters are in
// the math type (float, or double for float64 inputs); nullptr = absent
// (weight 1, bias 0).
struct NormParams {
  const void* weight = nullptr;  // [head_dim]
  const void* bias = nullptr;    // [head_dim]
  void* grad_weight = nullptr;   // [head_dim], math type; backward only, written when weight != nullptr
  void* grad_bias = nullptr;     // [head_dim], math type; backward only, written when bias != nullptr
};

struct AttentionParams {
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
  DType dtype = DType::kFloat;  // of q, k, v, out, grad_out, grad_q/k/v

  BshdTensor q, k, v;
  BshdTensorMut out;  // forward output
  void* lse = nullptr;  // [batch, heads, seq], math type; written by the forward, read by the backward

  // Backward only.
  BshdTensor out_saved, grad_out;
  const void* grad_lse = nullptr;  // [batch, heads, seq] contiguous, math type; nullptr = zero
  BshdTensorMut grad_q, grad_k, grad_v;

  NormKind norm = NormKind::kNone;
  double norm_eps = 1e-6;
  NormParams q_norm, k_norm;

  // RoPE on tokens [text_len, seq): only the rotation fields of RopeParams are
  // used (mode, grid, axes, interleaved, log2_theta, positions, cos, sin,
  // table_stride, text_len); its x/out fields stay empty.
  bool has_rope = false;
  RopeParams rope;
  DType rope_table_dtype = DType::kFloat;  // kTable mode: float32 or the input dtype

  int64_t text_len = 0;
  double scale = 1.0;
  bool causal = false;
  // torch.use_deterministic_algorithms(True) is on: a backend whose fastest
  // backward sums in a run-dependent order (atomics) must use an ordered one.
  bool deterministic = false;
};

// ---------------------------------------------------------------------------
// Per-row normalization pieces. A row x of length D is normalized as
//     x^ = (x - center) * rstd,   y = x^ * w + b
// with center = mean(x) (LayerNorm) or 0 (RMSNorm) and
//     rstd = 1 / sqrt(mean((x - center)^2) + eps).
// The reductions (sums over the row) are the caller's: sequential on the CPU,
// warp shuffles on the GPU; these functions hold everything else.
// ---------------------------------------------------------------------------

template <typename A>
CK_HD A norm_center(NormKind kind, A row_sum, int64_t d) {
  return kind == NormKind::kLayerNorm ? row_sum / A(d) : A(0);
}

template <typename A>
CK_HD A norm_rstd(A centered_sum_sq, int64_t d, double eps) {
  return A(1) / std::sqrt(centered_sum_sq / A(d) + A(eps));
}

template <typename A>
CK_HD A norm_affine(A xhat, const A* weight, const A* bias, int c) {
  const A w = weight ? weight[c] : A(1);
  const A b = bias ? bias[c] : A(0);
  return xhat * w + b;
}

// dL/dx of one element, given g = dL/dx^ (= dy * w) and the row means
// mean_g = mean(g), mean_gx = mean(g * x^). LayerNorm removes both the mean and
// the x^ component of g; RMSNorm only the x^ component.
template <typename A>
CK_HD A norm_input_grad(NormKind kind, A g, A xhat, A rstd, A mean_g, A mean_gx) {
  const A centered = kind == NormKind::kLayerNorm ? g - mean_g : g;
  return rstd * (centered - xhat * mean_gx);
}

// Sequential whole-row versions of the above (the CPU backend's; a GPU thread
// that owns a whole row may use them too). D <= a few hundred.

template <typename A>
struct RowNormStats {
  A center, rstd;
};

// Sum of a row in eight interleaved partial sums: a CPU loop then vectorizes
// instead of waiting on one accumulator's add latency.
template <typename A>
CK_HD A row_sum(const A* x, int64_t d) {
  A part[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) part[u] += x[c + u];
  A sum = 0;
  for (; c < d; ++c) sum += x[c];
  for (int u = 0; u < 8; ++u) sum += part[u];
  return sum;
}

// Sum of (x - center)^2 over a row, likewise.
template <typename A>
CK_HD A row_centered_sum_sq(const A* x, A center, int64_t d) {
  A part[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) {
      const A t = x[c + u] - center;
      part[u] += t * t;
    }
  A sum = 0;
  for (; c < d; ++c) sum += (x[c] - center) * (x[c] - center);
  for (int u = 0; u < 8; ++u) sum += part[u];
  return sum;
}

template <typename A>
CK_HD RowNormStats<A> norm_row_stats(NormKind kind, const A* x, int64_t d, double eps) {
  const A center = kind == NormKind::kLayerNorm ? norm_center<A>(kind, row_sum<A>(x, d), d) : A(0);
  return {center, norm_rstd<A>(row_centered_sum_sq<A>(x, center, d), d, eps)};
}

// y = norm(x) in place (kind != kNone).
template <typename A>
CK_HD void norm_row_forward(NormKind kind, A* x, int64_t d, double eps, const A* weight, const A* bias) {
  const RowNormStats<A> st = norm_row_stats<A>(kind, x, d, eps);
  // Separate passes (same arithmetic as norm_affine) so that each vectorizes.
  for (int64_t c = 0; c < d; ++c) x[c] = (x[c] - st.center) * st.rstd;
  if (weight)
    for (int64_t c = 0; c < d; ++c) x[c] *= weight[c];
  if (bias)
    for (int64_t c = 0; c < d; ++c) x[c] += bias[c];
}

// Given the row x (pre-norm) and dy = dL/dy, writes dx = dL/dx and adds this
// row's share of dL/dweight and dL/dbias (when those pointers are non-null).
// xhat_scratch holds D values; dx must not alias x or dy.
template <typename A>
CK_HD void norm_row_backward(NormKind kind, const A* x, const A* dy, int64_t d, double eps, const A* weight,
                             A* dx, A* grad_weight, A* grad_bias, A* xhat_scratch) {
  const RowNormStats<A> st = norm_row_stats<A>(kind, x, d, eps);
  // g = dy * w lives in dx until dx overwrites it element by element.
  A* g = dx;
  for (int64_t c = 0; c < d; ++c) {
    xhat_scratch[c] = (x[c] - st.center) * st.rstd;
    g[c] = weight ? dy[c] * weight[c] : dy[c];
  }
  if (grad_weight)
    for (int64_t c = 0; c < d; ++c) grad_weight[c] += dy[c] * xhat_scratch[c];
  if (grad_bias)
    for (int64_t c = 0; c < d; ++c) grad_bias[c] += dy[c];
  const A mean_g = row_sum<A>(g, d) / A(d);
  A part[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) part[u] += g[c + u] * xhat_scratch[c + u];
  A sum_gx = 0;
  for (; c < d; ++c) sum_gx += g[c] * xhat_scratch[c];
  for (int u = 0; u < 8; ++u) sum_gx += part[u];
  const A mean_gx = sum_gx / A(d);
  for (c = 0; c < d; ++c) dx[c] = norm_input_grad<A>(kind, g[c], xhat_scratch[c], st.rstd, mean_g, mean_gx);
}

// ---------------------------------------------------------------------------
// RoPE inside attention: the forward mixes each channel pair with the
// coefficients of rope3d_math.h; the backward applies the transposed mix.
// ---------------------------------------------------------------------------

template <typename A>
CK_HD PairCoeffs<A> transpose_coeffs(const PairCoeffs<A>& k) {
  return {k.a0, k.b1, k.a1, k.b0};
}

// Rotates row x (length D) in place with the per-pair coefficients coeffs[p]
// and channel indices c0[p], c1[p] (pass `transpose` for the backward).
template <typename A>
CK_HD void rope_row(A* x, int half_d, const PairCoeffs<A>* coeffs, const int* c0, const int* c1, bool transpose) {
  for (int p = 0; p < half_d; ++p) {
    const PairCoeffs<A> k = transpose ? transpose_coeffs<A>(coeffs[p]) : coeffs[p];
    A y0, y1;
    rope_mix<A>(x[c0[p]], x[c1[p]], k, &y0, &y1);
    x[c0[p]] = y0;
    x[c1[p]] = y1;
  }
}

// ---------------------------------------------------------------------------
// Online softmax (FlashAttention-2). Scores s are raw dot products q^ . k^; the
// exponentials are taken base 2 with the scale folded in:
//     exp(scale * (s - m)) = exp2(s * c - m * c),   c = scale * log2(e).
// The running row state is (max m of raw scores, sum l of exp(scale*(s - m))).
// ---------------------------------------------------------------------------

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename A>
CK_HD A softmax_log2_scale(double scale) {
  return A(scale * kLog2e);
}

// The subtracted term m * c; 0 while the row has seen only -inf scores, so
// that exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
template <typename A>
CK_HD A softmax_shift(A row_max, A c) {
  return row_max == -INFINITY ? A(0) : row_max * c;
}

// Factor that rescales the old (sum, output) when the row max grows from
// old_max to new_max (new_max >= old_max, or NaN which propagates).
template <typename A>
CK_HD A softmax_rescale(A old_max, A new_max, A c) {
  if (old_max == -INFINITY) return A(0);  // nothing accumulated yet
  return exp2_acc(old_max * c - softmax_shift<A>(new_max, c));
}

// The larger of two maxima, NaN-propagating (a NaN score must reach the output).
template <typename A>
CK_HD A softmax_max(A a, A b) {
  return (b > a || b != b) ? b : a;
}

// lse (natural log) of a finished row: log(l) + scale * m.
template <typename A>
CK_HD A softmax_lse(A row_max, A row_sum, double scale) {
  if (row_max == -INFINITY) return std::log(row_sum);  // -inf for an empty row; NaN stays NaN
  return std::log(row_sum) + A(scale) * row_max;
}

// The shift that recomputes P from the lse in the backward:
//     P = exp(scale * s - lse) = exp2(s * c - lse * log2(e)).
template <typename A>
CK_HD A softmax_lse_shift(A lse) {
  return lse == -INFINITY ? A(INFINITY) : lse * A(kLog2e);
}

}  // namespace cogkern
