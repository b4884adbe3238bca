// Flash-attention forward on Hopper, warp-specialized (FlashAttention-3's
// structure): the same algorithm, inputs and outputs as the wgmma forward of
// flash_fwd_sm90_kernel.cuh, with the loads taken off the math warps.
//   - Producer warpgroup: one thread streams q^ (once) and the k^ / v key
//     tiles through TMA into kStages-deep rings of 128-byte-swizzled panels,
//     each stage with a "full" mbarrier (the tile's bytes have landed) and an
//     "empty" one (every consumer warp is done reading it). It gives its
//     registers away (setmaxnreg) to the consumers.
//   - Consumer warpgroups (three at D = 64, two at D = 128), 64 query rows
//     each: S = q^ k_j^T and O += P_{j-1} V_{j-1} issued together, the softmax
//     of tile j running
//     while P_{j-1} V_{j-1} is on the tensor cores (the pipelined schedule of
//     flash_fwd_sm90_kernel.cuh). No block-wide barrier after the set-up: a
//     consumer waits only for the tiles it needs, and the stage it has
//     finished goes back to the producer at once.
//   - PINGPONG (FA3's inter-warpgroup overlap): the consumers take turns to
//     issue their products (named barriers pass the turn round-robin), so one
//     warpgroup's softmax runs while another's products occupy the tensor
//     cores, instead of all contending for them and then all idling them.
// Grid: one block per (batch * head, 64 * consumers query rows). Opt-in
// (COGKERN_ATTENTION_SM90=3, or 4 with PINGPONG; flash_fwd_sm90_launch.cu) until it
// has run on a GPU.
// Checked on the CPU by the emulator, whose TMA copies land as late as the
// mbarrier allows (or, under the laggard schedule, at once).
#pragma once

#include "attention/flash/sm90/flash_fwd_sm90_kernel.cuh"
#include "common/cuda/device_seam.h"

namespace cogkern::flash {

// FlashAttention-3's tile shapes: key tiles of 128; 192 query rows (three
// consumer warpgroups of 160 registers) at D = 64, so that each k^ / v tile
// serves 1.5x the rows (at D = 64 the L2 -> shared-memory traffic, not the
// math, is what 128-row tiles would run into), 128 rows (two of 240) at D = 128.
template <int CONSUMERS>
struct Sm90WsFwdTiles {
  static constexpr int kConsumers = CONSUMERS;  // warpgroups of 64 query rows
  static constexpr int kBM = 64 * kConsumers;
  static constexpr int kBN = 128;  // keys per tile
  static constexpr int kStages = 2;
  static constexpr int kThreads = (kConsumers + 1) * sm90::kWarpgroupThreads;
  // Registers per thread after setmaxnreg: the block starts with 65536 /
  // threads each (168 for 384, 128 for 512; ptxas allocates each side's code
  // within its new limit); the producer gives its spare ones to the
  // consumers: 128 * 24 + 256 * 240 = 384 * 168, 128 * 32 + 384 * 160 = 512 * 128.
  static constexpr int kProducerRegs = kConsumers == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static_assert(CONSUMERS == 2 || CONSUMERS == 3, "register budgets are set for 2 or 3 consumer warpgroups");
};
// One specialization per head dim of common/dispatch.h (an unlisted one fails to compile).
template <int D>
struct Sm90WsFwdConfig;
template <>
struct Sm90WsFwdConfig<64> : Sm90WsFwdTiles<3> {};
template <>
struct Sm90WsFwdConfig<128> : Sm90WsFwdTiles<2> {};

// The TMA descriptors the producer loads through: q^ and k^ as
// [batch * heads][seq][D] (3-D), v as its [batch][seq][heads][D] view (4-D).
struct Sm90FwdMaps {
  CUtensorMap q, k, v;
};

// Dynamic shared memory: the q^ tile, kStages of k^ and of v, the mbarriers,
// and 1024 bytes of alignment slack.
template <int D>
constexpr size_t sm90_ws_fwd_smem_bytes() {
  using C = Sm90WsFwdConfig<D>;
  return size_t(C::kBM + 2 * C::kStages * C::kBN) * D * 2 + 8 * (1 + 4 * C::kStages) + sm90::kPanelGroupBytes;
}

// Host side: the maps for a's tensors; false when the driver refuses one.
template <int D>
inline bool make_sm90_fwd_maps(const FlashArgs& a, Sm90FwdMaps* maps) {
  using C = Sm90WsFwdConfig<D>;
  return make_head_rows_map<D>(&maps->q, a.q_hat, a, C::kBM) && make_head_rows_map<D>(&maps->k, a.k_hat, a, C::kBN) &&
         make_bshd_map<D>(&maps->v, a.v, a, C::kBN);
}

template <typename T, int D, bool PINGPONG>
__device__ __forceinline__ void flash_fwd_sm90_ws_body(const FlashArgs& a, const Sm90FwdMaps& maps,
                                                       unsigned char* smem_raw) {
  using C = Sm90WsFwdConfig<D>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kStages = C::kStages;
  constexpr int kNT = kBN / 8;   // n8 score blocks per key tile
  constexpr int kKS = kBN / 16;  // key slices of P V
  constexpr int kPanels = D / sm90::kPanelCols;
  constexpr uint32_t kQBytes = kBM * D * 2, kKVBytes = kBN * D * 2;
  constexpr uint32_t kConsumerWarps = C::kConsumers * 4;
  using Mma = sm90::Wgmma<kBN, T>;
  using MmaPV = sm90::Wgmma<D, T>;

  const uint32_t sQ = smem_addr(sm90::align_to_panel_group(smem_raw));  // kPanels panels of kBM lines
  const uint32_t sK = sQ + kQBytes;                                      // [kStages] kPanels panels of kBN lines
  const uint32_t sV = sK + kStages * kKVBytes;                           // likewise
  const uint32_t q_full = sV + kStages * kKVBytes;                       // then the mbarriers, 8 bytes each
  const auto k_full = [&](int st) { return q_full + 8u * uint32_t(1 + st); };
  const auto k_empty = [&](int st) { return q_full + 8u * uint32_t(1 + kStages + st); };
  const auto v_full = [&](int st) { return q_full + 8u * uint32_t(1 + 2 * kStages + st); };
  const auto v_empty = [&](int st) { return q_full + 8u * uint32_t(1 + 3 * kStages + st); };
  const auto k_stage = [&](int st) { return sK + uint32_t(st) * kKVBytes; };
  const auto v_stage = [&](int st) { return sV + uint32_t(st) * kKVBytes; };

  const QueryTileBlock<T, D> blk = query_tile_block<T, D, kBM>(a);
  const int n_tiles = int(ceil_div(blk.kv_end, kBN));
  const int wg = int(threadIdx.x) / sm90::kWarpgroupThreads;

  if (threadIdx.x == 0) {
    sm90::mbar_init(q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      sm90::mbar_init(k_full(st), 1);  // the producer's arrive_expect_tx; the bytes do the rest
      sm90::mbar_init(v_full(st), 1);
      sm90::mbar_init(k_empty(st), kConsumerWarps);  // one arrival per consumer warp
      sm90::mbar_init(v_empty(st), kConsumerWarps);
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();  // the last block-wide barrier: the producer's idle warps leave below

  if (wg == 0) {
    sm90::decrease_max_registers<C::kProducerRegs>();
    if (threadIdx.x != 0) return;
    sm90::prefetch_tensor_map(&maps.q);
    sm90::prefetch_tensor_map(&maps.k);
    sm90::prefetch_tensor_map(&maps.v);
    const int bh = int(blk.bh), b = int(blk.b), h = int(blk.h);
    sm90::mbar_arrive_expect_tx(q_full, kQBytes);
    for (int p = 0; p < kPanels; ++p) sm90::tma_load_3d(sQ + p * kBM * 128, &maps.q, q_full, 64 * p, int(blk.m0), bh);
    for (int j = 0; j < n_tiles; ++j) {
      const int st = j % kStages;
      const uint32_t free_parity = ((j / kStages) & 1) ^ 1;  // the stage's previous use has been released
      const int n0 = j * kBN;
      sm90::mbar_wait(k_empty(st), free_parity);
      sm90::mbar_arrive_expect_tx(k_full(st), kKVBytes);
      for (int p = 0; p < kPanels; ++p)
        sm90::tma_load_3d(k_stage(st) + p * kBN * 128, &maps.k, k_full(st), 64 * p, n0, bh);
      sm90::mbar_wait(v_empty(st), free_parity);
      sm90::mbar_arrive_expect_tx(v_full(st), kKVBytes);
      for (int p = 0; p < kPanels; ++p)
        sm90::tma_load_4d(v_stage(st) + p * kBN * 128, &maps.v, v_full(st), 64 * p, n0, h, b);
    }
    return;
  }

  sm90::increase_max_registers<C::kConsumerRegs>();
  const int cw = wg - 1;  // consumer warpgroup: rows m0 + 64 cw ..
  const bool warp_leader = threadIdx.x % kWarpSize == 0;
  const float c = a.scale_log2;
  const uint32_t q_base = sQ + uint32_t(cw) * 64u * 128u;  // this warpgroup's 64 lines in each q^ panel
  Sm90RowSoftmax<T, D, kBN> sm(int(blk.m0) + 64 * cw);
  const auto full_parity = [](int j) { return uint32_t((j / kStages) & 1); };
  // The warp's wgmma reads of a stage are done (after the wait that retired them).
  const auto release = [&](uint32_t empty_bar) {
    if (warp_leader) sm90::mbar_arrive(empty_bar);
  };
  // PINGPONG: consumer cw issues when barrier 1 + cw completes (its 128
  // threads wait there, the previous consumer's 128 arrive), then hands the
  // turn to the next; the last consumer starts the round, and skips its
  // final hand-over (nobody takes it), so every barrier ends complete.
  constexpr unsigned kTurnThreads = 2 * sm90::kWarpgroupThreads;
  const auto my_turn = [&] {
    if constexpr (PINGPONG) sm90::named_barrier_sync(1u + unsigned(cw), kTurnThreads);
  };
  const auto pass_turn = [&](bool last) {
    if constexpr (PINGPONG) {
      if (!(last && cw == C::kConsumers - 1))
        sm90::named_barrier_arrive(1u + unsigned((cw + 1) % C::kConsumers), kTurnThreads);
    }
  };
  if constexpr (PINGPONG) {
    if (cw == C::kConsumers - 1) sm90::named_barrier_arrive(1u, kTurnThreads);
  }
  const auto issue_s = [&](float (&s)[kNT * 4], int st) {
    issue_ss_k_major<Mma, D>(s, q_base, kBM * 128, k_stage(st), kBN * 128);
    sm90::wgmma_commit();
  };
  const auto issue_pv = [&](const uint32_t (&pa)[kKS][4], int st) {
    issue_rs_mn_major<MmaPV>(sm.acc_o, pa, v_stage(st), kBN * 128);
    sm90::wgmma_commit();
  };

  float s[kNT * 4];
  uint32_t pa[kKS][4];
  sm90::mbar_wait(q_full, 0);
  sm90::mbar_wait(k_full(0), 0);
  my_turn();
  sm90::wgmma_fence();
  issue_s(s, 0);
  pass_turn(false);
  sm90::wgmma_wait<0>();
  sm90::fence_operands(s);
  release(k_empty(0));
  const int seq = int(a.seq);
  sm.step(s, 0, seq, a.causal, c);
  sm.rescale();
  pack_a_slices<T>(s, pa);
  for (int j = 1; j < n_tiles; ++j) {
    const int st = j % kStages, prev = (j - 1) % kStages;
    sm90::mbar_wait(k_full(st), full_parity(j));
    sm90::mbar_wait(v_full(prev), full_parity(j - 1));
    my_turn();
    sm90::wgmma_fence_after(sm.acc_o, pa);  // pa and the rescaled acc_o, before both batches [mut:ws-fwd-wgmma-fence]
    issue_s(s, st);
    issue_pv(pa, prev);
    pass_turn(false);
    sm90::wgmma_wait<1>();  // S of tile j has landed; P_{j-1} V_{j-1} may still run
    sm90::fence_operands(s);
    release(k_empty(st));
    sm.step(s, j * kBN, seq, a.causal, c);
    sm90::wgmma_wait<0>();  // now acc_o and pa are ours again [mut:ws-fwd-wait-pv]
    sm90::fence_operands(sm.acc_o);
    sm90::fence_operands(pa);
    release(v_empty(prev));  // [mut:ws-fwd-v-release]
    sm.rescale();
    pack_a_slices<T>(s, pa);
  }
  const int last = (n_tiles - 1) % kStages;
  sm90::mbar_wait(v_full(last), full_parity(n_tiles - 1));
  my_turn();
  sm90::wgmma_fence_after(sm.acc_o, pa);
  issue_pv(pa, last);
  pass_turn(true);
  sm90::wgmma_wait<0>();
  sm90::fence_operands(sm.acc_o);
  release(v_empty(last));
  sm.store(a, blk.b, blk.h, blk.bh);
}

}  // namespace cogkern::flash
