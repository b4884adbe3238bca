// Flash-attention forward kernel (FlashAttention-2 structure) on tensor cores;
// launched by flash_fwd_launch.cu.
//
// Grid: one block per (batch * head, query tile of BM rows). Each of the
// WARPS warps owns BM / WARPS query rows (16-row MMA tiles); their q^ rows stay
// in shared memory and are read as A fragments for every key tile. For each key tile of BN keys
// (double-buffered with cp.async: tile j+1 loads while tile j computes):
//     S = q^ k^T                       (fp32 accumulators, BM/WARPS x BN per warp)
//     masked scores (key >= seq, or key > query when causal) = -inf
//     m' = max(m, rowmax S),  P = exp2(S * c - m' * c),  c = scale * log2(e)
//     l  = l * exp2((m - m') c) + rowsum P,  O = O * exp2((m - m') c) + P V
// with P converted to the input dtype straight from the S registers (see the
// layout note in flash_common.cuh). At the end O / l is stored in the input
// dtype and lse = ln(l) + scale * m in fp32. The running max is over the raw
// scores, so scaling happens inside exp2 and fp16 inputs of any magnitude
// cannot overflow (all accumulation is fp32). A NaN score makes its row's sum,
// lse and output NaN (through its exponential: see online_softmax_row).
#pragma once

#include "attention/flash/flash_common.cuh"
#include "attention/flash/flash_params.h"

namespace cogkern::flash {

template <typename T, int D, int BM, int BN, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize) flash_fwd_kernel(const FlashArgs a) {
  // Each warp owns kMT consecutive 16-row MMA tiles: every k^ / v fragment it
  // loads from shared memory then feeds kMT MMAs (less shared-memory traffic
  // per MMA), at the price of kMT sets of S and O registers.
  static_assert(BM % (16 * WARPS) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(D % 16 == 0 && BN % 16 == 0, "whole MMA tiles");
  constexpr int kMT = BM / (16 * WARPS);  // 16-row tiles per warp
  constexpr int kThreads = WARPS * kWarpSize;
  constexpr int kNT = BN / 8;  // n8 score tiles per key tile
  constexpr int kDT = D / 8;   // n8 output tiles
  using Tr = ElemTraits<T>;

  COGKERN_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* sK = sQ + BM * D;                      // [2][BN][D]
  T* sV = sK + 2 * BN * D;                  // [2][BN][D]

  const int64_t seq = a.seq;
  const QueryTileBlock<T, D> blk = query_tile_block<T, D, BM>(a);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0;
  const T *q_g = blk.q, *k_g = blk.k, *v_g = blk.v;
  const int64_t v_ss = blk.v_stride;
  const int n_tiles = int(ceil_div(blk.kv_end, BN));

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
  const int warp_row0 = warp * 16 * kMT;  // first row of the warp inside the block tile
  // Row of element e of MMA tile mt for this thread: C fragment rows g (e < 2) and g + 8.
  const auto row_of = [&](int mt, int e) { return m0 + warp_row0 + mt * 16 + g + (e < 2 ? 0 : 8); };
  const float c = a.scale_log2;

  float acc_o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];  // row_sum: this thread's partial sums, quad-reduced at the end
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < kDT; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) load_kv(j + 1, stage ^ 1);
    cp_async_commit();   // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // everything but the newest group: tile j (and q^) has landed [mut:fwd-wait-tile]
    __syncthreads();
    const int lane_v = opaque_lane(lane);  // for ldmatrix addressing

    const T* k_s = sK + stage * BN * D;
    const T* v_s = sV + stage * BN * D;
    const int64_t n0 = int64_t(j) * BN;

    // S = q^ k^T for the warp's rows.
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) load_a<D>(qa[mt], sQ, warp_row0 + mt * 16, kk * 16, lane_v);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t kb[4];
        load_b_nk<D>(kb, k_s, nn * 16, kk * 16, lane_v);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Tr::mma(s[mt][2 * nn], qa[mt], kb[0], kb[1]);
          Tr::mma(s[mt][2 * nn + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      // Mask keys past the sequence end and, when causal, keys after the query.
      const bool need_mask = n0 + BN > seq || (a.causal && n0 + BN - 1 > m0 + warp_row0 + mt * 16);
      if (need_mask) {
#pragma unroll
        for (int i = 0; i < kNT; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t key = n0 + i * 8 + 2 * t + (e & 1);
            if (key >= seq || (a.causal && key > row_of(mt, e))) s[mt][i][e] = -INFINITY;
          }
        }
      }

      // Online softmax update of the tile's two rows.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float alpha;
        const float sum = online_softmax_row<kNT>([&](int i, int e) -> float& { return s[mt][i][2 * r + e]; },
                                                  row_max[mt][r], c, alpha);
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int i = 0; i < kDT; ++i) {
          acc_o[mt][i][2 * r] *= alpha;
          acc_o[mt][i][2 * r + 1] *= alpha;
        }
      }
    }

    // O += P V; P's A fragments come from the S registers (k-slice kk = n8 tiles 2kk, 2kk+1).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = Tr::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = Tr::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = Tr::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = Tr::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t vb[4];
        load_b_kn<D>(vb, v_s, kk * 16, dd * 16, lane_v);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Tr::mma(acc_o[mt][2 * dd], pa[mt], vb[0], vb[1]);
          Tr::mma(acc_o[mt][2 * dd + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled [mut:fwd-refill-barrier]
  }

  // Finish: O / l and lse, rows inside the sequence only.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row_of(mt, 2 * r);
      const float l = quad_sum(row_sum[mt][r]);
      if (row >= seq) continue;
      const float inv = 1.f / l;
      T* dst = static_cast<T*>(a.out.ptr) + a.out.offset(b, row, h);
#pragma unroll
      for (int i = 0; i < kDT; ++i)
        store_pair(dst + i * 8 + 2 * t, acc_o[mt][i][2 * r] * inv, acc_o[mt][i][2 * r + 1] * inv);
      if (t == 0) a.lse[bh * seq + row] = softmax_lse<float>(row_max[mt][r], l, double(a.scale));
    }
  }
}

// Tile shapes per head dim, 4 warps, 64-key tiles. D = 64: 32 query rows per
// warp (two 16-row MMA tiles, so each k^ / v fragment read from shared memory
// feeds two MMAs; ptxas: 251 registers, no spills). D = 128: 16 rows per warp
// (two tiles would need 255 registers and spill 240 bytes; one: 246, none).
template <int D>
struct FwdConfig;
template <>
struct FwdConfig<64> {
  static constexpr int kWarps = 4, kBM = 128, kBN = 64;
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
