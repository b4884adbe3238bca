// Row kernels of the CUDA fused attention (launched by attention_launch.cu):
// the prologue (QK-norm + RoPE into q^, k^; delta), the epilogue (RoPE^T + norm
// backward; norm parameter grad partials) and the partials' reduction.
//
// A block owns kTokens consecutive tokens and all their (batch, head) rows. A
// row of D channels is held by RowLanes<D>::kLanes = D / 8 lanes, 8
// consecutive channels each, so that a 16-bit row moves with one 16-byte load
// or store per lane; a warp works on kRows = 32 / kLanes rows at a time (its
// lane segments), so several rows' loads are in flight per warp. The launcher
// guarantees 16-byte aligned rows (attention_launch.cu). Norm sums are
// butterflies inside a segment. The RoPE coefficients of the block's tokens
// are computed once into shared memory and reused over batch * heads rows; a
// rotation goes through a per-segment row buffer in shared memory because a
// channel pair may span lanes. The per-element math is attention_math.h's and
// rope3d_math.h's, as on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/attention_launch.h"
#include "common/multi_tensor.h"  // mt_load, MtVec: the 16-byte vector accesses

namespace cogkern::rows {

constexpr int kRowWarps = 8;
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kTokens = 16;  // tokens per row-kernel block (and per norm-grad partial sum)
constexpr int kRowVec = 8;   // channels per lane: 16 bytes of a 16-bit row

template <int D>
struct RowLanes {
  static_assert(D % kRowVec == 0 && 32 % (D / kRowVec) == 0, "a row is a power-of-two share of a warp");
  static constexpr int kLanes = D / kRowVec;  // lanes per row (a segment)
  static constexpr int kRows = 32 / kLanes;   // rows per warp at a time
};

// Sum over the lanes of a segment (LANES consecutive lanes), butterfly: every
// lane of the segment ends with the bitwise-same sum.
template <int LANES>
__device__ __forceinline__ float segment_sum(float x) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Shared-memory state of a row-kernel block.
template <int D>
struct RowShared {
  PairCoeffs<float> coeffs[kTokens][D / 2];             // RoPE mix of (token, pair), forward direction
  int pair_c0[D / 2], pair_c1[D / 2];                   // channels of each pair
  float row_buf[kRowWarps][RowLanes<D>::kRows][D];      // per-segment row staging for the rotation
  float norm_w[4][D];                                   // q weight, q bias, k weight, k bias (valid when present)
};

// Where a lane works: its warp, its segment (row slot) and its channels sub * 8 .. sub * 8 + 7.
struct RowLane {
  int warp, seg, sub;
};
template <int D>
__device__ __forceinline__ RowLane row_lane() {
  const int lane = int(threadIdx.x) % 32;
  return {int(threadIdx.x) / 32, lane / RowLanes<D>::kLanes, lane % RowLanes<D>::kLanes};
}

// Row `row` of the block's ntok * batch * heads rows (heads fastest, then batch,
// then token). 32-bit divisions: inline, where 64-bit ones are calls, across
// which the epilogue's partial sums would spill. The launcher checks that a
// block's rows fit (rows_per_block_fit).
struct RowIndex {
  int64_t b, s, h, bh;
  int t;  // token within the block
};
__device__ __forceinline__ RowIndex row_index(const AttentionParams& P, int64_t tok0, uint32_t row) {
  const uint32_t heads = uint32_t(P.heads), batch = uint32_t(P.batch);
  const uint32_t bh = row % (heads * batch);
  RowIndex r;
  r.h = bh % heads;
  r.b = bh / heads;
  r.t = int(row / (heads * batch));
  r.s = tok0 + r.t;
  r.bh = bh;
  return r;
}

// The rows a warp takes, kRows at a time: calls f(row, active) for its
// segment's row. A segment past the last row (active false) runs the group's
// first row again, so that the whole warp takes part in every shuffle and
// __syncwarp, and must store nothing.
template <int D, typename F>
__device__ __forceinline__ void for_warp_rows(int64_t rows, const RowLane& l, F f) {
  constexpr int kRows = RowLanes<D>::kRows;
  for (int64_t row0 = int64_t(l.warp) * kRows; row0 < rows; row0 += kRowWarps * kRows) {
    const int64_t row = row0 + l.seg;
    f(uint32_t(row < rows ? row : row0), row < rows);
  }
}

// Fills the coefficient and pair tables of tokens [tok0, tok0 + ntok) and the
// norm parameters; ends with __syncthreads.
template <typename table_t, int D>
__device__ void load_row_tables(RowShared<D>& sh, const AttentionParams& P, int64_t tok0, int ntok) {
  constexpr int kHalf = D / 2;
  if (P.has_rope) {
    const bool interleaved = P.rope.mode == RopeMode::kTable || P.rope.interleaved;
    for (int p = int(threadIdx.x); p < kHalf; p += kRowThreads) {
      const RopePair pr = rope_pair(p, P.rope.axes, interleaved);
      sh.pair_c0[p] = pr.c0;
      sh.pair_c1[p] = pr.c1;
    }
    for (int i = int(threadIdx.x); i < ntok * kHalf; i += kRowThreads) {
      const int t = i / kHalf, p = i % kHalf;
      sh.coeffs[t][p] = rope_coeffs<float, table_t>(P.rope, tok0 + t, p);
    }
  }
  for (int i = int(threadIdx.x); i < 4 * D; i += kRowThreads) {
    const int j = i / D;
    const NormParams& np = j < 2 ? P.q_norm : P.k_norm;
    const float* src = static_cast<const float*>(j % 2 == 0 ? np.weight : np.bias);
    sh.norm_w[j][i % D] = src ? src[i % D] : 0.f;
  }
  __syncthreads();
}

// Rotates the segment's row x (8 channels per lane) by token t's coefficients,
// transposed for the backward, when `rotate` (per segment: the rows of a warp
// may be text and video tokens); the whole warp must call it. Both the lane
// layout and the pair layout meet in the segment's row buffer.
template <int D>
__device__ __forceinline__ void rotate_row(float (&x)[kRowVec], RowShared<D>& sh, int t, bool rotate, bool transpose,
                                           const RowLane& l) {
  float* buf = sh.row_buf[l.warp][l.seg];
#pragma unroll
  for (int k = 0; k < kRowVec; ++k) buf[l.sub * kRowVec + k] = x[k];
  __syncwarp();
  if (rotate) {
    for (int p = l.sub; p < D / 2; p += RowLanes<D>::kLanes) {
      const int c0 = sh.pair_c0[p], c1 = sh.pair_c1[p];
      const PairCoeffs<float> k = transpose ? transpose_coeffs<float>(sh.coeffs[t][p]) : sh.coeffs[t][p];
      float y0, y1;
      rope_mix<float>(buf[c0], buf[c1], k, &y0, &y1);
      buf[c0] = y0;
      buf[c1] = y1;
    }
  }
  __syncwarp();
#pragma unroll
  for (int k = 0; k < kRowVec; ++k) x[k] = buf[l.sub * kRowVec + k];
  __syncwarp();  // the buffer is reused by the warp's next rows
}

// Row statistics of the norm (identical in forward and backward: same order of sums).
template <int D>
__device__ __forceinline__ RowNormStats<float> row_stats(NormKind kind, const float (&x)[kRowVec], double eps) {
  constexpr int kLanes = RowLanes<D>::kLanes;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kRowVec; ++k) sum += x[k];
  const float center = norm_center<float>(kind, segment_sum<kLanes>(sum), D);
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kRowVec; ++k) {
    const float d = x[k] - center;
    sq += d * d;
  }
  return {center, norm_rstd<float>(segment_sum<kLanes>(sq), D, eps)};
}

// The lane's 8 channels of a row starting at `row` (16-byte aligned): one vector load.
template <typename T>
__device__ __forceinline__ void load_row(float (&x)[kRowVec], const T* row, int sub) {
  T raw[kRowVec];
  mt_load<T, kRowVec>(row + sub * kRowVec, kRowVec, /*vector_ok=*/true, raw, T());
#pragma unroll
  for (int k = 0; k < kRowVec; ++k) x[k] = to_acc<float>(raw[k]);
}
// One 16-byte store of the lane's 8 channels. On the GPU in PTX: NVVM splits a
// plain 16-byte store here (of the 16-bit array, a memcpy-ed or a built uint4)
// into four 32-bit ones, and __stwb's st.global.wb becomes a STRONG.SM store.
template <typename T>
__device__ __forceinline__ void store_row(T* row, int sub, const float (&x)[kRowVec]) {
  static_assert(sizeof(T) == 2, "16-bit rows: 8 channels are 16 bytes");
  uint32_t w[kRowVec / 2];
#pragma unroll
  for (int j = 0; j < kRowVec / 2; ++j) {
    const T lo = from_acc<T>(x[2 * j]), hi = from_acc<T>(x[2 * j + 1]);
    uint16_t lo_bits, hi_bits;
    memcpy(&lo_bits, &lo, sizeof(lo_bits));
    memcpy(&hi_bits, &hi, sizeof(hi_bits));
    w[j] = uint32_t(lo_bits) | (uint32_t(hi_bits) << 16);
  }
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(row + sub * kRowVec), "r"(w[0]), "r"(w[1]),
               "r"(w[2]), "r"(w[3])
               : "memory");
#else
  memcpy(row + sub * kRowVec, w, sizeof(w));
#endif
}

// which: 0 = q, 1 = k. Computes R(norm(x)) of row r into x.
template <typename T, int D>
__device__ __forceinline__ void prepare_row(float (&x)[kRowVec], const AttentionParams& P, RowShared<D>& sh,
                                            int which, const RowIndex& r, const RowLane& l) {
  const BshdTensor& src = which == 0 ? P.q : P.k;
  load_row<T>(x, static_cast<const T*>(src.ptr) + src.offset(r.b, r.s, r.h), l.sub);
  if (P.norm != NormKind::kNone) {
    const NormParams& np = which == 0 ? P.q_norm : P.k_norm;
    const float* w = np.weight ? sh.norm_w[2 * which] : nullptr;
    const float* bias = np.bias ? sh.norm_w[2 * which + 1] : nullptr;
    const RowNormStats<float> st = row_stats<D>(P.norm, x, P.norm_eps);
#pragma unroll
    for (int k = 0; k < kRowVec; ++k)
      x[k] = norm_affine<float>((x[k] - st.center) * st.rstd, w, bias, l.sub * kRowVec + k);
  }
  if (P.has_rope) rotate_row<D>(x, sh, r.t, r.s >= P.text_len, /*transpose=*/false, l);
}

// Prologue: q^, k^ into [B, H, S, D] scratch; with BACKWARD also delta.
template <typename T, typename table_t, int D, bool BACKWARD>
__global__ void __launch_bounds__(kRowThreads) attention_prologue_kernel(const AttentionParams P,
                                                                         const AttentionScratch scratch) {
  __shared__ RowShared<D> sh;
  const int64_t tok0 = int64_t(blockIdx.x) * kTokens;
  const int ntok = int(P.seq - tok0 < kTokens ? P.seq - tok0 : kTokens);
  load_row_tables<table_t, D>(sh, P, tok0, ntok);

  const RowLane l = row_lane<D>();
  for_warp_rows<D>(int64_t(ntok) * P.batch * P.heads, l, [&](uint32_t row, bool active) {
    const RowIndex r = row_index(P, tok0, row);
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      float x[kRowVec];
      prepare_row<T, D>(x, P, sh, which, r, l);
      T* dst = static_cast<T*>(which == 0 ? scratch.q_hat : scratch.k_hat) + (r.bh * P.seq + r.s) * D;
      if (active) store_row<T>(dst, l.sub, x);
    }
    if constexpr (BACKWARD) {
      float dout[kRowVec], o[kRowVec];
      load_row<T>(dout, static_cast<const T*>(P.grad_out.ptr) + P.grad_out.offset(r.b, r.s, r.h), l.sub);
      load_row<T>(o, static_cast<const T*>(P.out_saved.ptr) + P.out_saved.offset(r.b, r.s, r.h), l.sub);
      float dot = 0.f;
#pragma unroll
      for (int k = 0; k < kRowVec; ++k) dot += dout[k] * o[k];
      dot = segment_sum<RowLanes<D>::kLanes>(dot);
      if (active && l.sub == 0) {
        const float dlse = P.grad_lse ? static_cast<const float*>(P.grad_lse)[r.bh * P.seq + r.s] : 0.f;
        scratch.delta[r.bh * P.seq + r.s] = dot - dlse;
      }
    }
  });
}

// Epilogue: dq = norm^T(R^T(dq^)), dk likewise; per-block partial sums of the
// norm parameter grads into scratch.norm_partials[(j * D + c) * n_blocks + block],
// j = 0..3 (q weight, q bias, k weight, k bias).
template <typename T, typename table_t, int D>
__global__ void __launch_bounds__(kRowThreads) attention_epilogue_kernel(const AttentionParams P,
                                                                         const AttentionScratch scratch) {
  constexpr int kLanes = RowLanes<D>::kLanes;
  __shared__ RowShared<D> sh;
  __shared__ float part_sh[kRowWarps][4][D];
  const int64_t tok0 = int64_t(blockIdx.x) * kTokens;
  const int ntok = int(P.seq - tok0 < kTokens ? P.seq - tok0 : kTokens);
  load_row_tables<table_t, D>(sh, P, tok0, ntok);

  const RowLane l = row_lane<D>();
  const bool norm = P.norm != NormKind::kNone;
  float part[4][kRowVec];  // this lane's partial grads of q w, q b, k w, k b (its segment's rows)
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int k = 0; k < kRowVec; ++k) part[j][k] = 0.f;
  }

  for_warp_rows<D>(int64_t(ntok) * P.batch * P.heads, l, [&](uint32_t row, bool active) {
    const RowIndex r = row_index(P, tok0, row);
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      // The norm's row statistics first: their sqrt and division have slow-path calls,
      // across which fewer live values (no dy yet) keep the partial sums in registers.
      float x[kRowVec];
      RowNormStats<float> st{};
      if (norm) {
        const BshdTensor& src = which == 0 ? P.q : P.k;
        load_row<T>(x, static_cast<const T*>(src.ptr) + src.offset(r.b, r.s, r.h), l.sub);
        st = row_stats<D>(P.norm, x, P.norm_eps);
      }
      const float* grad_hat = (which == 0 ? scratch.dq_hat : scratch.dk_hat) + (r.bh * P.seq + r.s) * D;
      float dy[kRowVec];
      load_row<float>(dy, grad_hat, l.sub);
      if (P.has_rope) rotate_row<D>(dy, sh, r.t, r.s >= P.text_len, /*transpose=*/true, l);
      const BshdTensorMut& dst_t = which == 0 ? P.grad_q : P.grad_k;
      T* dst = static_cast<T*>(dst_t.ptr) + dst_t.offset(r.b, r.s, r.h);
      if (!norm) {
        if (active) store_row<T>(dst, l.sub, dy);
        continue;
      }
      const NormParams& np = which == 0 ? P.q_norm : P.k_norm;
      const float* w = sh.norm_w[2 * which];
      float xhat[kRowVec], gvals[kRowVec];
      float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
      for (int k = 0; k < kRowVec; ++k) {
        xhat[k] = (x[k] - st.center) * st.rstd;
        gvals[k] = np.weight ? dy[k] * w[l.sub * kRowVec + k] : dy[k];
        sum_g += gvals[k];
        sum_gx += gvals[k] * xhat[k];
      }
      if (active) {
#pragma unroll
        for (int k = 0; k < kRowVec; ++k) {
          part[2 * which][k] += dy[k] * xhat[k];
          part[2 * which + 1][k] += dy[k];
        }
      }
      const float mean_g = segment_sum<kLanes>(sum_g) / float(D), mean_gx = segment_sum<kLanes>(sum_gx) / float(D);
      float dx[kRowVec];
#pragma unroll
      for (int k = 0; k < kRowVec; ++k)
        dx[k] = norm_input_grad<float>(P.norm, gvals[k], xhat[k], st.rstd, mean_g, mean_gx);
      if (active) store_row<T>(dst, l.sub, dx);
    }
  });
  if (!norm) return;

  // Block partials in a fixed order: the warp's segments (a butterfly over the
  // lanes holding the same channels), then the warps in order.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int k = 0; k < kRowVec; ++k) {
#pragma unroll
      for (int o = kLanes; o < 32; o <<= 1) part[j][k] += __shfl_xor_sync(0xffffffffu, part[j][k], o);
    }
  }
  if (l.seg == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int k = 0; k < kRowVec; ++k) part_sh[l.warp][j][l.sub * kRowVec + k] = part[j][k];
    }
  }
  __syncthreads();
  for (int i = int(threadIdx.x); i < 4 * D; i += kRowThreads) {
    const int j = i / D, c = i % D;
    float sum = 0.f;
    for (int w = 0; w < kRowWarps; ++w) sum += part_sh[w][j][c];
    scratch.norm_partials[int64_t(i) * gridDim.x + blockIdx.x] = sum;
  }
}

// Second pass: block (j, c) sums the n_blocks partials of parameter j's
// channel c in a fixed order (strided per thread, then a fixed tree).
template <int D>
__global__ void __launch_bounds__(256) norm_grad_reduce_kernel(const AttentionParams P, const float* partials,
                                                               int64_t n_blocks) {
  __shared__ float red[256];
  const int j = int(blockIdx.x) / D, c = int(blockIdx.x) % D;
  const float* src = partials + int64_t(blockIdx.x) * n_blocks;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < n_blocks; i += 256) sum += src[i];
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int o = 128; o > 0; o >>= 1) {
    if (int(threadIdx.x) < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const NormParams& np = j < 2 ? P.q_norm : P.k_norm;
  const bool is_weight = (j % 2) == 0;
  const void* param = is_weight ? np.weight : np.bias;
  void* grad = is_weight ? np.grad_weight : np.grad_bias;
  if (param && grad) static_cast<float*>(grad)[c] = red[0];
}

}  // namespace cogkern::rows
