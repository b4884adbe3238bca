// Flash-attention forward on Hopper's warpgroup MMA (wgmma, sm_90a): the same
// algorithm, inputs and outputs as flash_fwd_kernel.cuh (FlashAttention-2
// structure), with the two GEMMs of each key tile on wgmma:
//     S = q^ k^T        wgmma m64nBNk16, q^ and k^ from 128-byte-swizzled shared panels
//     O += P V          wgmma m64nDk16, P straight from the S registers, V MN-major
// Grid: one block per (batch * head, 128 query rows); two warpgroups, each
// owning 64 rows, share every k^ / v tile. Key tiles (Sm90FwdConfig) are double-buffered
// with cp.async (tile j+1 loads while tile j computes). The softmax runs on the
// wgmma accumulators, whose per-warp layout is mma.sync's C layout, so the
// online-softmax code is the mma.sync kernel's.
//
// Not yet FA3: no TMA, no producer warp, no overlap of the softmax of one tile
// with the GEMMs of the next (ping-pong). Opt-in until it has run on a GPU
// (COGKERN_ATTENTION_SM90=1, see flash_fwd_sm90.cu); checked on the CPU by the
// emulator (scripts/cuda_emu/run_emu.py).
#pragma once

#include "kernels/flash_common.cuh"
#include "kernels/flash_launch.h"
#include "kernels/sm90_wgmma.cuh"

namespace cogkern::flash {

// Key tiles of 128 at D = 64 (ptxas: 190 registers, no spills); of 64 at
// D = 128, where 128 would need more than 255 registers (S and O accumulators
// are 64 + 64 per thread) and spill.
template <int D>
struct Sm90FwdConfig {
  static constexpr int kWarpgroups = 2;
  static constexpr int kBM = 64 * kWarpgroups;  // query rows per block
  static constexpr int kBN = D == 64 ? 128 : 64;  // keys per tile
  static constexpr int kThreads = kWarpgroups * sm90::kWarpgroupThreads;
};

// Dynamic shared memory: q^ tile, two stages of k^ and v tiles (swizzled
// panels), plus 1024 bytes of alignment slack.
template <int D>
constexpr size_t sm90_fwd_smem_bytes() {
  return size_t(Sm90FwdConfig<D>::kBM + 4 * Sm90FwdConfig<D>::kBN) * D * 2 + sm90::kPanelGroupBytes;
}

// Rows [row0, row0 + ROWS) of a [seq, D] row stream into D / 64 swizzled
// panels of ROWS lines (panel p = columns 64p..64p+63, ROWS * 128 bytes), with
// cp.async; rows >= seq are zero-filled.
template <int ROWS, int D, int THREADS, typename T, typename RowPtr>
__device__ __forceinline__ void load_panels_async(unsigned char* panels, int64_t row0, int64_t seq, const T* any_valid,
                                                  RowPtr row_ptr) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kTotal / THREADS; ++i) {
    const int idx = int(threadIdx.x) + i * THREADS;
    const int r = idx / kChunks, col = (idx % kChunks) * 8;
    const int64_t grow = row0 + r;
    const bool valid = grow < seq;
    const T* src = valid ? row_ptr(grow) + col : any_valid;
    unsigned char* panel = panels + (col / sm90::kPanelCols) * (ROWS * 128);
    cp_async_16(smem_addr(panel + sm90::sw128_offset(r, col % sm90::kPanelCols)), src, valid);
  }
}

template <typename T, int D>
__device__ __forceinline__ void flash_fwd_sm90_body(const FlashArgs& a, unsigned char* smem_raw) {
  using C = Sm90FwdConfig<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kThreads = C::kThreads;
  constexpr int kNT = kBN / 8;  // n8 score blocks per key tile
  constexpr int kDT = D / 8;    // n8 output blocks
  using Tr = ElemTraits<T>;
  using Mma = sm90::Wgmma<kBN, T>;
  using MmaPV = sm90::Wgmma<D, T>;

  // Panels start 1024-byte aligned (the swizzle reads address bits 7..9).
  const uint32_t raw = smem_addr(smem_raw);
  unsigned char* smem = smem_raw + ((sm90::kPanelGroupBytes - raw % sm90::kPanelGroupBytes) % sm90::kPanelGroupBytes);
  constexpr int kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  unsigned char* sQ = smem;                 // D/64 panels of kBM lines
  unsigned char* sK = sQ + kQBytes;         // [2 stages] D/64 panels of kBN lines
  unsigned char* sV = sK + 2 * kKVBytes;    // [2 stages] likewise

  const int64_t seq = a.seq;
  const int64_t n_mtiles = ceil_div(seq, kBM);
  const int64_t bh = int64_t(blockIdx.x) / n_mtiles;
  int64_t m_tile = int64_t(blockIdx.x) % n_mtiles;
  if (a.causal) m_tile = n_mtiles - 1 - m_tile;  // the longest (last) query tiles start first
  const int64_t m0 = m_tile * kBM;
  const int64_t b = bh / a.heads, h = bh % a.heads;

  const T* q_g = static_cast<const T*>(a.q_hat) + bh * seq * D;
  const T* k_g = static_cast<const T*>(a.k_hat) + bh * seq * D;
  const T* v_g = static_cast<const T*>(a.v.ptr) + b * a.v.stride_b + h * a.v.stride_h;
  const int64_t v_ss = a.v.stride_s;

  const int64_t kv_end = a.causal ? (m0 + kBM < seq ? m0 + kBM : seq) : seq;
  const int n_tiles = int(ceil_div(kv_end, kBN));

  const auto load_kv = [&](int j, int stage) {
    const int64_t n0 = int64_t(j) * kBN;
    load_panels_async<kBN, D, kThreads>(sK + stage * kKVBytes, n0, seq, k_g, [&](int64_t r) { return k_g + r * D; });
    load_panels_async<kBN, D, kThreads>(sV + stage * kKVBytes, n0, seq, v_g, [&](int64_t r) { return v_g + r * v_ss; });
  };
  load_panels_async<kBM, D, kThreads>(sQ, m0, seq, q_g, [&](int64_t r) { return q_g + r * D; });
  load_kv(0, 0);
  cp_async_commit();

  const int tid = int(threadIdx.x);
  const int wg = tid / sm90::kWarpgroupThreads;               // warpgroup: rows 64 wg .. 64 wg + 63
  const int warp = (tid % sm90::kWarpgroupThreads) / kWarpSize;  // warp in the warpgroup: 16 rows each
  const int lane = tid % kWarpSize, g = lane >> 2, t = lane & 3;
  const int64_t wg_row0 = m0 + 64 * wg;
  // Row of accumulator element e (e % 4 < 2: row g, else g + 8) for this thread.
  const auto row_of = [&](int e) { return wg_row0 + 16 * warp + g + ((e & 3) < 2 ? 0 : 8); };
  const float c = a.scale_log2;
  // This warpgroup's 64 rows inside each q^ panel (64 lines of 128 bytes, 1024-aligned).
  const uint32_t q_base = smem_addr(sQ) + uint32_t(wg) * 64u * 128u;

  float acc_o[kDT * 4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kDT * 4; ++i) acc_o[i] = 0.f;

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) load_kv(j + 1, stage ^ 1);
    cp_async_commit();   // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // everything but the newest group: tile j (and q^) has landed
    sm90::fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
    const int64_t n0 = int64_t(j) * kBN;
    const uint32_t k_base = smem_addr(sK + stage * kKVBytes), v_base = smem_addr(sV + stage * kKVBytes);

    // S = q^ k^T for this warpgroup's 64 rows: D / 16 k-slices, 4 per panel.
    float s[kNT * 4];
    sm90::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t panel = uint32_t(ks / 4);
      Mma::ss(s, sm90::desc_k_major(q_base + panel * uint32_t(kBM * 128), ks % 4),
              sm90::desc_k_major(k_base + panel * uint32_t(kBN * 128), ks % 4), ks > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();

    // Mask keys past the sequence end and, when causal, keys after the query.
    const bool need_mask = n0 + kBN > seq || (a.causal && n0 + kBN - 1 > wg_row0 + 16 * warp);
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = n0 + i * 8 + 2 * t + (e & 1);
          if (key >= seq || (a.causal && key > row_of(e))) s[4 * i + e] = -INFINITY;
        }
      }
    }

    // Online softmax update of the thread's two rows.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        tile_max = softmax_max<float>(tile_max, s[4 * i + 2 * r]);
        tile_max = softmax_max<float>(tile_max, s[4 * i + 2 * r + 1]);
      }
      tile_max = quad_max(tile_max);
      const float new_max = softmax_max<float>(row_max[r], tile_max);
      const float alpha = softmax_rescale<float>(row_max[r], new_max, c);
      const float shift = softmax_shift<float>(new_max, c);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        s[4 * i + 2 * r] = fast_exp2(fmaf(s[4 * i + 2 * r], c, -shift));
        s[4 * i + 2 * r + 1] = fast_exp2(fmaf(s[4 * i + 2 * r + 1], c, -shift));
        sum += s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
      row_max[r] = new_max;
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        acc_o[4 * i + 2 * r] *= alpha;
        acc_o[4 * i + 2 * r + 1] *= alpha;
      }
    }

    // O += P V: key slice kk's A registers are the S accumulators of n8 blocks
    // 2kk and 2kk+1; V (stored [key][dim]) is the MN-major B, its 64-column
    // panels kBN * 128 bytes apart.
    // All A registers are written before the fence: wgmma.fence orders register
    // writes by other instructions before the wgmma that read them.
    uint32_t pa[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      pa[kk][0] = Tr::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Tr::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Tr::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Tr::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      MmaPV::template rs<1>(acc_o, pa[kk], sm90::desc_mn_major(v_base, kk, uint32_t(kBN * 128)), true);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    __syncthreads();  // both warpgroups are done with this stage before it is refilled
  }

  // Finish: O / l and lse, rows inside the sequence only.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row_of(2 * r);
    const float l = quad_sum(row_sum[r]);
    if (row >= seq) continue;
    const float inv = 1.f / l;
    T* dst = static_cast<T*>(a.out.ptr) + a.out.offset(b, row, h);
#pragma unroll
    for (int i = 0; i < kDT; ++i) store_pair(dst + i * 8 + 2 * t, acc_o[4 * i + 2 * r] * inv, acc_o[4 * i + 2 * r + 1] * inv);
    if (t == 0) a.lse[bh * seq + row] = softmax_lse<float>(row_max[r], l, double(a.scale));
  }
}

}  // namespace cogkern::flash
