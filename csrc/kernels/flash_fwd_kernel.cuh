// Flash-attention forward kernel (FlashAttention-2 structure) on tensor cores;
// launched by flash_fwd.cu.
//
// Grid: one block per (batch * head, query tile of BM rows). Each of the
// WARPS warps owns 16 query rows; their q^ rows stay in shared memory and are
// read as A fragments for every key tile. For each key tile of BN keys
// (double-buffered with cp.async: tile j+1 loads while tile j computes):
//     S = q^ k^T                       (fp32 accumulators, 16 x BN per warp)
//     masked scores (key >= seq, or key > query when causal) = -inf
//     m' = max(m, rowmax S),  P = exp2(S * c - m' * c),  c = scale * log2(e)
//     l  = l * exp2((m - m') c) + rowsum P,  O = O * exp2((m - m') c) + P V
// with P converted to the input dtype straight from the S registers (see the
// layout note in flash_common.cuh). At the end O / l is stored in the input
// dtype and lse = ln(l) + scale * m in fp32. The running max is over the raw
// scores, so scaling happens inside exp2 and fp16 inputs of any magnitude
// cannot overflow (all accumulation is fp32). A NaN score makes its row's max
// NaN (softmax_max propagates it) and so the row's output NaN.
#pragma once

#include "kernels/flash_common.cuh"
#include "kernels/flash_launch.h"

namespace cogkern::flash {

template <typename T, int D, int BM, int BN, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize) flash_fwd_kernel(const FlashArgs a) {
  static_assert(BM == 16 * WARPS, "each warp owns 16 query rows");
  static_assert(D % 16 == 0 && BN % 16 == 0, "whole MMA tiles");
  constexpr int kThreads = WARPS * kWarpSize;
  constexpr int kNT = BN / 8;  // n8 score tiles per key tile
  constexpr int kDT = D / 8;   // n8 output tiles
  using Tr = ElemTraits<T>;

  COGKERN_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* sK = sQ + BM * D;                      // [2][BN][D]
  T* sV = sK + 2 * BN * D;                  // [2][BN][D]

  const int64_t seq = a.seq;
  const int64_t n_mtiles = ceil_div(seq, BM);
  const int64_t bh = int64_t(blockIdx.x) / n_mtiles;
  int64_t mt = int64_t(blockIdx.x) % n_mtiles;
  if (a.causal) mt = n_mtiles - 1 - mt;  // the longest (last) query tiles start first
  const int64_t m0 = mt * BM;
  const int64_t b = bh / a.heads, h = bh % a.heads;

  const T* q_g = static_cast<const T*>(a.q_hat) + bh * seq * D;
  const T* k_g = static_cast<const T*>(a.k_hat) + bh * seq * D;
  const T* v_g = static_cast<const T*>(a.v.ptr) + b * a.v.stride_b + h * a.v.stride_h;
  const int64_t v_ss = a.v.stride_s;

  // Keys this tile can see: all, or up to its last query when causal.
  const int64_t kv_end = a.causal ? (m0 + BM < seq ? m0 + BM : seq) : seq;
  const int n_tiles = int(ceil_div(kv_end, BN));

  const auto load_kv = [&](int j, int stage) {
    const int64_t n0 = int64_t(j) * BN;
    load_tile_async<BN, D, kThreads>(sK + stage * BN * D, n0, seq, k_g,
                                     [&](int64_t r) { return k_g + r * D; });
    load_tile_async<BN, D, kThreads>(sV + stage * BN * D, n0, seq, v_g,
                                     [&](int64_t r) { return v_g + r * v_ss; });
  };

  // Group 0: the q^ tile and key tile 0.
  load_tile_async<BM, D, kThreads>(sQ, m0, seq, q_g, [&](int64_t r) { return q_g + r * D; });
  load_kv(0, 0);
  cp_async_commit();

  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  // This thread's two query rows (C fragment rows g and g + 8 of the warp's 16).
  const int64_t row_lo = m0 + warp * 16 + g, row_hi = row_lo + 8;
  const float c = a.scale_log2;

  float acc_o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's partial sums (its columns); quad-reduced at the end

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) load_kv(j + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // everything but the newest group: tile j (and q^) has landed
    __syncthreads();
    const int lane_v = opaque_lane(lane);  // for ldmatrix addressing

    const T* k_s = sK + stage * BN * D;
    const T* v_s = sV + stage * BN * D;
    const int64_t n0 = int64_t(j) * BN;

    // S = q^ k^T for the warp's 16 rows.
    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4];
      load_a<D>(qa, sQ, warp * 16, kk * 16, lane_v);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t kb[4];
        load_b_nk<D>(kb, k_s, nn * 16, kk * 16, lane_v);
        Tr::mma(s[2 * nn], qa, kb[0], kb[1]);
        Tr::mma(s[2 * nn + 1], qa, kb[2], kb[3]);
      }
    }

    // Mask keys past the sequence end and, when causal, keys after the query.
    const bool need_mask = n0 + BN > seq || (a.causal && n0 + BN - 1 > m0 + warp * 16);
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = n0 + i * 8 + 2 * t + (e & 1);
          const int64_t row = e < 2 ? row_lo : row_hi;
          if (key >= seq || (a.causal && key > row)) s[i][e] = -INFINITY;
        }
      }
    }

    // Online softmax update of the two rows.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        tile_max = softmax_max<float>(tile_max, s[i][2 * r]);
        tile_max = softmax_max<float>(tile_max, s[i][2 * r + 1]);
      }
      tile_max = quad_max(tile_max);
      const float new_max = softmax_max<float>(row_max[r], tile_max);
      const float alpha = softmax_rescale<float>(row_max[r], new_max, c);
      const float shift = softmax_shift<float>(new_max, c);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        s[i][2 * r] = fast_exp2(fmaf(s[i][2 * r], c, -shift));
        s[i][2 * r + 1] = fast_exp2(fmaf(s[i][2 * r + 1], c, -shift));
        sum += s[i][2 * r] + s[i][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
      row_max[r] = new_max;
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        acc_o[i][2 * r] *= alpha;
        acc_o[i][2 * r + 1] *= alpha;
      }
    }

    // O += P V; P's A fragments come from the S registers (k-slice kk = n8 tiles 2kk, 2kk+1).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pa[4] = {Tr::pack(s[2 * kk][0], s[2 * kk][1]), Tr::pack(s[2 * kk][2], s[2 * kk][3]),
                              Tr::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Tr::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t vb[4];
        load_b_kn<D>(vb, v_s, kk * 16, dd * 16, lane_v);
        Tr::mma(acc_o[2 * dd], pa, vb[0], vb[1]);
        Tr::mma(acc_o[2 * dd + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  }

  // Finish: O / l and lse, rows inside the sequence only.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r == 0 ? row_lo : row_hi;
    const float l = quad_sum(row_sum[r]);
    if (row >= seq) continue;
    const float inv = 1.f / l;
    T* dst = static_cast<T*>(a.out.ptr) + a.out.offset(b, row, h);
#pragma unroll
    for (int i = 0; i < kDT; ++i) store_pair(dst + i * 8 + 2 * t, acc_o[i][2 * r] * inv, acc_o[i][2 * r + 1] * inv);
    if (t == 0) a.lse[bh * seq + row] = softmax_lse<float>(row_max[r], l, double(a.scale));
  }
}

// Tile shapes per head dim: 4 warps x 16 query rows; 128-key tiles at D = 64,
// 64-key tiles at D = 128 (S and O register tiles stay under ~100 floats).
template <int D>
struct FwdConfig;
template <>
struct FwdConfig<64> {
  static constexpr int kWarps = 4, kBM = 64, kBN = 128;
};
template <>
struct FwdConfig<128> {
  static constexpr int kWarps = 4, kBM = 64, kBN = 64;
};

// Dynamic shared memory of flash_fwd_kernel: q^ tile + two stages of k^ and v tiles.
template <typename T, int D>
constexpr size_t fwd_smem_bytes() {
  return size_t(FwdConfig<D>::kBM + 4 * FwdConfig<D>::kBN) * D * sizeof(T);
}

}  // namespace cogkern::flash
