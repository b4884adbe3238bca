// Row kernels of the CUDA fused attention (launched by attention_launch.cu):
// the prologue (QK-norm + RoPE into q^, k^; delta), the epilogue (RoPE^T + norm
// backward; norm parameter grad partials) and the partials' reduction.
//
// A block owns kTokens consecutive tokens and all their (batch,
// head) rows; each warp takes one row at a time, lane l holding channels
// l, l + 32, ... (coalesced loads; warp-shuffle reductions for the norm). The
// RoPE coefficients of the block's tokens are computed once into shared
// memory and reused over batch * heads rows; a rotation goes through a
// per-warp row buffer in shared memory because a channel pair may span lanes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/attention_launch.h"

namespace cogkern::rows {

constexpr int kRowWarps = 8;
constexpr int kRowThreads = kRowWarps * 32;
constexpr int kTokens = 16;  // tokens per row-kernel block (and per norm-grad partial sum)

__device__ __forceinline__ float warp_sum(float x) {
  // Butterfly: every lane ends with the bitwise-same sum.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Shared-memory state of a row-kernel block.
template <int D>
struct RowShared {
  PairCoeffs<float> coeffs[kTokens][D / 2];  // RoPE mix of (token, pair), forward direction
  int pair_c0[D / 2], pair_c1[D / 2];        // channels of each pair
  float row_buf[kRowWarps][D];               // per-warp row staging for the rotation
  float norm_w[4][D];                        // q weight, q bias, k weight, k bias (valid when present)
};

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

// Rotates the warp's row x (lane-strided channels) by token t's coefficients,
// transposed for the backward. Both the lane layout and the pair layout meet
// in the warp's row buffer.
template <int D>
__device__ __forceinline__ void rotate_row(float (&x)[D / 32], RowShared<D>& sh, int t, bool transpose, int warp,
                                           int lane) {
  float* buf = sh.row_buf[warp];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) buf[lane + 32 * i] = x[i];
  __syncwarp();
  for (int p = lane; p < D / 2; p += 32) {
    const int c0 = sh.pair_c0[p], c1 = sh.pair_c1[p];
    const PairCoeffs<float> k = transpose ? transpose_coeffs<float>(sh.coeffs[t][p]) : sh.coeffs[t][p];
    float y0, y1;
    rope_mix<float>(buf[c0], buf[c1], k, &y0, &y1);
    buf[c0] = y0;
    buf[c1] = y1;
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < D / 32; ++i) x[i] = buf[lane + 32 * i];
  __syncwarp();  // the buffer is reused by the warp's next row
}

// Row statistics of the norm (identical in forward and backward: same order of sums).
template <int D>
__device__ __forceinline__ RowNormStats<float> row_stats(NormKind kind, const float (&x)[D / 32], double eps) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) sum += x[i];
  const float center = norm_center<float>(kind, warp_sum(sum), D);
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const float d = x[i] - center;
    sq += d * d;
  }
  return {center, norm_rstd<float>(warp_sum(sq), D, eps)};
}

template <typename T, int D>
__device__ __forceinline__ void load_row(float (&x)[D / 32], const T* src, int lane) {
#pragma unroll
  for (int i = 0; i < D / 32; ++i) x[i] = to_acc<float>(src[lane + 32 * i]);
}

// which: 0 = q, 1 = k. Computes R(norm(x)) of the row (b, s, h) into x.
template <typename T, int D>
__device__ __forceinline__ void prepare_row(float (&x)[D / 32], const AttentionParams& P, RowShared<D>& sh,
                                            int which, int64_t b, int64_t s, int64_t h, int t, int warp, int lane) {
  const BshdTensor& src = which == 0 ? P.q : P.k;
  load_row<T, D>(x, static_cast<const T*>(src.ptr) + src.offset(b, s, h), lane);
  if (P.norm != NormKind::kNone) {
    const NormParams& np = which == 0 ? P.q_norm : P.k_norm;
    const float* w = np.weight ? sh.norm_w[2 * which] : nullptr;
    const float* bias = np.bias ? sh.norm_w[2 * which + 1] : nullptr;
    const RowNormStats<float> st = row_stats<D>(P.norm, x, P.norm_eps);
#pragma unroll
    for (int i = 0; i < D / 32; ++i) x[i] = norm_affine<float>((x[i] - st.center) * st.rstd, w, bias, lane + 32 * i);
  }
  if (P.has_rope && s >= P.text_len) rotate_row<D>(x, sh, t, /*transpose=*/false, warp, lane);
}

// Prologue: q^, k^ into [B, H, S, D] scratch; with BACKWARD also delta.
template <typename T, typename table_t, int D, bool BACKWARD>
__global__ void __launch_bounds__(kRowThreads) attention_prologue_kernel(const AttentionParams P,
                                                                         const AttentionScratch scratch) {
  __shared__ RowShared<D> sh;
  const int64_t tok0 = int64_t(blockIdx.x) * kTokens;
  const int ntok = int(P.seq - tok0 < kTokens ? P.seq - tok0 : kTokens);
  load_row_tables<table_t, D>(sh, P, tok0, ntok);

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t rows = int64_t(ntok) * P.batch * P.heads;
  for (int64_t row = warp; row < rows; row += kRowWarps) {
    const int64_t h = row % P.heads;
    const int64_t b = (row / P.heads) % P.batch;
    const int t = int(row / (P.heads * P.batch));
    const int64_t s = tok0 + t;
    const int64_t bh = b * P.heads + h;
    for (int which = 0; which < 2; ++which) {
      float x[D / 32];
      prepare_row<T, D>(x, P, sh, which, b, s, h, t, warp, lane);
      T* dst = static_cast<T*>(which == 0 ? scratch.q_hat : scratch.k_hat) + (bh * P.seq + s) * D;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) dst[lane + 32 * i] = from_acc<T>(x[i]);
    }
    if constexpr (BACKWARD) {
      float dout[D / 32], o[D / 32];
      load_row<T, D>(dout, static_cast<const T*>(P.grad_out.ptr) + P.grad_out.offset(b, s, h), lane);
      load_row<T, D>(o, static_cast<const T*>(P.out_saved.ptr) + P.out_saved.offset(b, s, h), lane);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) dot += dout[i] * o[i];
      dot = warp_sum(dot);
      if (lane == 0) {
        const float dlse = P.grad_lse ? static_cast<const float*>(P.grad_lse)[bh * P.seq + s] : 0.f;
        scratch.delta[bh * P.seq + s] = dot - dlse;
      }
    }
  }
}

// Epilogue: dq = norm^T(R^T(dq^)), dk likewise; per-block partial sums of the
// norm parameter grads into scratch.norm_partials[(j * D + c) * n_blocks + block],
// j = 0..3 (q weight, q bias, k weight, k bias).
template <typename T, typename table_t, int D>
__global__ void __launch_bounds__(kRowThreads) attention_epilogue_kernel(const AttentionParams P,
                                                                         const AttentionScratch scratch) {
  __shared__ RowShared<D> sh;
  __shared__ float part_sh[kRowWarps][4][D];
  const int64_t tok0 = int64_t(blockIdx.x) * kTokens;
  const int ntok = int(P.seq - tok0 < kTokens ? P.seq - tok0 : kTokens);
  load_row_tables<table_t, D>(sh, P, tok0, ntok);

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const bool norm = P.norm != NormKind::kNone;
  float part[4][D / 32];  // this lane's partial grads of q w, q b, k w, k b
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int i = 0; i < D / 32; ++i) part[j][i] = 0.f;
  }

  const int64_t rows = int64_t(ntok) * P.batch * P.heads;
  for (int64_t row = warp; row < rows; row += kRowWarps) {
    const int64_t h = row % P.heads;
    const int64_t b = (row / P.heads) % P.batch;
    const int t = int(row / (P.heads * P.batch));
    const int64_t s = tok0 + t;
    const int64_t bh = b * P.heads + h;
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      const float* grad_hat = (which == 0 ? scratch.dq_hat : scratch.dk_hat) + (bh * P.seq + s) * D;
      float dy[D / 32];
#pragma unroll
      for (int i = 0; i < D / 32; ++i) dy[i] = grad_hat[lane + 32 * i];
      if (P.has_rope && s >= P.text_len) rotate_row<D>(dy, sh, t, /*transpose=*/true, warp, lane);
      const BshdTensorMut& dst_t = which == 0 ? P.grad_q : P.grad_k;
      T* dst = static_cast<T*>(dst_t.ptr) + dst_t.offset(b, s, h);
      if (!norm) {
#pragma unroll
        for (int i = 0; i < D / 32; ++i) dst[lane + 32 * i] = from_acc<T>(dy[i]);
        continue;
      }
      const BshdTensor& src = which == 0 ? P.q : P.k;
      float x[D / 32];
      load_row<T, D>(x, static_cast<const T*>(src.ptr) + src.offset(b, s, h), lane);
      const RowNormStats<float> st = row_stats<D>(P.norm, x, P.norm_eps);
      const NormParams& np = which == 0 ? P.q_norm : P.k_norm;
      const float* w = sh.norm_w[2 * which];
      float xhat[D / 32], gvals[D / 32];
      float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) {
        xhat[i] = (x[i] - st.center) * st.rstd;
        gvals[i] = np.weight ? dy[i] * w[lane + 32 * i] : dy[i];
        sum_g += gvals[i];
        sum_gx += gvals[i] * xhat[i];
        part[2 * which][i] += dy[i] * xhat[i];
        part[2 * which + 1][i] += dy[i];
      }
      const float mean_g = warp_sum(sum_g) / float(D), mean_gx = warp_sum(sum_gx) / float(D);
#pragma unroll
      for (int i = 0; i < D / 32; ++i)
        dst[lane + 32 * i] = from_acc<T>(norm_input_grad<float>(P.norm, gvals[i], xhat[i], st.rstd, mean_g, mean_gx));
    }
  }
  if (!norm) return;

  // Block partials: warps summed in a fixed order.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int i = 0; i < D / 32; ++i) part_sh[warp][j][lane + 32 * i] = part[j][i];
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
