// CPU backend of the fused attention op: FlashAttention-2's blocked online
// softmax, never materializing the seq x seq matrix.
//
// Stages (each an at::parallel_for):
//   1. prologue, over token blocks: q^ = R(norm(q)), k^ = R(norm(k)) in the
//      math type into [batch, heads, seq, head_dim] scratch panels, so the tile
//      GEMMs read contiguous rows and the norm + RoPE run once per token
//      instead of once per tile pair (v and grad_out are copied only when they
//      need a conversion to the math type). The rotation coefficients of a
//      token are computed once and reused over batch * heads rows.
//   2. forward, over (batch, head, query tile): for each key tile, scores by
//      GEMM, online softmax update of the running max / sum / output, P.V by
//      GEMM; lse saved.
//      backward, over (batch, head): for each key tile, for each query tile,
//      P recomputed from lse, dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
//      dQ^ += dS K^, dK^ += dS^T Q^ (deterministic: no cross-task sums; with
//      fewer (batch, head) pairs than threads, split into a key-tile-parallel
//      dK/dV pass and a query-tile-parallel dQ pass, same sums in same order).
//   3. backward epilogue, over token blocks: dq^, dk^ through R^T and the norm
//      backward; the norm parameter grads are summed per fixed token block and
//      then in block order, so they do not depend on the thread count.
// The normalized and rotated q, k are recomputed by the backward rather than
// saved by the forward: the prologue is O(seq * head_dim) against the
// O(seq^2 * head_dim) attention, and it keeps autograd from holding two more
// fp32 copies of q and k between forward and backward.
//
// The tile GEMMs go through at::mm (BLAS); the softmax exponentials use a
// vectorizable exp2 (common/cpu/fast_exp2.h).

// Comparisons that may not trap are what lets GCC turn the clamps in
// exp2_vectorizable and the max reductions into SIMD selects (torch itself
// builds with this flag; nothing here reads floating-point exception flags).
// It comes before every include so that header functions get the same options
// and still inline into this file's loops.
#pragma GCC optimize("no-trapping-math")

#include "attention/attention_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <stdexcept>
#include <vector>


#include "common/cpu/fast_exp2.h"
#include "rope3d/rope_axis_rotations.h"
#include "common/cpu/serial_blas.h"
#include "common/cpu/simd_clones.h"

namespace cogkern::cpu {
namespace {

// A 256 x 512 fp32 score tile (512 KB) stays in L2 next to its K and V tiles,
// and the GEMMs are large enough to amortize at::mm's per-call cost (torch's
// own CPU flash attention uses the same split for long sequences). Fixed, not
// tuned to the thread count: the tiles set the order of the sums, and the
// results must not depend on the number of threads.
constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockK = 512;
// Tokens per prologue/epilogue task, and per partial sum of the norm grads.
constexpr int64_t kTokenBlock = 16;

// A row-major [rows, cols] matrix over raw memory with row stride ld, for at::mm.
template <typename A>
at::Tensor matrix(const A* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<A*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

// Scratch of shape [batch, heads, seq, head_dim] in the math type: one
// contiguous [seq, head_dim] panel per (batch, head).
template <typename A>
struct Panels {
  at::Tensor storage;
  int64_t seq = 0, head_dim = 0;
  Panels(const AttentionParams& P)
      : storage(at::empty({P.batch * P.heads * P.seq * P.head_dim},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value))),
        seq(P.seq),
        head_dim(P.head_dim) {}
  A* panel(int64_t bh) const { return storage.data_ptr<A>() + bh * seq * head_dim; }
  A* row(int64_t bh, int64_t s) const { return panel(bh) + s * head_dim; }
};

// The rows of an input ([batch, seq, heads, head_dim]) in the math type, by
// (batch * heads + head, token): the input itself when it is already in the
// math type (the GEMMs read it through its own row stride, no copy), else a
// converted panel that the prologue fills.
template <typename A, typename scalar_t>
class MathRows {
 public:
  MathRows(const AttentionParams& P, const BshdTensor& t) : P_(P), t_(t) {
    if constexpr (!std::is_same_v<A, scalar_t>) panel_.emplace(P);
  }
  // The row to write in the prologue, or nullptr when the input is used as is.
  A* fill_row(int64_t bh, int64_t s) const { return panel_ ? panel_->row(bh, s) : nullptr; }
  const A* row(int64_t bh, int64_t s) const {
    if (panel_) return panel_->row(bh, s);
    return static_cast<const A*>(t_.ptr) + t_.offset(bh / P_.heads, s, bh % P_.heads);
  }
  int64_t ld() const { return panel_ ? P_.head_dim : t_.stride_s; }

 private:
  const AttentionParams& P_;
  BshdTensor t_;
  std::optional<Panels<A>> panel_;
};

// The RoPE coefficients of one token, for every channel pair of the head dim
// (angles mode: looked up in the call's AxisRotations, no trigonometry per token).
// Interleaved pairs (CogVideoX, and every (cos, sin) table) are pair p =
// channels (2p, 2p+1); for those the coefficients are kept as separate arrays
// so that the rotation is a branch-free loop the compiler vectorizes. Other
// layouts go through the shared rope_row.
template <typename A, typename scalar_t>
class TokenRope {
 public:
  TokenRope(const AttentionParams& P, const AxisRotations<A>& rotations)
      : P_(P), rotations_(rotations), half_d_(int(P.head_dim / 2)) {
    if (!P.has_rope) return;
    interleaved_ = P.rope.mode == RopeMode::kTable || P.rope.interleaved;
    c0_.resize(half_d_);
    c1_.resize(half_d_);
    coeffs_.resize(half_d_);
    for (auto* v : {&a0_, &b0_, &a1_, &b1_}) v->resize(half_d_);
    pairs_.resize(half_d_);
    for (int p = 0; p < half_d_; ++p) {
      pairs_[p] = rope_pair(p, P.rope.axes, interleaved_);
      c0_[p] = pairs_[p].c0;
      c1_[p] = pairs_[p].c1;
    }
  }

  // Loads token s's coefficients; false when token s is not rotated.
  bool load(int64_t s) {
    if (!P_.has_rope || s < P_.text_len) return false;
    const bool angles = P_.rope.mode == RopeMode::kAngles;
    int64_t idx[3] = {0, 0, 0};
    if (angles) rotations_.indices(s - P_.text_len, idx);
    for (int p = 0; p < half_d_; ++p) {
      const PairCoeffs<A> k = angles ? rotations_.lookup(idx, pairs_[p])
                              : P_.rope_table_dtype == DType::kFloat ? rope_coeffs<A, float>(P_.rope, s, p)
                                                                     : rope_coeffs<A, scalar_t>(P_.rope, s, p);
      coeffs_[p] = k;
      a0_[p] = k.a0;
      b0_[p] = k.b0;
      a1_[p] = k.a1;
      b1_[p] = k.b1;
    }
    return true;
  }

  // The mix of rope3d_math.h (or its transpose): y0 = a0 x0 + b0 x1, y1 = a1 x1 + b1 x0.
  void apply(A* row, bool transpose) const {
    if (!interleaved_) return rope_row<A>(row, half_d_, coeffs_.data(), c0_.data(), c1_.data(), transpose);
    const A* b0 = transpose ? b1_.data() : b0_.data();  // the transpose swaps b0 and b1
    const A* b1 = transpose ? b0_.data() : b1_.data();
    const A* a0 = a0_.data();
    const A* a1 = a1_.data();
    for (int p = 0; p < half_d_; ++p) {
      const A x0 = row[2 * p], x1 = row[2 * p + 1];
      row[2 * p] = a0[p] * x0 + b0[p] * x1;
      row[2 * p + 1] = a1[p] * x1 + b1[p] * x0;
    }
  }

 private:
  const AttentionParams& P_;
  const AxisRotations<A>& rotations_;
  int half_d_;
  bool interleaved_ = true;
  std::vector<RopePair> pairs_;
  std::vector<int> c0_, c1_;
  std::vector<PairCoeffs<A>> coeffs_;
  std::vector<A> a0_, b0_, a1_, b1_;
};

template <typename A, typename scalar_t>
void load_row(A* dst, const scalar_t* src, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = to_acc<A>(src[c]);
}

template <typename A, typename scalar_t>
void store_row(scalar_t* dst, const A* src, int64_t d, A factor) {
  for (int64_t c = 0; c < d; ++c) dst[c] = from_acc<scalar_t>(src[c] * factor);
}

// The softmax row kernels below are cloned per x86 SIMD level
// (common/cpu/simd_clones.h) so that the exponentials run 8 or 16 wide where the CPU allows.

// sum_c a[c] * b[c], in eight partial sums so that the loop vectorizes.
template <typename A, typename scalar_t>
A dot_row(const A* a, const scalar_t* b, int64_t d) {
  A part[8] = {};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int u = 0; u < 8; ++u) part[u] += a[c + u] * to_acc<A>(b[c + u]);
  A sum = 0;
  for (; c < d; ++c) sum += a[c] * to_acc<A>(b[c]);
  for (int u = 0; u < 8; ++u) sum += part[u];
  return sum;
}

// s[j] = exp2(s[j] * c - shift) for j < valid, 0 for valid <= j < cols; returns the sum.
template <typename A>
__attribute__((always_inline)) inline A exp2_tile_row_impl(A* s, int64_t valid, int64_t cols, A c, A shift) {
  for (int64_t j = 0; j < valid; ++j) s[j] = exp2_vectorizable(s[j] * c - shift);
  for (int64_t j = std::max<int64_t>(valid, 0); j < cols; ++j) s[j] = A(0);
  // Eight partial sums: a single accumulator would serialize on the add latency.
  A part[8] = {};
  int64_t j = 0;
  for (; j + 8 <= valid; j += 8)
    for (int u = 0; u < 8; ++u) part[u] += s[j + u];
  A sum = 0;
  for (; j < valid; ++j) sum += s[j];
  for (int u = 0; u < 8; ++u) sum += part[u];
  return sum;
}

// max(s[0..n)) ignoring NaN (a NaN score reaches the output through exp2 and
// the sums instead). Written with GCC/Clang vector types: a scalar max
// reduction does not vectorize without -ffinite-math-only.
template <typename A>
struct Vec8;
template <>
struct Vec8<float> {
  typedef float type __attribute__((vector_size(8 * sizeof(float))));
};
template <>
struct Vec8<double> {
  typedef double type __attribute__((vector_size(8 * sizeof(double))));
};

template <typename A>
__attribute__((always_inline)) inline A row_max_impl(const A* s, int64_t n) {
  using Vec = typename Vec8<A>::type;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  Vec m = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Vec x;
    std::memcpy(&x, s + j, sizeof(Vec));
    m = x > m ? x : m;
  }
  A result = kNegInf;
  for (; j < n; ++j) result = s[j] > result ? s[j] : result;
  for (int u = 0; u < 8; ++u) result = m[u] > result ? m[u] : result;
  return result;
}

COGKERN_SIMD_CLONES float exp2_tile_row(float* s, int64_t valid, int64_t cols, float c, float shift) {
  return exp2_tile_row_impl<float>(s, valid, cols, c, shift);
}
double exp2_tile_row(double* s, int64_t valid, int64_t cols, double c, double shift) {
  return exp2_tile_row_impl<double>(s, valid, cols, c, shift);
}
COGKERN_SIMD_CLONES float row_max_of(const float* s, int64_t n) { return row_max_impl<float>(s, n); }
double row_max_of(const double* s, int64_t n) { return row_max_impl<double>(s, n); }

// The per-row norm (forward, backward), compiled per SIMD level for fp32:
// the prologue and epilogue run them for every (token, head) of q and k.
COGKERN_SIMD_CLONES void norm_forward(NormKind kind, float* x, int64_t d, double eps, const float* w, const float* b) {
  norm_row_forward<float>(kind, x, d, eps, w, b);
}
void norm_forward(NormKind kind, double* x, int64_t d, double eps, const double* w, const double* b) {
  norm_row_forward<double>(kind, x, d, eps, w, b);
}
COGKERN_SIMD_CLONES void norm_backward(NormKind kind, const float* x, const float* dy, int64_t d, double eps,
                                       const float* w, float* dx, float* gw, float* gb, float* scratch) {
  norm_row_backward<float>(kind, x, dy, d, eps, w, dx, gw, gb, scratch);
}
void norm_backward(NormKind kind, const double* x, const double* dy, int64_t d, double eps, const double* w,
                   double* dx, double* gw, double* gb, double* scratch) {
  norm_row_backward<double>(kind, x, dy, d, eps, w, dx, gw, gb, scratch);
}

// Keys of a key tile starting at k0 that query `query` may see.
inline int64_t visible_keys(bool causal, int64_t query, int64_t k0, int64_t cols) {
  if (!causal) return cols;
  return std::clamp<int64_t>(query - k0 + 1, 0, cols);
}

template <typename scalar_t>
class Attention {
  using A = acc_t<scalar_t>;

 public:
  explicit Attention(const AttentionParams& P)
      : P_(P), S_(P.seq), D_(P.head_dim), c_(softmax_log2_scale<A>(P.scale)), rotations_(P.rope) {}

  void forward() const {
    Panels<A> qh(P_), kh(P_);
    MathRows<A, scalar_t> vh(P_, P_.v);
    prologue(qh, kh, vh, nullptr, nullptr);
    forward_tiles(qh, kh, vh);
  }

  void backward() const {
    Panels<A> qh(P_), kh(P_);
    MathRows<A, scalar_t> vh(P_, P_.v), doh(P_, P_.grad_out);
    std::vector<A> delta(P_.batch * P_.heads * S_);
    prologue(qh, kh, vh, &doh, delta.data());
    // Accumulators of the grads of q^ and k^.
    Panels<A> dqh(P_), dkh(P_);
    dqh.storage.zero_();
    dkh.storage.zero_();
    backward_tiles(qh, kh, vh, doh, delta.data(), dqh, dkh);
    epilogue(dqh, dkh);
  }

 private:
  const scalar_t* in_row(const BshdTensor& t, int64_t b, int64_t s, int64_t h) const {
    return static_cast<const scalar_t*>(t.ptr) + t.offset(b, s, h);
  }
  scalar_t* out_row(const BshdTensorMut& t, int64_t b, int64_t s, int64_t h) const {
    return static_cast<scalar_t*>(t.ptr) + t.offset(b, s, h);
  }
  static const A* acc_ptr(const void* p) { return static_cast<const A*>(p); }

  // Stage 1. With doh/delta (backward): also dO in the math type and
  // delta = rowsum(dO * O) - dlse.
  void prologue(const Panels<A>& qh, const Panels<A>& kh, const MathRows<A, scalar_t>& vh,
                const MathRows<A, scalar_t>* doh, A* delta) const {
    const int64_t n_blocks = ceil_div(S_, kTokenBlock);
    at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
      TokenRope<A, scalar_t> rope(P_, rotations_);
      for (int64_t s = blk_begin * kTokenBlock; s < std::min(S_, blk_end * kTokenBlock); ++s) {
        const bool rotate = rope.load(s);
        for (int64_t b = 0; b < P_.batch; ++b) {
          for (int64_t h = 0; h < P_.heads; ++h) {
            const int64_t bh = b * P_.heads + h;
            prepare_row(qh.row(bh, s), in_row(P_.q, b, s, h), P_.q_norm, rotate ? &rope : nullptr);
            prepare_row(kh.row(bh, s), in_row(P_.k, b, s, h), P_.k_norm, rotate ? &rope : nullptr);
            if (A* vrow = vh.fill_row(bh, s)) load_row(vrow, in_row(P_.v, b, s, h), D_);
            if (doh == nullptr) continue;
            if (A* dorow = doh->fill_row(bh, s)) load_row(dorow, in_row(P_.grad_out, b, s, h), D_);
            const A* dorow = doh->row(bh, s);
            const A dot = dot_row(dorow, in_row(P_.out_saved, b, s, h), D_);
            const A dlse = P_.grad_lse ? acc_ptr(P_.grad_lse)[bh * S_ + s] : A(0);
            delta[bh * S_ + s] = dot - dlse;
          }
        }
      }
    });
  }

  void prepare_row(A* dst, const scalar_t* src, const NormParams& norm, const TokenRope<A, scalar_t>* rope) const {
    load_row(dst, src, D_);
    if (P_.norm != NormKind::kNone)
      norm_forward(P_.norm, dst, D_, P_.norm_eps, acc_ptr(norm.weight), acc_ptr(norm.bias));
    if (rope) rope->apply(dst, /*transpose=*/false);
  }

  // Stage 2, forward.
  void forward_tiles(const Panels<A>& qh, const Panels<A>& kh, const MathRows<A, scalar_t>& vh) const {
    const int64_t n_qt = ceil_div(S_, kBlockQ);
    A* lse = static_cast<A*>(P_.lse);
    at::parallel_for(0, P_.batch * P_.heads * n_qt, 1, [&](int64_t begin, int64_t end) {
      const SerialBlasScope serial_blas;
      std::vector<A> scores(kBlockQ * kBlockK), acc(kBlockQ * D_), row_max(kBlockQ), row_sum(kBlockQ);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / n_qt, q0 = (task % n_qt) * kBlockQ;
        const int64_t rows = std::min(kBlockQ, S_ - q0);
        const A* Q = qh.row(bh, q0);
        std::fill(acc.begin(), acc.end(), A(0));
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<A>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), A(0));
        const at::Tensor acc_m = matrix(acc.data(), rows, D_, D_);
        const int64_t k_end = P_.causal ? q0 + rows : S_;
        for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, k_end - k0);
          at::Tensor scores_m = matrix(scores.data(), rows, cols, kBlockK);
          at::mm_out(scores_m, matrix(Q, rows, D_, D_),
                     matrix(kh.row(bh, k0), cols, D_, D_).t());
          for (int64_t i = 0; i < rows; ++i) {
            A* s = scores.data() + i * kBlockK;
            const int64_t valid = visible_keys(P_.causal, q0 + i, k0, cols);
            const A new_max = softmax_max<A>(row_max[i], row_max_of(s, valid));
            const A alpha = softmax_rescale<A>(row_max[i], new_max, c_);
            const A sum = exp2_tile_row(s, valid, cols, c_, softmax_shift<A>(new_max, c_));
            row_sum[i] = row_sum[i] * alpha + sum;
            row_max[i] = new_max;
            if (alpha != A(1)) {
              A* o = acc.data() + i * D_;
              for (int64_t d = 0; d < D_; ++d) o[d] *= alpha;
            }
          }
          acc_m.addmm_(scores_m, matrix(vh.row(bh, k0), cols, D_, vh.ld()));
        }
        const int64_t b = bh / P_.heads, h = bh % P_.heads;
        for (int64_t i = 0; i < rows; ++i) {
          store_row(out_row(P_.out, b, q0 + i, h), acc.data() + i * D_, D_, A(1) / row_sum[i]);
          lse[bh * S_ + q0 + i] = softmax_lse<A>(row_max[i], row_sum[i], P_.scale);
        }
      }
    });
  }

  // Stage 2, backward. Two schedules with the same arithmetic in the same
  // order (so bitwise the same results):
  //  - fused, parallel over (batch, head): per key tile, per query tile, one
  //    tile pair feeds dV, dK and dQ (5 GEMMs per pair);
  //  - split, when there are fewer (batch, head) pairs than threads and more
  //    than one key tile: dK, dV in parallel over key tiles, then dQ in
  //    parallel over query tiles, recomputing P and dP (7 GEMMs per pair, but
  //    seq / tile-way parallel).
  void backward_tiles(const Panels<A>& qh, const Panels<A>& kh, const MathRows<A, scalar_t>& vh,
                      const MathRows<A, scalar_t>& doh, const A* delta, const Panels<A>& dqh,
                      const Panels<A>& dkh) const {
    const TileInputs in{qh, kh, vh, doh, delta};
    const int64_t bh_count = P_.batch * P_.heads, n_kt = ceil_div(S_, kBlockK), n_qt = ceil_div(S_, kBlockQ);
    if (bh_count >= at::get_num_threads() || n_kt == 1) {
      at::parallel_for(0, bh_count, 1, [&](int64_t begin, int64_t end) {
        const SerialBlasScope serial_blas;
        PairScratch scratch(D_);
        for (int64_t bh = begin; bh < end; ++bh)
          for (int64_t kt = 0; kt < n_kt; ++kt) key_tile_grads(in, bh, kt * kBlockK, scratch, &dqh, dkh);
      });
      return;
    }
    at::parallel_for(0, bh_count * n_kt, 1, [&](int64_t begin, int64_t end) {
      const SerialBlasScope serial_blas;
      PairScratch scratch(D_);
      for (int64_t task = begin; task < end; ++task)
        key_tile_grads(in, task / n_kt, (task % n_kt) * kBlockK, scratch, nullptr, dkh);
    });
    at::parallel_for(0, bh_count * n_qt, 1, [&](int64_t begin, int64_t end) {
      const SerialBlasScope serial_blas;
      PairScratch scratch(D_);
      for (int64_t task = begin; task < end; ++task) query_tile_grads(in, task / n_qt, (task % n_qt) * kBlockQ, scratch, dqh);
    });
  }

  struct TileInputs {
    const Panels<A>& qh;
    const Panels<A>& kh;
    const MathRows<A, scalar_t>& vh;
    const MathRows<A, scalar_t>& doh;
    const A* delta;
  };

  struct PairScratch {
    std::vector<A> probs, dprobs, dv;
    explicit PairScratch(int64_t d) : probs(kBlockQ * kBlockK), dprobs(kBlockQ * kBlockK), dv(kBlockK * d) {}
  };

  // For the tile pair (queries [q0, q0+rows), keys [k0, k0+cols)): P into
  // scratch.probs and dS * scale into scratch.dprobs.
  void pair_probs_and_dscores(const TileInputs& in, int64_t bh, int64_t q0, int64_t rows, int64_t k0, int64_t cols,
                              PairScratch& scratch) const {
    const A* lse = static_cast<const A*>(P_.lse);
    at::Tensor Pm = matrix(scratch.probs.data(), rows, cols, kBlockK);
    at::Tensor dPm = matrix(scratch.dprobs.data(), rows, cols, kBlockK);
    at::mm_out(Pm, matrix(in.qh.row(bh, q0), rows, D_, D_), matrix(in.kh.row(bh, k0), cols, D_, D_).t());
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t valid = visible_keys(P_.causal, q0 + i, k0, cols);
      exp2_tile_row(scratch.probs.data() + i * kBlockK, valid, cols, c_, softmax_lse_shift<A>(lse[bh * S_ + q0 + i]));
    }
    at::mm_out(dPm, matrix(in.doh.row(bh, q0), rows, D_, in.doh.ld()),
               matrix(in.vh.row(bh, k0), cols, D_, in.vh.ld()).t());
    const A scale = A(P_.scale);
    for (int64_t i = 0; i < rows; ++i) {
      const A di = in.delta[bh * S_ + q0 + i];
      const A* p = scratch.probs.data() + i * kBlockK;
      A* ds = scratch.dprobs.data() + i * kBlockK;
      for (int64_t j = 0; j < cols; ++j) ds[j] = p[j] * (ds[j] - di) * scale;
    }
  }

  // dK^, dV of the key tile at k0 (and, when dqh is given, its share of dQ^).
  void key_tile_grads(const TileInputs& in, int64_t bh, int64_t k0, PairScratch& scratch, const Panels<A>* dqh,
                      const Panels<A>& dkh) const {
    const int64_t cols = std::min(kBlockK, S_ - k0);
    const at::Tensor K = matrix(in.kh.row(bh, k0), cols, D_, D_);
    const at::Tensor dK = matrix(dkh.row(bh, k0), cols, D_, D_);
    const at::Tensor dV = matrix(scratch.dv.data(), cols, D_, D_);
    dV.zero_();
    // Causal: queries before k0 see none of these keys.
    const int64_t q_begin = P_.causal ? k0 / kBlockQ * kBlockQ : 0;
    for (int64_t q0 = q_begin; q0 < S_; q0 += kBlockQ) {
      const int64_t rows = std::min(kBlockQ, S_ - q0);
      pair_probs_and_dscores(in, bh, q0, rows, k0, cols, scratch);
      const at::Tensor Pm = matrix(scratch.probs.data(), rows, cols, kBlockK);
      const at::Tensor dSm = matrix(scratch.dprobs.data(), rows, cols, kBlockK);
      dV.addmm_(Pm.t(), matrix(in.doh.row(bh, q0), rows, D_, in.doh.ld()));
      if (dqh) matrix(dqh->row(bh, q0), rows, D_, D_).addmm_(dSm, K);
      dK.addmm_(dSm.t(), matrix(in.qh.row(bh, q0), rows, D_, D_));
    }
    const int64_t b = bh / P_.heads, h = bh % P_.heads;
    for (int64_t j = 0; j < cols; ++j)
      store_row(out_row(P_.grad_v, b, k0 + j, h), scratch.dv.data() + j * D_, D_, A(1));
  }

  // dQ^ of the query tile at q0, over the key tiles in ascending order (the
  // fused schedule's order).
  void query_tile_grads(const TileInputs& in, int64_t bh, int64_t q0, PairScratch& scratch,
                        const Panels<A>& dqh) const {
    const int64_t rows = std::min(kBlockQ, S_ - q0);
    const at::Tensor dQ = matrix(dqh.row(bh, q0), rows, D_, D_);
    const int64_t k_end = P_.causal ? q0 + rows : S_;
    for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, S_ - k0);  // the fused schedule's tile, masked alike
      pair_probs_and_dscores(in, bh, q0, rows, k0, cols, scratch);
      dQ.addmm_(matrix(scratch.dprobs.data(), rows, cols, kBlockK), matrix(in.kh.row(bh, k0), cols, D_, D_));
    }
  }

  // Stage 3: dq^, dk^ -> dq, dk through R^T and the norm backward.
  void epilogue(const Panels<A>& dqh, const Panels<A>& dkh) const {
    const int64_t n_blocks = ceil_div(S_, kTokenBlock);
    const bool norm = P_.norm != NormKind::kNone;
    // Per token block: partial grads of q weight, q bias, k weight, k bias.
    std::vector<A> partials(norm ? n_blocks * 4 * D_ : 0, A(0));
    at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
      TokenRope<A, scalar_t> rope(P_, rotations_);
      std::vector<A> dy(D_), x(D_), dx(D_), scratch(D_);
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        A* part = norm ? partials.data() + blk * 4 * D_ : nullptr;
        for (int64_t s = blk * kTokenBlock; s < std::min(S_, (blk + 1) * kTokenBlock); ++s) {
          const bool rotate = rope.load(s);
          for (int64_t b = 0; b < P_.batch; ++b) {
            for (int64_t h = 0; h < P_.heads; ++h) {
              const int64_t bh = b * P_.heads + h;
              for (int which = 0; which < 2; ++which) {
                const bool is_q = which == 0;
                const A* grad_hat = (is_q ? dqh : dkh).row(bh, s);
                std::copy(grad_hat, grad_hat + D_, dy.begin());
                if (rotate) rope.apply(dy.data(), /*transpose=*/true);
                scalar_t* dst = out_row(is_q ? P_.grad_q : P_.grad_k, b, s, h);
                if (!norm) {
                  store_row(dst, dy.data(), D_, A(1));
                  continue;
                }
                const NormParams& np = is_q ? P_.q_norm : P_.k_norm;
                A* pw = part + (is_q ? 0 : 2) * D_;
                load_row(x.data(), in_row(is_q ? P_.q : P_.k, b, s, h), D_);
                norm_backward(P_.norm, x.data(), dy.data(), D_, P_.norm_eps, acc_ptr(np.weight), dx.data(),
                                     np.weight ? pw : nullptr, np.bias ? pw + D_ : nullptr, scratch.data());
                store_row(dst, dx.data(), D_, A(1));
              }
            }
          }
        }
      }
    });
    if (!norm) return;
    const NormParams* params[2] = {&P_.q_norm, &P_.k_norm};
    for (int which = 0; which < 2; ++which) {
      const NormParams& np = *params[which];
      A* gw = static_cast<A*>(np.grad_weight);
      A* gb = static_cast<A*>(np.grad_bias);
      for (int64_t c = 0; c < D_; ++c) {
        A w = 0, bsum = 0;
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          w += partials[(blk * 4 + 2 * which) * D_ + c];
          bsum += partials[(blk * 4 + 2 * which + 1) * D_ + c];
        }
        if (np.weight && gw) gw[c] = w;
        if (np.bias && gb) gb[c] = bsum;
      }
    }
  }

  const AttentionParams& P_;
  const int64_t S_, D_;
  const A c_;  // scale * log2(e)
  const AxisRotations<A> rotations_;  // empty unless RoPE in angles mode
};

template <template <typename> class Fn>
void dispatch(DType dtype, const AttentionParams& P) {
  switch (dtype) {
    case DType::kHalf:
      return Fn<c10::Half>::run(P);
    case DType::kBFloat16:
      return Fn<c10::BFloat16>::run(P);
    case DType::kFloat:
      return Fn<float>::run(P);
    case DType::kDouble:
      return Fn<double>::run(P);
  }
  throw std::invalid_argument("cogkern::cpu::attention: unsupported dtype");
}

template <typename scalar_t>
struct Forward {
  static void run(const AttentionParams& P) { Attention<scalar_t>(P).forward(); }
};
template <typename scalar_t>
struct Backward {
  static void run(const AttentionParams& P) { Attention<scalar_t>(P).backward(); }
};

}  // namespace

void attention_forward(const AttentionParams& P) { dispatch<Forward>(P.dtype, P); }

void attention_backward(const AttentionParams& P) { dispatch<Backward>(P.dtype, P); }

}  // namespace cogkern::cpu
