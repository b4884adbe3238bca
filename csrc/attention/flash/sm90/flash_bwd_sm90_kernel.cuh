// Flash-attention backward on Hopper's warpgroup MMA (wgmma, sm_90a): the
// key-tile kernel of flash_bwd_kernel.cuh (same inputs, outputs and math) with
// every product on wgmma. With P = exp(scale * q^ k^T - lse) and
// dS = P * (dO v^T - delta) * scale:
//     dv = P^T dO,   dk^ = dS^T q^,   dq^ = dS k^.
//
// Grid: one block per (batch * head, 64 keys per warpgroup); each warpgroup
// keeps the dv and dk^ of its 64 keys in fp32 accumulators while the block
// walks the query tiles (64 rows; q^ and dO double-buffered in swizzled
// panels, as in the Hopper forward). Per query tile, warpgroup w computes,
// keys as rows:
//     S^T  = k^_w q^T      wgmma, k^_w and q^ K-major from shared memory
//     dP^T = v_w dO^T      likewise
//     P^T, dS^T            in registers (the accumulators' layout is mma.sync's)
//     dv_w  += P^T dO      wgmma, P^T from registers, dO MN-major (as stored)
//     dk^_w += dS^T q^     wgmma, dS^T from registers, q^ MN-major
// and, with ATOMIC_DQ, dS^T goes to a swizzled shared panel [key][query] so
// that, per 64 columns of dq^, one warpgroup computes
//     dq^ += dS k^         wgmma, dS MN-major (transposed) and k^ MN-major
// over all the block's keys and adds it into the fp32 dq^ buffer with atomics
// (order-dependent rounding). Without ATOMIC_DQ (deterministic) dq^ comes from
// the mma.sync dq kernel afterwards.
// Masking as in flash_bwd_kernel.cuh: P = dS = 0 for key >= seq and, when
// causal, key > query; query rows past the end load as zeros with lse = +inf.
// Opt-in until it has run on a GPU (COGKERN_ATTENTION_SM90_BWD=1 or 2, see
// flash_bwd_sm90_launch.cu); checked on the CPU by the emulator (scripts/cuda_emu).
// Not yet FA3: no overlap of the softmax with the tensor cores inside a
// warpgroup, no TMA.
#pragma once

#include "attention/flash/flash_bwd_kernel.cuh"  // load_row_stats
#include "attention/flash/sm90/flash_sm90_common.cuh"

namespace cogkern::flash {

// WARPGROUPS per block: 2 (128 keys per block, one block per SM; the two
// warpgroups share the q^ / dO tiles and split the dq^ product) or 1 (64
// keys per block, two blocks per SM that run independently of each other, at
// twice the dq^ atomics). Which is faster is for a GPU to say (the
// COGKERN_ATTENTION_SM90_BWD modes run both).
template <int D, int WARPGROUPS>
struct Sm90BwdConfig {
  static constexpr int kWarpgroups = WARPGROUPS;
  static constexpr int kBN = 64 * kWarpgroups;  // keys per block, 64 per warpgroup
  static constexpr int kBM = 64;                // queries per step: dS^T is one 64-column panel
  static constexpr int kThreads = kWarpgroups * sm90::kWarpgroupThreads;
  static constexpr int kMinBlocks = 2 / kWarpgroups;      // resident blocks per SM the kernel is built for
  static constexpr int kDqPanels = D / sm90::kPanelCols;  // 64-column panels of dq^, one wgmma batch each
  static_assert(WARPGROUPS == 1 || WARPGROUPS == 2, "one or two warpgroups");
  static_assert(is_attention_head_dim(D) && D % sm90::kPanelCols == 0, "a head dim of common/dispatch.h, in 64-column panels");
  static_assert(kBM == sm90::kPanelCols, "dS^T rows (one per key) are single 128-byte swizzled lines");
};

// Dynamic shared memory: k^ and v tiles, two stages of q^ and dO, the dS^T
// panel, two stages of lse / delta, plus 1024 bytes of alignment slack.
template <int D, int WARPGROUPS>
constexpr size_t sm90_bwd_smem_bytes() {
  using C = Sm90BwdConfig<D, WARPGROUPS>;
  return size_t(2 * C::kBN + 4 * C::kBM) * D * 2 + size_t(C::kBN) * C::kBM * 2 + 4 * C::kBM * sizeof(float) +
         sm90::kPanelGroupBytes;
}

// Per-query-tile steps shared by the Hopper backwards (this file and
// flash_bwd_sm90_ws_kernel.cuh); "the thread" is one of a warpgroup's 128,
// whose accumulator rows are keys key_lo and key_lo + 8.

// P^T and dS^T in place of S^T and dP^T. Element e of n8 block i: key key_lo
// (+ 8 when e >= 2), query m0 + 8 i + 2 t + (e & 1); lse_s / delta_s hold the
// tile's lse shifts and deltas.
template <int MT>
__device__ __forceinline__ void sm90_bwd_probs(float (&st)[MT * 4], float (&dpt)[MT * 4], const float* lse_s,
                                               const float* delta_s, const FlashArgs& a, int64_t key_lo, int64_t m0,
                                               bool need_mask, int t) {
  const float c = a.scale_log2, scale = a.scale;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int q_local = i * 8 + 2 * t + (e & 1);
      float p = fast_exp2(fmaf(st[4 * i + e], c, -lse_s[q_local]));
      float ds = p * (dpt[4 * i + e] - delta_s[q_local]) * scale;
      if (need_mask) {
        const int64_t key = key_lo + (e < 2 ? 0 : 8);
        if (key >= a.seq || (a.causal && key > m0 + q_local)) p = ds = 0.f;
      }
      st[4 * i + e] = p;
      dpt[4 * i + e] = ds;
    }
  }
}

// dS^T into its swizzled panel, [key][query]: register r of slice kk holds
// row key_row (+ 8 for r odd), queries 16 kk + 2 t (+ 8 for r >= 2), +1.
// Followed by the proxy fence the dq^ wgmma (another warpgroup's, too) needs.
template <int QS>
__device__ __forceinline__ void store_ds_t(unsigned char* sdS, const uint32_t (&dsa)[QS][4], int key_row, int t) {
#pragma unroll
  for (int kk = 0; kk < QS; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
      sm90::store_for_async_proxy(sdS + sm90::sw128_offset(key_row + (r & 1) * 8, 16 * kk + (r >> 1) * 8 + 2 * t),
                                  dsa[kk][r]);
  }
  sm90::fence_proxy_async_shared();  // [mut:sm90-bwd-ds-fence]
}

// dq^[m0 .. m0 + 64) panel p += dS k^[:, panel p] over the block's KEYS keys
// (dS^T panel at sds, k^ panels of KEYS lines at sk), for the panels this
// warpgroup takes at step it: panel p goes to warpgroup (p + it) % WARPGROUPS
// (with two, they alternate by step at D = 64 or take one panel each at
// D = 128). add(p, acc) adds a panel's accumulators into the fp32 dq^ (every
// thread of the warpgroup calls it). Waits for every batch this warpgroup has
// issued.
template <typename T, int D, int KEYS, int WARPGROUPS, typename AddPanel>
__device__ __forceinline__ void sm90_bwd_dq(uint32_t sds, uint32_t sk, int it, int wg, AddPanel add) {
  using MmaQ = sm90::Wgmma<sm90::kPanelCols, T>;
#pragma unroll
  for (int p = 0; p < D / sm90::kPanelCols; ++p) {
    if ((p + it) % WARPGROUPS != wg) continue;
    float acc_dq[sm90::kPanelCols / 2];
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk)
      MmaQ::template ss<1, 1>(acc_dq, sm90::desc_mn_major(sds, kk, uint32_t(KEYS * 128)),
                              sm90::desc_mn_major(sk + uint32_t(p * KEYS * 128), kk, uint32_t(KEYS * 128)), kk > 0);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(acc_dq);
    add(p, acc_dq);
  }
}

// The add of sm90_bwd_dq as per-thread atomics: rows 16 warp + g (+ 8) of the
// tile, columns 64 p + 8 j + 2 t, +1.
template <int D>
__device__ __forceinline__ void atomic_add_dq_panel(const FlashArgs& a, int64_t bh, int64_t m0, int p,
                                                    const float (&acc_dq)[sm90::kPanelCols / 2]) {
  const int lane = int(threadIdx.x) % kWarpSize, warp = (int(threadIdx.x) % sm90::kWarpgroupThreads) / kWarpSize;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + 16 * warp + g + 8 * r;
    if (row >= a.seq) continue;
    float* dst = a.dq_hat + (bh * a.seq + row) * D + p * sm90::kPanelCols + 2 * t;
#pragma unroll
    for (int j = 0; j < sm90::kPanelCols / 8; ++j)
      atomic_add_pair(dst + 8 * j, acc_dq[4 * j + 2 * r], acc_dq[4 * j + 2 * r + 1]);
  }
}

template <typename T, int D, int WARPGROUPS, bool ATOMIC_DQ>
__device__ __forceinline__ void flash_bwd_sm90_body(const FlashArgs& a, unsigned char* smem_raw) {
  using C = Sm90BwdConfig<D, WARPGROUPS>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kThreads = C::kThreads;
  constexpr int kMT = kBM / 8;   // n8 blocks of a 64-key x kBM product (S^T, dP^T)
  constexpr int kDT = D / 8;     // n8 blocks of a 64-key x D product (dv, dk^)
  constexpr int kQS = kBM / 16;  // query slices: the K dimension of dv and dk^
  using MmaS = sm90::Wgmma<kBM, T>;             // S^T, dP^T
  using MmaKV = sm90::Wgmma<D, T>;              // dv, dk^

  unsigned char* smem = sm90::align_to_panel_group(smem_raw);
  constexpr int kKVBytes = kBN * D * 2, kQBytes = kBM * D * 2;
  unsigned char* sK = smem;                // D/64 panels of kBN lines
  unsigned char* sV = sK + kKVBytes;       // likewise
  unsigned char* sQ = sV + kKVBytes;       // [2 stages] D/64 panels of kBM lines
  unsigned char* sdO = sQ + 2 * kQBytes;   // likewise
  unsigned char* sdS = sdO + 2 * kQBytes;  // dS^T: kBN lines (keys) of kBM queries
  float* sLseShift = reinterpret_cast<float*>(sdS + kBN * kBM * 2);  // [2][kBM]
  float* sDelta = sLseShift + 2 * kBM;                                // [2][kBM]

  const int64_t seq = a.seq;
  const KeyTileBlock<T> blk = key_tile_block<T, D, kBN, kBM>(a);
  const int64_t bh = blk.bh, n0 = blk.n0;
  const T *q_g = blk.q, *k_g = blk.k, *v_g = blk.v, *do_g = blk.dout;
  const int n_tiles = blk.n_mtiles;

  const auto q_stage = [&](int i) { return sQ + (i & 1) * kQBytes; };
  const auto do_stage = [&](int i) { return sdO + (i & 1) * kQBytes; };
  const auto m0_of = [&](int i) { return (blk.m_first + i) * kBM; };
  const auto load_q_do = [&](int i) {
    load_panels_async<kBM, D, kThreads>(q_stage(i), m0_of(i), seq, q_g, [&](int64_t r) { return q_g + r * D; });
    load_panels_async<kBM, D, kThreads>(do_stage(i), m0_of(i), seq, do_g,
                                        [&](int64_t r) { return do_g + r * blk.dout_stride; });
  };
  const auto load_stats = [&](int i) {  // plain stores: visible after the next __syncthreads
    load_row_stats<kBM>(sLseShift + (i & 1) * kBM, sDelta + (i & 1) * kBM, a, bh, m0_of(i), int(threadIdx.x), kThreads);
  };
  load_panels_async<kBN, D, kThreads>(sK, n0, seq, k_g, [&](int64_t r) { return k_g + r * D; });
  load_panels_async<kBN, D, kThreads>(sV, n0, seq, v_g, [&](int64_t r) { return v_g + r * blk.v_stride; });
  load_q_do(0);
  cp_async_commit();
  load_stats(0);

  const int tid = int(threadIdx.x);
  const int wg = tid / sm90::kWarpgroupThreads;                  // warpgroup: keys 64 wg .. 64 wg + 63
  const int warp = (tid % sm90::kWarpgroupThreads) / kWarpSize;  // warp in the warpgroup: 16 keys (or dq^ rows)
  const int lane = tid % kWarpSize, g = lane >> 2, t = lane & 3;
  const int key_row = 64 * wg + 16 * warp + g;  // the thread's first key within the block (C row g; + 8: row g + 8)
  const int64_t key_lo = n0 + key_row;
  // This warpgroup's 64 rows inside each k^ / v panel (kBN lines of 128 bytes).
  const uint32_t k_rows = smem_addr(sK) + uint32_t(wg) * 64u * 128u;
  const uint32_t v_rows = smem_addr(sV) + uint32_t(wg) * 64u * 128u;

  float acc_dv[kDT * 4], acc_dk[kDT * 4];
#pragma unroll
  for (int i = 0; i < kDT * 4; ++i) acc_dv[i] = acc_dk[i] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    // Tile it (and k^, v) has landed for every thread, and every thread is past
    // step it - 1: the other stage, its stats and the dS^T panel are free.
    cp_async_wait<0>();
    sm90::fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
    if (it + 1 < n_tiles) load_q_do(it + 1);
    cp_async_commit();

    const int64_t m0 = m0_of(it);
    const uint32_t q_base = smem_addr(q_stage(it)), do_base = smem_addr(do_stage(it));

    // S^T = k^_w q^T and dP^T = v_w dO^T (D / 16 k-slices, 4 per panel), one batch.
    float st[kMT * 4], dpt[kMT * 4];
    sm90::wgmma_fence();
    issue_ss_k_major<MmaS, D>(st, k_rows, kBN * 128, q_base, kBM * 128);
    issue_ss_k_major<MmaS, D>(dpt, v_rows, kBN * 128, do_base, kBM * 128);
    sm90::wgmma_commit();
    if (it + 1 < n_tiles) load_stats(it + 1);  // its global-load latency hides behind the products
    sm90::wgmma_wait<0>();
    sm90::fence_operands(st);
    sm90::fence_operands(dpt);

    const bool need_mask = n0 + kBN > seq || (a.causal && n0 + kBN - 1 > m0);
    sm90_bwd_probs<kMT>(st, dpt, sLseShift + (it & 1) * kBM, sDelta + (it & 1) * kBM, a, key_lo, m0, need_mask, t);
    // Packed to 16 bits they are the A registers of query slice kk (n8 blocks 2kk, 2kk+1).
    uint32_t pa[kQS][4], dsa[kQS][4];
    pack_a_slices<T>(st, pa);
    pack_a_slices<T>(dpt, dsa);
    if constexpr (ATOMIC_DQ) store_ds_t<kQS>(sdS, dsa, key_row, t);

    // dv_w += P^T dO and dk^_w += dS^T q^: K = the tile's queries, B stored [query][dim] (MN-major).
    sm90::wgmma_fence_after(pa, dsa, acc_dv, acc_dk);
    issue_rs_mn_major<MmaKV>(acc_dv, pa, do_base, kBM * 128);
    issue_rs_mn_major<MmaKV>(acc_dk, dsa, q_base, kBM * 128);
    sm90::wgmma_commit();

    if constexpr (ATOMIC_DQ) {
      __syncthreads();  // every warpgroup's dS^T is in the panel [mut:sm90-bwd-ds-barrier]
      sm90_bwd_dq<T, D, kBN, WARPGROUPS>(smem_addr(sdS), smem_addr(sK), it, wg, [&](int p, const float (&acc)[32]) {
        atomic_add_dq_panel<D>(a, bh, m0, p, acc);
      });
    }
    sm90::wgmma_wait<0>();  // dv, dk^ of this tile: pa, dsa and the stage are free
    sm90::fence_operands(acc_dv);
    sm90::fence_operands(acc_dk);
    sm90::fence_operands(pa);
    sm90::fence_operands(dsa);
  }

  store_key_grads<T, D>(a, blk, key_lo, t, [&](int i, int e) { return acc_dv[4 * i + e]; },
                        [&](int i, int e) { return acc_dk[4 * i + e]; });
}

}  // namespace cogkern::flash
