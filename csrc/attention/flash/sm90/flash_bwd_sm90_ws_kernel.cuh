// Flash-attention backward on Hopper, warp-specialized: the key-tile kernel of
// flash_bwd_sm90_kernel.cuh (same math, inputs, outputs, per-tile steps) with
// its loads on a producer warpgroup, FlashAttention-3's structure.
//   - Producer warpgroup: one thread loads the block's k^ and v once, then
//     streams the q^ and dO tiles with TMA into a kStages ring; one warp loads
//     the tiles' lse shifts and deltas next to them. A stage's "full"
//     mbarrier completes when the TMA bytes have landed and the 32 stats
//     lanes have arrived; its "empty" one when every consumer warp is done
//     with it. setmaxnreg gives the producer's registers to the consumers.
//   - Two consumer warpgroups, 64 keys each, keep dv and dk^ in fp32
//     accumulators while the query tiles go by (S^T, dP^T, P^T, dS^T, dv, dk^
//     as in flash_bwd_sm90_kernel.cuh). With ATOMIC_DQ they write dS^T into a
//     double-buffered panel, meet at a named barrier (the only block-level
//     barrier of the loop), and each computes its share of dq^ = dS k^; the
//     double buffer lets one warpgroup run a step ahead into the next panel
//     while the other still reads the last one. A dq^ panel goes out as
//     FA3's does: staged in shared memory, then added into the fp32 dq^ by
//     bulk TMA reductions (one per row of 64 columns, issued by one warp)
//     instead of 2048 per-thread atomics. Without ATOMIC_DQ (deterministic)
//     the consumers never wait for each other.
// Grid: one block per (batch * head, 128 keys). Opt-in
// (COGKERN_ATTENTION_SM90_BWD=3, flash_bwd_sm90_launch.cu) until it has run on a GPU.
// Checked on the CPU by the emulator, like the warp-specialized forward.
#pragma once

#include "attention/flash/sm90/flash_bwd_sm90_kernel.cuh"
#include "common/cuda/device_seam.h"

namespace cogkern::flash {

template <int D>
struct Sm90WsBwdConfig {
  static constexpr int kConsumers = 2;           // warpgroups of 64 keys
  static constexpr int kBN = 64 * kConsumers;    // keys per block
  static constexpr int kBM = sm90::kPanelCols;   // queries per step: dS^T is one 64-column panel
  static constexpr int kStages = 2;              // q^ / dO / stats ring
  static constexpr int kThreads = (kConsumers + 1) * sm90::kWarpgroupThreads;
  static constexpr int kStatsThreads = kWarpSize;  // the producer's second warp
  // Registers after setmaxnreg: 128 * 40 + 256 * 232 = 384 * 168. The
  // producer needs 40 (its stats warp; 24 spills in every variant). ptxas:
  // no spills, except 80 bytes at D = 128 with atomic dq^.
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  static_assert(is_attention_head_dim(D) && D % sm90::kPanelCols == 0, "a head dim of common/dispatch.h, in 64-column panels");
};

// The TMA descriptors: q^ and k^ from the scratch, v and dO as the caller's views.
struct Sm90BwdMaps {
  CUtensorMap q, k, v, dout;
};

template <int D>
inline bool make_sm90_bwd_maps(const FlashArgs& a, Sm90BwdMaps* maps) {
  using C = Sm90WsBwdConfig<D>;
  return make_head_rows_map<D>(&maps->q, a.q_hat, a, C::kBM) && make_head_rows_map<D>(&maps->k, a.k_hat, a, C::kBN) &&
         make_bshd_map<D>(&maps->v, a.v, a, C::kBN) && make_bshd_map<D>(&maps->dout, a.grad_out, a, C::kBM);
}

// A consumer's dq^ staging panel: kBM rows of 64 fp32, each padded by 16 bytes
// (fewer bank conflicts on the accumulator stores; rows stay 16-byte aligned
// for the bulk reductions).
constexpr uint32_t kDqStageRowBytes = sm90::kPanelCols * 4 + 16;

// Dynamic shared memory: k^ and v, kStages of q^ and dO, two dS^T panels, a
// dq^ staging panel per consumer, kStages of lse shifts and deltas, the
// mbarriers, 1024 bytes of alignment slack.
template <int D>
constexpr size_t sm90_ws_bwd_smem_bytes() {
  using C = Sm90WsBwdConfig<D>;
  return size_t(2 * C::kBN + 2 * C::kStages * C::kBM) * D * 2 + 2 * size_t(C::kBN) * C::kBM * 2 +
         size_t(C::kConsumers) * C::kBM * kDqStageRowBytes + 2 * C::kStages * C::kBM * sizeof(float) +
         8 * (1 + 2 * C::kStages) + sm90::kPanelGroupBytes;
}

template <typename T, int D, bool ATOMIC_DQ>
__device__ __forceinline__ void flash_bwd_sm90_ws_body(const FlashArgs& a, const Sm90BwdMaps& maps,
                                                       unsigned char* smem_raw) {
  using C = Sm90WsBwdConfig<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kStages = C::kStages;
  constexpr int kMT = kBM / 8;   // n8 blocks of a 64-key x kBM product (S^T, dP^T)
  constexpr int kDT = D / 8;     // n8 blocks of a 64-key x D product (dv, dk^)
  constexpr int kQS = kBM / 16;  // query slices: the K dimension of dv and dk^
  constexpr int kPanels = D / sm90::kPanelCols;
  constexpr uint32_t kKVBytes = kBN * D * 2, kQBytes = kBM * D * 2, kDsBytes = kBN * kBM * 2;
  constexpr uint32_t kConsumerWarps = C::kConsumers * 4;
  using MmaS = sm90::Wgmma<kBM, T>;  // S^T, dP^T
  using MmaKV = sm90::Wgmma<D, T>;   // dv, dk^

  unsigned char* smem = sm90::align_to_panel_group(smem_raw);
  unsigned char* sK = smem;                       // kPanels panels of kBN lines
  unsigned char* sV = sK + kKVBytes;              // likewise
  unsigned char* sQ = sV + kKVBytes;              // [kStages] kPanels panels of kBM lines
  unsigned char* sdO = sQ + kStages * kQBytes;    // likewise
  unsigned char* sdS = sdO + kStages * kQBytes;   // [2] dS^T: kBN lines (keys) of kBM queries
  unsigned char* sDq = sdS + 2 * kDsBytes;        // [kConsumers] dq^ staging panels
  float* sLseShift = reinterpret_cast<float*>(sDq + C::kConsumers * kBM * kDqStageRowBytes);  // [kStages][kBM]
  float* sDelta = sLseShift + kStages * kBM;                         // [kStages][kBM]
  const uint32_t kv_full = smem_addr(sDelta + kStages * kBM);        // then the mbarriers, 8 bytes each
  const auto q_full = [&](int st) { return kv_full + 8u * uint32_t(1 + st); };
  const auto q_empty = [&](int st) { return kv_full + 8u * uint32_t(1 + kStages + st); };
  const auto q_stage = [&](int st) { return smem_addr(sQ) + uint32_t(st) * kQBytes; };
  const auto do_stage = [&](int st) { return smem_addr(sdO) + uint32_t(st) * kQBytes; };

  const KeyTileBlock<T> blk = key_tile_block<T, D, kBN, kBM>(a);
  const int64_t bh = blk.bh, n0 = blk.n0;
  const int n_tiles = blk.n_mtiles;
  const auto m0_of = [&](int it) { return (blk.m_first + it) * kBM; };
  const int wg = int(threadIdx.x) / sm90::kWarpgroupThreads;
  const int warp = (int(threadIdx.x) % sm90::kWarpgroupThreads) / kWarpSize;  // in the warpgroup
  const int lane = int(threadIdx.x) % kWarpSize;

  if (threadIdx.x == 0) {
    sm90::mbar_init(kv_full, 1);
    for (int st = 0; st < kStages; ++st) {
      sm90::mbar_init(q_full(st), 1 + C::kStatsThreads);  // the TMA thread's arrive_expect_tx + the stats lanes
      sm90::mbar_init(q_empty(st), kConsumerWarps);      // one arrival per consumer warp
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();  // the last block-wide barrier: the producer's idle warps leave below

  if (wg == 0) {
    sm90::decrease_max_registers<C::kProducerRegs>();
    if (warp == 0 && lane == 0) {
      sm90::prefetch_tensor_map(&maps.q);
      sm90::prefetch_tensor_map(&maps.dout);
      const int b = int(blk.b), h = int(blk.h), bhi = int(bh);
      sm90::mbar_arrive_expect_tx(kv_full, 2 * kKVBytes);
      for (int p = 0; p < kPanels; ++p) {
        sm90::tma_load_3d(smem_addr(sK) + p * kBN * 128, &maps.k, kv_full, 64 * p, int(n0), bhi);
        sm90::tma_load_4d(smem_addr(sV) + p * kBN * 128, &maps.v, kv_full, 64 * p, int(n0), h, b);
      }
      for (int it = 0; it < n_tiles; ++it) {
        const int st = it % kStages, m0 = int(m0_of(it));
        sm90::mbar_wait(q_empty(st), ((it / kStages) & 1) ^ 1);  // the stage's previous use is released
        sm90::mbar_arrive_expect_tx(q_full(st), 2 * kQBytes);
        for (int p = 0; p < kPanels; ++p) {
          sm90::tma_load_3d(q_stage(st) + p * kBM * 128, &maps.q, q_full(st), 64 * p, m0, bhi);
          sm90::tma_load_4d(do_stage(st) + p * kBM * 128, &maps.dout, q_full(st), 64 * p, m0, h, b);
        }
      }
    } else if (warp == 1) {
      for (int it = 0; it < n_tiles; ++it) {
        const int st = it % kStages;
        sm90::mbar_wait(q_empty(st), ((it / kStages) & 1) ^ 1);
        load_row_stats<kBM>(sLseShift + st * kBM, sDelta + st * kBM, a, bh, m0_of(it), lane, C::kStatsThreads);
        sm90::mbar_arrive(q_full(st));  // releases this lane's stores to the consumers
      }
    }
    return;
  }

  sm90::increase_max_registers<C::kConsumerRegs>();
  const int cw = wg - 1;  // consumer warpgroup: keys n0 + 64 cw ..
  const int g = lane >> 2, t = lane & 3;
  const int key_row = 64 * cw + 16 * warp + g;  // the thread's first key within the block (C row g; + 8: row g + 8)
  const int64_t key_lo = n0 + key_row;
  // This warpgroup's 64 rows inside each k^ / v panel (kBN lines of 128 bytes).
  const uint32_t k_rows = smem_addr(sK) + uint32_t(cw) * 64u * 128u;
  const uint32_t v_rows = smem_addr(sV) + uint32_t(cw) * 64u * 128u;
  constexpr unsigned kDsBarrier = 1, kConsumerThreads = C::kConsumers * sm90::kWarpgroupThreads;

  float acc_dv[kDT * 4], acc_dk[kDT * 4];
#pragma unroll
  for (int i = 0; i < kDT * 4; ++i) acc_dv[i] = acc_dk[i] = 0.f;

  // dq^[m0 .. m0 + 64)[panel p] += acc (this warpgroup's 64 x 64 fp32
  // accumulators): into the staging panel, then warp 0 adds each row inside
  // the sequence with one bulk reduction. Two warpgroup barriers: the staging
  // panel's previous reductions have read it (warp 0 waited), and every row
  // is in it (and visible to the async proxy) before they are issued.
  unsigned char* dq_stage = sDq + cw * kBM * kDqStageRowBytes;
  const unsigned stage_barrier = 2u + unsigned(cw);
  const auto add_dq_panel = [&](int64_t m0, int p, const float (&acc)[32]) {
    if (warp == 0) sm90::bulk_wait_read<0>();
    sm90::named_barrier_sync(stage_barrier, sm90::kWarpgroupThreads);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t row = uint32_t(16 * warp + g + 8 * r);
#pragma unroll
      for (int j = 0; j < sm90::kPanelCols / 8; ++j)
        sm90::store_for_async_proxy(dq_stage + row * kDqStageRowBytes + (8 * j + 2 * t) * 4,
                                    make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]));
    }
    sm90::fence_proxy_async_shared();  // [mut:ws-bwd-dq-fence]
    sm90::named_barrier_sync(stage_barrier, sm90::kWarpgroupThreads);
    if (warp == 0) {
      for (int row = lane; row < kBM; row += kWarpSize) {
        if (m0 + row >= a.seq) break;
        sm90::bulk_reduce_add_f32(a.dq_hat + (bh * a.seq + m0 + row) * D + p * sm90::kPanelCols,
                                  smem_addr(dq_stage + row * kDqStageRowBytes), sm90::kPanelCols * 4);
      }
      sm90::bulk_commit();
    }
  };

  sm90::mbar_wait(kv_full, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int st = it % kStages;
    const int64_t m0 = m0_of(it);
    const uint32_t q_base = q_stage(st), do_base = do_stage(st);
    sm90::mbar_wait(q_full(st), (it / kStages) & 1);

    // S^T = k^_w q^T and dP^T = v_w dO^T (D / 16 k-slices, 4 per panel), one batch.
    float st_acc[kMT * 4], dpt[kMT * 4];
    sm90::wgmma_fence();
    issue_ss_k_major<MmaS, D>(st_acc, k_rows, kBN * 128, q_base, kBM * 128);
    issue_ss_k_major<MmaS, D>(dpt, v_rows, kBN * 128, do_base, kBM * 128);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(st_acc);
    sm90::fence_operands(dpt);

    const bool need_mask = n0 + kBN > a.seq || (a.causal && n0 + kBN - 1 > m0);
    sm90_bwd_probs<kMT>(st_acc, dpt, sLseShift + st * kBM, sDelta + st * kBM, a, key_lo, m0, need_mask, t);
    uint32_t pa[kQS][4], dsa[kQS][4];  // query slice kk's A registers (n8 blocks 2kk, 2kk+1)
    pack_a_slices<T>(st_acc, pa);
    pack_a_slices<T>(dpt, dsa);
    unsigned char* ds_panel = sdS + (it & 1) * kDsBytes;
    if constexpr (ATOMIC_DQ) store_ds_t<kQS>(ds_panel, dsa, key_row, t);

    // dv_w += P^T dO and dk^_w += dS^T q^: K = the tile's queries, B stored [query][dim] (MN-major).
    sm90::wgmma_fence_after(pa, dsa, acc_dv, acc_dk);
    issue_rs_mn_major<MmaKV>(acc_dv, pa, do_base, kBM * 128);
    issue_rs_mn_major<MmaKV>(acc_dk, dsa, q_base, kBM * 128);
    sm90::wgmma_commit();

    if constexpr (ATOMIC_DQ) {
      // Both halves of this step's dS^T are in the panel. The panel written
      // next step is the other one, which every consumer finished reading
      // before it arrived here (its dq^ products of step it - 1 were waited for).
      sm90::named_barrier_sync(kDsBarrier, kConsumerThreads);  // [mut:ws-bwd-ds-barrier]
      sm90_bwd_dq<T, D, kBN, C::kConsumers>(smem_addr(ds_panel), smem_addr(sK), it, cw,
                                            [&](int p, const float (&acc)[32]) { add_dq_panel(m0, p, acc); });
    }
    sm90::wgmma_wait<0>();  // dv, dk^ of this tile: pa, dsa and the stage are free [mut:ws-bwd-wait-dv]
    sm90::fence_operands(acc_dv);
    sm90::fence_operands(acc_dk);
    sm90::fence_operands(pa);
    sm90::fence_operands(dsa);
    // One arrival per warp (the barrier counts warps): every lane's ordinary
    // loads of the stage's lse shift and delta are ordered before lane 0 frees it.
    __syncwarp();  // [mut:ws-bwd-q-release]
    if (lane == 0) sm90::mbar_arrive(q_empty(st));
  }

  if constexpr (ATOMIC_DQ) {
    if (warp == 0) sm90::bulk_wait<0>();  // the dq^ reductions are done before the block exits
  }
  store_key_grads<T, D>(a, blk, key_lo, t, [&](int i, int e) { return acc_dv[4 * i + e]; },
                        [&](int i, int e) { return acc_dk[4 * i + e]; });
}

}  // namespace cogkern::flash
