// Flash-attention forward on Hopper's warpgroup MMA (wgmma, sm_90a): the same
// algorithm, inputs and outputs as flash_fwd_kernel.cuh (FlashAttention-2
// structure), with the two GEMMs of each key tile on wgmma:
//     S = q^ k^T        wgmma m64nBNk16, q^ and k^ from 128-byte-swizzled shared panels
//     O += P V          wgmma m64nDk16, P straight from the S registers, V MN-major
// Grid: one block per (batch * head, 128 query rows); two warpgroups, each
// owning 64 rows, share every k^ / v tile. Key tiles (Sm90FwdConfig) stream in
// with cp.async (tile j+1 loads while tile j computes). The softmax runs on the
// wgmma accumulators, whose per-warp layout is mma.sync's C layout, so the
// online-softmax code is the mma.sync kernel's.
//
// Two schedules (PIPELINED), both opt-in until they have run on a GPU
// (COGKERN_ATTENTION_SM90=1 or 2, see flash_fwd_sm90_launch.cu):
//  - plain: per tile, S wgmma -> wait -> softmax -> P V wgmma -> wait; the
//    tensor cores idle while the softmax runs.
//  - pipelined (FA3's intra-warpgroup overlap): tile j's S = q^ k_j^T and tile
//    j-1's O += P_{j-1} V_{j-1} are issued together; the exponentials of tile j
//    run while P_{j-1} V_{j-1} is still on the tensor cores, and O is rescaled
//    only once that product has landed. V keeps three stages (k^ two) so that
//    tile j+1 can load during all of iteration j.
// Not yet FA3: no TMA, no producer warp, no ping-pong between the warpgroups.
// Checked on the CPU by the emulator (scripts/cuda_emu/run_emu.py), whose
// wgmma is asynchronous like the hardware's.
#pragma once

#include "attention/flash/sm90/flash_sm90_common.cuh"

namespace cogkern::flash {

// Key tiles of 128 at D = 64 (ptxas: 196 registers, no spills); of 64 at
// D = 128 (187 / 193), where 128 would need more than 255 registers (S and O
// accumulators are 64 + 64 per thread) and spill.
// One specialization per head dim of common/dispatch.h (an unlisted one fails to compile).
template <int KEYS_PER_TILE>
struct Sm90FwdTiles {
  static constexpr int kWarpgroups = 2;
  static constexpr int kBM = 64 * kWarpgroups;  // query rows per block
  static constexpr int kBN = KEYS_PER_TILE;     // keys per tile
  static constexpr int kThreads = kWarpgroups * sm90::kWarpgroupThreads;
};
template <int D>
struct Sm90FwdConfig;
template <>
struct Sm90FwdConfig<64> : Sm90FwdTiles<128> {};
template <>
struct Sm90FwdConfig<128> : Sm90FwdTiles<64> {};

// Dynamic shared memory: q^ tile, two stages of k^, two (plain) or three
// (pipelined) stages of v, plus 1024 bytes of alignment slack.
template <int D, bool PIPELINED>
constexpr size_t sm90_fwd_smem_bytes() {
  using C = Sm90FwdConfig<D>;
  return size_t(C::kBM + (2 + (PIPELINED ? 3 : 2)) * C::kBN) * D * 2 + sm90::kPanelGroupBytes;
}

// The online softmax of one warpgroup's 64 query rows over key tiles of BN,
// on wgmma accumulators (each thread holds rows g and g + 8 of its warp's 16;
// the layout is mma.sync's C layout, so this is the mma.sync kernel's math):
// running maxima and sums, the output accumulator O, and the final O / l and
// lse. Shared by the Hopper forwards (this file, flash_fwd_sm90_ws_kernel.cuh).
template <typename T, int D, int BN>
struct Sm90RowSoftmax {
  static constexpr int kNT = BN / 8;  // n8 score blocks per key tile
  static constexpr int kDT = D / 8;   // n8 output blocks
  float acc_o[kDT * 4];
  float row_max[2], row_sum[2];
  float alpha[2], tile_sum[2];  // of the last step, until rescale()
  int row0;                     // the thread's row g (row g + 8 is 8 further); sequences are < 2^31 tokens
  int t;                        // lane % 4: the column pair within each n8 block

  // wg_row0: the warpgroup's first row.
  __device__ __forceinline__ explicit Sm90RowSoftmax(int wg_row0) {
    const int lane = int(threadIdx.x) % kWarpSize, warp = (int(threadIdx.x) % sm90::kWarpgroupThreads) / kWarpSize;
    row0 = wg_row0 + 16 * warp + (lane >> 2);
    t = lane & 3;
#pragma unroll
    for (int i = 0; i < kDT * 4; ++i) acc_o[i] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }
  // Row of accumulator element e (e % 4 < 2: row g, else g + 8).
  __device__ __forceinline__ int row_of(int e) const { return row0 + ((e & 3) < 2 ? 0 : 8); }

  // Key tile starting at n0: masks keys past the sequence end and, when
  // causal, keys after the query; then the online-softmax step for the two
  // rows: new maxima, s := exp2(s c - max c) in place (c = scale * log2 e),
  // and the factors alpha by which O and the running sums must shrink
  // (applied by rescale(), which may wait until O is not in flight).
  __device__ __forceinline__ void step(float (&s)[kNT * 4], int n0, int seq, bool causal, float c) {
    // Warps own 16-aligned row groups: row0 - row0 % 16 is the warp's first row.
    const bool need_mask = n0 + BN > seq || (causal && n0 + BN - 1 > row0 - (row0 % 16));
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + i * 8 + 2 * t + (e & 1);
          if (key >= seq || (causal && key > row_of(e))) s[4 * i + e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_sum[r] = online_softmax_row<kNT>([&](int i, int e) -> float& { return s[4 * i + 2 * r + e]; }, row_max[r],
                                            c, alpha[r]);
    }
  }
  __device__ __forceinline__ void rescale() {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] = row_sum[r] * alpha[r] + tile_sum[r];
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        acc_o[4 * i + 2 * r] *= alpha[r];
        acc_o[4 * i + 2 * r + 1] *= alpha[r];
      }
    }
  }
  // O / l into out and lse, rows inside the sequence only.
  __device__ __forceinline__ void store(const FlashArgs& a, int64_t b, int64_t h, int64_t bh) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row_of(2 * r);
      const float l = quad_sum(row_sum[r]);
      if (row >= a.seq) continue;
      const float inv = 1.f / l;
      T* dst = static_cast<T*>(a.out.ptr) + a.out.offset(b, row, h);
#pragma unroll
      for (int i = 0; i < kDT; ++i)
        store_pair(dst + i * 8 + 2 * t, acc_o[4 * i + 2 * r] * inv, acc_o[4 * i + 2 * r + 1] * inv);
      if (t == 0) a.lse[bh * a.seq + row] = softmax_lse<float>(row_max[r], l, double(a.scale));
    }
  }
};

template <typename T, int D, bool PIPELINED>
__device__ __forceinline__ void flash_fwd_sm90_body(const FlashArgs& a, unsigned char* smem_raw) {
  using C = Sm90FwdConfig<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kThreads = C::kThreads;
  constexpr int kNT = kBN / 8;  // n8 score blocks per key tile
  constexpr int kKS = kBN / 16; // key slices of P V
  constexpr int kVStages = PIPELINED ? 3 : 2;
  using Mma = sm90::Wgmma<kBN, T>;
  using MmaPV = sm90::Wgmma<D, T>;

  unsigned char* smem = sm90::align_to_panel_group(smem_raw);
  constexpr int kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  unsigned char* sQ = smem;               // D/64 panels of kBM lines
  unsigned char* sK = sQ + kQBytes;       // [2 stages] D/64 panels of kBN lines
  unsigned char* sV = sK + 2 * kKVBytes;  // [kVStages stages] likewise

  const int64_t seq = a.seq;
  const QueryTileBlock<T, D> blk = query_tile_block<T, D, kBM>(a);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, m0 = blk.m0;
  const T *q_g = blk.q, *k_g = blk.k, *v_g = blk.v;
  const int64_t v_ss = blk.v_stride;
  const int n_tiles = int(ceil_div(blk.kv_end, kBN));

  const auto k_stage = [&](int j) { return sK + (j & 1) * kKVBytes; };
  const auto v_stage = [&](int j) { return sV + (j % kVStages) * kKVBytes; };
  const auto load_kv = [&](int j) {
    const int64_t n0 = int64_t(j) * kBN;
    load_panels_async<kBN, D, kThreads>(k_stage(j), n0, seq, k_g, [&](int64_t r) { return k_g + r * D; });
    load_panels_async<kBN, D, kThreads>(v_stage(j), n0, seq, v_g, [&](int64_t r) { return v_g + r * v_ss; });
  };
  load_panels_async<kBM, D, kThreads>(sQ, m0, seq, q_g, [&](int64_t r) { return q_g + r * D; });
  load_kv(0);
  cp_async_commit();

  const int wg = int(threadIdx.x) / sm90::kWarpgroupThreads;  // warpgroup: rows 64 wg .. 64 wg + 63
  const float c = a.scale_log2;
  // This warpgroup's 64 rows inside each q^ panel (64 lines of 128 bytes, 1024-aligned).
  const uint32_t q_base = smem_addr(sQ) + uint32_t(wg) * 64u * 128u;
  Sm90RowSoftmax<T, D, kBN> sm(int(m0) + 64 * wg);

  // S = q^ k_j^T for this warpgroup's 64 rows (D / 16 k-slices, 4 per panel); issued and committed.
  const auto issue_s = [&](float (&s)[kNT * 4], int j) {
    issue_ss_k_major<Mma, D>(s, q_base, kBM * 128, smem_addr(k_stage(j)), kBN * 128);
    sm90::wgmma_commit();
  };
  // O += P V_j: key slice kk's A registers pa[kk]; V (stored [key][dim]) is the
  // MN-major B, its 64-column panels kBN * 128 bytes apart. Issued and committed.
  const auto issue_pv = [&](const uint32_t (&pa)[kKS][4], int j) {
    issue_rs_mn_major<MmaPV>(sm.acc_o, pa, smem_addr(v_stage(j)), kBN * 128);
    sm90::wgmma_commit();
  };
  const auto softmax_step = [&](float (&s)[kNT * 4], int j) { sm.step(s, j * kBN, int(seq), a.causal, c); };
  // Tile j's data has landed for every thread, and both warpgroups are done
  // with the stages the next prefetch overwrites.
  const auto tile_ready = [&](int pending_after) {
    if (pending_after) cp_async_wait<1>(); else cp_async_wait<0>();
    // [mut:sm90-fwd-proxy-fence]
    sm90::fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
  };

  float s[kNT * 4];
  uint32_t pa[kKS][4];
  if constexpr (!PIPELINED) {
    for (int j = 0; j < n_tiles; ++j) {
      if (j + 1 < n_tiles) load_kv(j + 1);
      cp_async_commit();  // possibly empty: keeps the group count uniform
      tile_ready(1);      // everything but the newest group: tile j (and q^) has landed
      sm90::wgmma_fence();
      issue_s(s, j);
      sm90::wgmma_wait<0>();
      sm90::fence_operands(s);
      softmax_step(s, j);
      sm.rescale();
      pack_a_slices<T>(s, pa);
      sm90::wgmma_fence_after(sm.acc_o, pa);
      issue_pv(pa, j);
      sm90::wgmma_wait<0>();
      sm90::fence_operands(sm.acc_o);
      sm90::fence_operands(pa);
      __syncthreads();  // both warpgroups are done with this stage before it is refilled
    }
  } else {
    // Tile 0: its scores and softmax; P_0 waits in pa for the next iteration.
    tile_ready(0);
    if (1 < n_tiles) load_kv(1);
    cp_async_commit();
    sm90::wgmma_fence();
    issue_s(s, 0);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(s);
    softmax_step(s, 0);
    sm.rescale();
    pack_a_slices<T>(s, pa);
    for (int j = 1; j < n_tiles; ++j) {
      // Tile j has landed; everyone is past iteration j-1, so k^ stage (j+1)&1
      // (tile j-1's, read by its S) and v stage (j+1)%3 (tile j-2's, read by
      // P V in iteration j-1) are free for tile j+1.
      tile_ready(0);
      if (j + 1 < n_tiles) load_kv(j + 1);
      cp_async_commit();
      sm90::wgmma_fence_after(sm.acc_o, pa);  // pa and the rescaled acc_o, before both batches
      issue_s(s, j);
      issue_pv(pa, j - 1);
      sm90::wgmma_wait<1>();  // S of tile j has landed; P_{j-1} V_{j-1} may still run
      sm90::fence_operands(s);
      softmax_step(s, j);
      sm90::wgmma_wait<0>();  // now acc_o and pa are ours again
      sm90::fence_operands(sm.acc_o);
      sm90::fence_operands(pa);
      sm.rescale();
      pack_a_slices<T>(s, pa);
    }
    sm90::wgmma_fence_after(sm.acc_o, pa);
    issue_pv(pa, n_tiles - 1);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(sm.acc_o);
  }

  sm.store(a, b, h, bh);
}

}  // namespace cogkern::flash
