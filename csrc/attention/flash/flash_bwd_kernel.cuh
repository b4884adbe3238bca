// Flash-attention backward kernels (FlashAttention-2 structure) on tensor cores;
// launched by flash_bwd_launch.cu.
//
// With P = exp(scale * q^ k^T - lse), dS = P * (dO v^T - delta) * scale
// (delta_i = dO_i . O_i - dlse_i, from the prologue):
//     dv = P^T dO,   dk^ = dS^T q^,   dq^ = dS k^.
//
// Kernel 1, flash_bwd_kv_kernel: one block per (batch * head, key tile of BN =
// 16 * WARPS keys); warp w owns keys 16w .. 16w+15 of the tile and keeps their
// dv and dk^ rows in fp32 registers while the block walks the query tiles (BM
// rows, q^ / dO / lse / delta double-buffered). The warp computes its part of
// the problem transposed, keys as rows:
//     S^T = k^_w q^T,  P^T = exp2(S^T c - lse c'),  dP^T = v_w dO^T,
//     dv_w += P^T dO,  dS^T = P^T (dP^T - delta) scale,  dk^_w += dS^T q^,
// so P^T and dS^T are C fragments whose packed form is the A fragment of the
// next product (flash_common.cuh): no shared-memory round trip and no
// cross-warp reduction for dv, dk^. dq^ needs a sum over all keys:
//   * default (ATOMIC_DQ): dS^T goes to shared memory, the block computes
//     dS k^ for its keys (BM x D) and adds it into the fp32 dq^ buffer with
//     atomicAdd (order-dependent rounding: not bitwise deterministic);
//   * deterministic: kernel 2, flash_bwd_dq_kernel, parallel over query
//     tiles like the forward, recomputes P and dS and accumulates dq^ in
//     registers, each element written by exactly one thread.
// Masked entries (key >= seq; key > query when causal) get P = dS = 0; query
// rows past the sequence end load as zeros with lse = +inf (P = 0), so they
// contribute nothing, and nothing is stored for them.
#pragma once

#include "attention/flash/flash_common.cuh"
#include "attention/flash/flash_params.h"

namespace cogkern::flash {

// The lse shifts and deltas of query rows m0 .. m0 + BM (rows past the end:
// +inf and 0, so that P = 0 there), loaded by `threads` threads of which this
// is number `thread`. Plain stores: the caller makes them visible (a
// __syncthreads, or an mbarrier arrival).
template <int BM>
__device__ __forceinline__ void load_row_stats(float* s_lse_shift, float* s_delta, const FlashArgs& a, int64_t bh,
                                               int64_t m0, int thread, int threads) {
  for (int i = thread; i < BM; i += threads) {
    const int64_t row = m0 + i;
    const bool in = row < a.seq;
    s_lse_shift[i] = in ? softmax_lse_shift<float>(a.lse[bh * a.seq + row]) : INFINITY;
    s_delta[i] = in ? a.delta[bh * a.seq + row] : 0.f;
  }
}

template <typename T, int D, int BM, int BN, int WARPS, bool ATOMIC_DQ>
__global__ void __launch_bounds__(WARPS * kWarpSize) flash_bwd_kv_kernel(const FlashArgs a) {
  static_assert(BN == 16 * WARPS, "each warp owns 16 keys");
  static_assert(BM % 16 == 0 && D % 16 == 0, "whole MMA tiles");
  constexpr int kThreads = WARPS * kWarpSize;
  constexpr int kMT = BM / 8;  // n8 tiles of a 16 x BM product
  constexpr int kDT = D / 8;   // n8 tiles of a 16 x D product
  using Tr = ElemTraits<T>;

  COGKERN_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][D]
  T* sV = sK + BN * D;                      // [BN][D]
  T* sQ = sV + BN * D;                      // [2][BM][D]
  T* sdO = sQ + 2 * BM * D;                 // [2][BM][D]
  T* sdS = sdO + 2 * BM * D;                // [BN][BM] (ATOMIC_DQ only)
  float* sLseShift = reinterpret_cast<float*>(sdS + (ATOMIC_DQ ? BN * BM : 0));  // [2][BM]
  float* sDelta = sLseShift + 2 * BM;                                             // [2][BM]

  const int64_t seq = a.seq;
  const KeyTileBlock<T> blk = key_tile_block<T, D, BN, BM>(a);
  const int64_t bh = blk.bh, n0 = blk.n0, m_first = blk.m_first;
  const T *q_g = blk.q, *k_g = blk.k, *v_g = blk.v, *do_g = blk.dout;
  const int64_t v_ss = blk.v_stride, do_ss = blk.dout_stride;
  const int n_tiles = blk.n_mtiles;

  const auto load_q_do = [&](int i, int stage) {
    const int64_t m0 = (m_first + i) * BM;
    load_tile_async<BM, D, kThreads>(sQ + stage * BM * D, m0, seq, q_g, [&](int64_t r) { return q_g + r * D; });
    load_tile_async<BM, D, kThreads>(sdO + stage * BM * D, m0, seq, do_g,
                                     [&](int64_t r) { return do_g + r * do_ss; });
    load_row_stats<BM>(sLseShift + stage * BM, sDelta + stage * BM, a, bh, m0, int(threadIdx.x), kThreads);
  };

  load_tile_async<BN, D, kThreads>(sK, n0, seq, k_g, [&](int64_t r) { return k_g + r * D; });
  load_tile_async<BN, D, kThreads>(sV, n0, seq, v_g, [&](int64_t r) { return v_g + r * v_ss; });
  load_q_do(0, 0);
  cp_async_commit();

  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  // This thread's two keys (C fragment rows g and g + 8 of the warp's 16).
  const int64_t key_lo = n0 + warp * 16 + g, key_hi = key_lo + 8;
  const float c = a.scale_log2, scale = a.scale;

  float acc_dv[kDT][4], acc_dk[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dv[i][e] = acc_dk[i][e] = 0.f;
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) load_q_do(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int lane_v = opaque_lane(lane);  // for ldmatrix addressing

    const int64_t m0 = (m_first + it) * BM;
    const T* q_s = sQ + stage * BM * D;
    const T* do_s = sdO + stage * BM * D;
    const float* lse_s = sLseShift + stage * BM;
    const float* delta_s = sDelta + stage * BM;

    // S^T = k^_w q^T and dP^T = v_w dO^T, both 16 keys x BM queries.
    float st[kMT][4], dpt[kMT][4];
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      load_a<D>(ka, sK, warp * 16, kk * 16, lane_v);
      load_a<D>(va, sV, warp * 16, kk * 16, lane_v);
#pragma unroll
      for (int mm = 0; mm < BM / 16; ++mm) {
        uint32_t qb[4], ob[4];
        load_b_nk<D>(qb, q_s, mm * 16, kk * 16, lane_v);  // B(d, query) = q^[query][d]
        Tr::mma(st[2 * mm], ka, qb[0], qb[1]);
        Tr::mma(st[2 * mm + 1], ka, qb[2], qb[3]);
        load_b_nk<D>(ob, do_s, mm * 16, kk * 16, lane_v);  // B(d, query) = dO[query][d]
        Tr::mma(dpt[2 * mm], va, ob[0], ob[1]);
        Tr::mma(dpt[2 * mm + 1], va, ob[2], ob[3]);
      }
    }

    // P^T and dS^T (in place of st and dpt). Element e of tile i: key (e < 2 ? lo : hi),
    // query m0 + 8i + 2t + (e & 1).
    const bool need_mask = n0 + BN > seq || (a.causal && n0 + BN - 1 > m0);
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q_local = i * 8 + 2 * t + (e & 1);
        float p = fast_exp2(fmaf(st[i][e], c, -lse_s[q_local]));
        float ds = p * (dpt[i][e] - delta_s[q_local]) * scale;
        if (need_mask) {
          const int64_t key = e < 2 ? key_lo : key_hi;
          if (key >= seq || (a.causal && key > m0 + q_local)) p = ds = 0.f;
        }
        st[i][e] = p;
        dpt[i][e] = ds;
      }
    }

    // dv_w += P^T dO and dk^_w += dS^T q^ (k = queries, B(query, d) = stored [query][d]).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t pa[4] = {Tr::pack(st[2 * kk][0], st[2 * kk][1]), Tr::pack(st[2 * kk][2], st[2 * kk][3]),
                              Tr::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              Tr::pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t dsa[4] = {Tr::pack(dpt[2 * kk][0], dpt[2 * kk][1]), Tr::pack(dpt[2 * kk][2], dpt[2 * kk][3]),
                               Tr::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                               Tr::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t ob[4], qb[4];
        load_b_kn<D>(ob, do_s, kk * 16, dd * 16, lane_v);
        Tr::mma(acc_dv[2 * dd], pa, ob[0], ob[1]);
        Tr::mma(acc_dv[2 * dd + 1], pa, ob[2], ob[3]);
        load_b_kn<D>(qb, q_s, kk * 16, dd * 16, lane_v);
        Tr::mma(acc_dk[2 * dd], dsa, qb[0], qb[1]);
        Tr::mma(acc_dk[2 * dd + 1], dsa, qb[2], qb[3]);
      }
      if constexpr (ATOMIC_DQ) {
        // dS^T rows (keys) of the warp into shared memory, [key][query].
        using LS = SmemTile<BM>;
        const int k_lo = warp * 16 + g;
        *reinterpret_cast<uint32_t*>(sdS + LS::offset(k_lo, kk * 16 + 2 * t)) = dsa[0];
        *reinterpret_cast<uint32_t*>(sdS + LS::offset(k_lo + 8, kk * 16 + 2 * t)) = dsa[1];
        *reinterpret_cast<uint32_t*>(sdS + LS::offset(k_lo, kk * 16 + 8 + 2 * t)) = dsa[2];
        *reinterpret_cast<uint32_t*>(sdS + LS::offset(k_lo + 8, kk * 16 + 8 + 2 * t)) = dsa[3];
      }
    }

    if constexpr (ATOMIC_DQ) {
      __syncthreads();  // the whole dS^T tile is in shared memory
      // dq^[m0 .. m0+BM) += dS k^ (BM x D): work items of 16 queries x 32 dims spread over the warps
      // (one dS fragment feeds four MMAs). A(query, key) = sdS[key][query] (transposed load);
      // B(key, d) = k^[key][d].
      constexpr int kItemCols = 32;
      static_assert(D % kItemCols == 0, "whole dq work items");
      constexpr int kItems = (BM / 16) * (D / kItemCols);
      for (int item = warp; item < kItems; item += WARPS) {
        const int mm = item / (D / kItemCols), d0 = (item % (D / kItemCols)) * kItemCols;
        float acc[4][4] = {};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t dsa[4];
          load_a_trans<BM>(dsa, sdS, kk * 16, mm * 16, lane_v);
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            uint32_t kb[4];
            load_b_kn<D>(kb, sK, kk * 16, d0 + hh * 16, lane_v);
            Tr::mma(acc[2 * hh], dsa, kb[0], kb[1]);
            Tr::mma(acc[2 * hh + 1], dsa, kb[2], kb[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t row = m0 + mm * 16 + g + 8 * r;
          if (row >= seq) continue;
          float* dst = a.dq_hat + (bh * seq + row) * D + d0 + 2 * t;  // n8 tile j at dst + 8j; 8-byte aligned
#pragma unroll
          for (int j = 0; j < 4; ++j) atomic_add_pair(dst + 8 * j, acc[j][2 * r], acc[j][2 * r + 1]);
        }
      }
    }
    __syncthreads();  // this stage's q^ / dO and sdS are free again [mut:bwd-stage-barrier]
  }

  store_key_grads<T, D>(a, blk, key_lo, t, [&](int i, int e) { return acc_dv[i][e]; },
                        [&](int i, int e) { return acc_dk[i][e]; });
}

// Deterministic dq^: one block per (batch * head, query tile of BM = 16 * WARPS
// rows), key tiles double-buffered, as in the forward:
//     S = q^ k^T,  P = exp2(S c - lse c'),  dP = dO v^T,
//     dS = P (dP - delta) scale,  dq^ += dS k^.
template <typename T, int D, int BM, int BN, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize) flash_bwd_dq_kernel(const FlashArgs a) {
  static_assert(BM == 16 * WARPS, "each warp owns 16 query rows");
  static_assert(BN % 16 == 0 && D % 16 == 0, "whole MMA tiles");
  constexpr int kThreads = WARPS * kWarpSize;
  constexpr int kNT = BN / 8;
  constexpr int kDT = D / 8;
  using Tr = ElemTraits<T>;

  COGKERN_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* sdO = sQ + BM * D;                     // [BM][D]
  T* sK = sdO + BM * D;                     // [2][BN][D]
  T* sV = sK + 2 * BN * D;                  // [2][BN][D]

  const int64_t seq = a.seq;
  const QueryTileBlock<T, D> blk = query_tile_block<T, D, BM>(a);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0;
  const T *q_g = blk.q, *k_g = blk.k, *v_g = blk.v;
  const T* do_g = static_cast<const T*>(a.grad_out.ptr) + b * a.grad_out.stride_b + h * a.grad_out.stride_h;
  const int64_t v_ss = blk.v_stride, do_ss = a.grad_out.stride_s;
  const int n_tiles = int(ceil_div(blk.kv_end, BN));

  const auto load_kv = [&](int j, int stage) {
    const int64_t n0 = int64_t(j) * BN;
    load_tile_async<BN, D, kThreads>(sK + stage * BN * D, n0, seq, k_g, [&](int64_t r) { return k_g + r * D; });
    load_tile_async<BN, D, kThreads>(sV + stage * BN * D, n0, seq, v_g, [&](int64_t r) { return v_g + r * v_ss; });
  };
  load_tile_async<BM, D, kThreads>(sQ, m0, seq, q_g, [&](int64_t r) { return q_g + r * D; });
  load_tile_async<BM, D, kThreads>(sdO, m0, seq, do_g, [&](int64_t r) { return do_g + r * do_ss; });
  load_kv(0, 0);
  cp_async_commit();

  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row_lo = m0 + warp * 16 + g, row_hi = row_lo + 8;
  const float c = a.scale_log2, scale = a.scale;
  float lse_shift[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r == 0 ? row_lo : row_hi;
    lse_shift[r] = row < seq ? softmax_lse_shift<float>(a.lse[bh * seq + row]) : INFINITY;
    delta[r] = row < seq ? a.delta[bh * seq + row] : 0.f;
  }

  float acc_dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) load_kv(j + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int lane_v = opaque_lane(lane);  // for ldmatrix addressing

    const T* k_s = sK + stage * BN * D;
    const T* v_s = sV + stage * BN * D;
    const int64_t n0 = int64_t(j) * BN;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], oa[4];
      load_a<D>(qa, sQ, warp * 16, kk * 16, lane_v);
      load_a<D>(oa, sdO, warp * 16, kk * 16, lane_v);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t kb[4], vb[4];
        load_b_nk<D>(kb, k_s, nn * 16, kk * 16, lane_v);  // B(d, key) = k^[key][d]
        Tr::mma(s[2 * nn], qa, kb[0], kb[1]);
        Tr::mma(s[2 * nn + 1], qa, kb[2], kb[3]);
        load_b_nk<D>(vb, v_s, nn * 16, kk * 16, lane_v);  // B(d, key) = v[key][d]
        Tr::mma(dp[2 * nn], oa, vb[0], vb[1]);
        Tr::mma(dp[2 * nn + 1], oa, vb[2], vb[3]);
      }
    }

    const bool need_mask = n0 + BN > seq || (a.causal && n0 + BN - 1 > m0 + warp * 16);
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e < 2 ? 0 : 1;
        float p = fast_exp2(fmaf(s[i][e], c, -lse_shift[r]));
        float ds = p * (dp[i][e] - delta[r]) * scale;
        if (need_mask) {
          const int64_t key = n0 + i * 8 + 2 * t + (e & 1);
          if (key >= seq || (a.causal && key > (r == 0 ? row_lo : row_hi))) ds = 0.f;
        }
        s[i][e] = ds;
      }
    }

    // dq^ += dS k^ (A = dS from registers; B(key, d) = k^[key][d]).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t dsa[4] = {Tr::pack(s[2 * kk][0], s[2 * kk][1]), Tr::pack(s[2 * kk][2], s[2 * kk][3]),
                               Tr::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               Tr::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t kb[4];
        load_b_kn<D>(kb, k_s, kk * 16, dd * 16, lane_v);
        Tr::mma(acc_dq[2 * dd], dsa, kb[0], kb[1]);
        Tr::mma(acc_dq[2 * dd + 1], dsa, kb[2], kb[3]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r == 0 ? row_lo : row_hi;
    if (row >= seq) continue;
    float* dst = a.dq_hat + (bh * seq + row) * D;
#pragma unroll
    for (int i = 0; i < kDT; ++i)
      *reinterpret_cast<float2*>(dst + i * 8 + 2 * t) = make_float2(acc_dq[i][2 * r], acc_dq[i][2 * r + 1]);
  }
}

// Tile shapes. kv kernel: 8 warps x 16 keys (128-key blocks: each q^ / dO
// tile load and each dq^ atomic serves 128 keys); BM queries per step (32 at
// D = 128 keeps S^T, dP^T and the two 16 x D accumulators in registers).
// dq kernel: 4 warps x 16 queries; 32-key steps at D = 128 for the same reason.
template <int D>
struct BwdConfig;
template <>
struct BwdConfig<64> {
  static constexpr int kWarps = 8, kBN = 128, kBM = 64;
  static constexpr int kDqWarps = 4, kDqBM = 64, kDqBN = 64;
};
template <>
struct BwdConfig<128> {
  static constexpr int kWarps = 8, kBN = 128, kBM = 32;
  static constexpr int kDqWarps = 4, kDqBM = 64, kDqBN = 32;
};

// Dynamic shared memory of flash_bwd_kv_kernel: k^ and v tiles, two stages of
// q^ and dO tiles, the dS^T tile (atomic dq only), two stages of lse / delta.
template <typename T, int D, bool ATOMIC_DQ>
constexpr size_t bwd_kv_smem_bytes() {
  using C = BwdConfig<D>;
  return size_t(2 * C::kBN + 4 * C::kBM) * D * sizeof(T) + (ATOMIC_DQ ? size_t(C::kBN) * C::kBM * sizeof(T) : 0) +
         size_t(4 * C::kBM) * sizeof(float);
}

// Dynamic shared memory of flash_bwd_dq_kernel: q^ and dO tiles, two stages of k^ and v tiles.
template <typename T, int D>
constexpr size_t bwd_dq_smem_bytes() {
  using C = BwdConfig<D>;
  return size_t(2 * C::kDqBM + 4 * C::kDqBN) * D * sizeof(T);
}

}  // namespace cogkern::flash
