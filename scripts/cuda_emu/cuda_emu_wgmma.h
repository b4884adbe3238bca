// Emulated wgmma (csrc/common/cuda/ptx_sm90_wgmma.cuh), implemented from the PTX ISA's
// descriptor and fragment definitions and CUTLASS's canonical GMMA layouts:
//   K-major, 128-byte swizzle:  ((8,n),2) : ((8,SBO),1)          in 16-byte units
//   MN-major, 128-byte swizzle: ((8,n),(8,k)) : ((1,LBO),(8,SBO))  in 16-byte units
// with the swizzle applied to the absolute shared address (bits [4,7) ^= bits
// [7,10)). Like the hardware, an issued wgmma runs asynchronously: it is queued
// per thread and performed only when wgmma_wait retires its commit group, so a
// kernel that reads accumulators (or overwrites operands) before waiting
// reads stale values here too. A-from-registers is captured at issue.
// What PTX calls undefined fails here: a wgmma issued with no wgmma.fence
// since the thread's last wait_group (this emulator's rule, kept by every
// kernel: the fence orders earlier register writes before the wgmma reads
// them), and A registers or accumulators written between issue and the
// wait_group that retires the wgmma.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <type_traits>
#include <vector>

#include "cuda_emu_ptx.h"

namespace cuda_emu {

template <typename T>
constexpr bool is_bf16() {
  return std::is_same_v<T, __nv_bfloat16>;
}

inline WarpGroup& my_warpgroup() {
  if (g_block->warpgroups.empty()) {
    std::fprintf(stderr, "cuda_emu: wgmma in a block that is not whole warpgroups\n");
    std::abort();
  }
  return *g_block->warpgroups[tl_tid / 128];
}

struct WgmmaOp {
  float* d;
  int n;
  bool bf16;
  bool a_in_regs;
  std::vector<uint32_t> a_regs;  // all 128 threads' A registers (4 each), when a_in_regs
  uint64_t desc_a, desc_b;
  bool trans_a, trans_b, accumulate;
  const uint32_t* a_src;  // this thread's A registers, to check they are left alone until the wait
};
inline thread_local AsyncGroups<WgmmaOp> tl_wgmma;
inline thread_local bool tl_wgmma_fenced = false;  // a wgmma.fence since this thread's last wait_group
inline thread_local size_t tl_wgmma_issued = 0;     // wgmmas this thread has issued
// The accumulators of issued, not yet performed wgmmas, as they were at issue.
inline thread_local std::map<const float*, std::vector<float>> tl_wgmma_acc_at_issue;

[[noreturn]] inline void wgmma_fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: thread %u: %s\n", tl_tid, what);
  std::abort();
}

struct SmemDesc {
  uint32_t start, lbo, sbo;
};
inline SmemDesc decode_desc(uint64_t desc) {
  if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
    std::fprintf(stderr, "cuda_emu: wgmma descriptor 0x%016llx: only the 128-byte swizzle, base offset 0, is emulated\n",
                 static_cast<unsigned long long>(desc));
    std::abort();
  }
  const SmemDesc s{uint32_t(desc & 0x3FFF) << 4, uint32_t((desc >> 16) & 0x3FFF) << 4, uint32_t((desc >> 32) & 0x3FFF) << 4};
  // Base offset 0 says the 8-row swizzle pattern starts on a 1024-byte boundary
  // (PTX, matrix descriptor): the start may step within a row (k-slices), not across rows.
  if ((s.start >> 7) & 7) {
    std::fprintf(stderr, "cuda_emu: wgmma descriptor start 0x%x is not in the first 128-byte row of a 1024-byte "
                 "swizzle group (base offset 0)\n", s.start);
    std::abort();
  }
  return s;
}
inline uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// Shared address of element (row r of the M/N side, k of the 16-wide K slice) of a K-major operand.
inline uint32_t k_major_addr(const SmemDesc& s, int r, int k) {
  return swizzle128(s.start + uint32_t(r % 8) * 128u + uint32_t(r / 8) * s.sbo + uint32_t(k / 8) * 16u +
                    uint32_t(k % 8) * 2u);
}
// Shared address of element (m of the M/N side, k of the K slice) of an MN-major operand.
inline uint32_t mn_major_addr(const SmemDesc& s, int m, int k) {
  return swizzle128(s.start + uint32_t(m / 64) * s.lbo + uint32_t((m / 8) % 8) * 16u + uint32_t(m % 8) * 2u +
                    uint32_t(k % 8) * 128u + uint32_t(k / 8) * s.sbo);
}
inline float k_major_elem(const SmemDesc& s, int r, int k, bool bf16) {
  return half_bits_to_float(smem_u16(k_major_addr(s, r, k)), bf16);
}
inline float mn_major_elem(const SmemDesc& s, int m, int k, bool bf16) {
  return half_bits_to_float(smem_u16(mn_major_addr(s, m, k)), bf16);
}
// The tensor cores read through the async proxy: every element an operand
// descriptor covers must be clear of unfenced ordinary stores (cuda_emu_ptx.h).
inline void check_operand_proxy(uint64_t desc, int rows, bool mn_major) {
  const SmemDesc s = decode_desc(desc);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) check_async_read(mn_major ? mn_major_addr(s, r, k) : k_major_addr(s, r, k), 2, "wgmma");
}

inline void wgmma_issue(float* d, int n, bool bf16, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b,
                        bool trans_a, bool trans_b, bool accumulate) {
  if (!tl_wgmma_fenced) wgmma_fail("wgmma issued without a wgmma.fence since the thread's last wait_group");
  {  // .sync.aligned: the warpgroup's threads issue the same wgmmas in the same order
    WarpGroup& wg = my_warpgroup();
    const std::array<uint64_t, 4> what{desc_a, desc_b, uint64_t(n) | uint64_t(bf16) << 16 | uint64_t(a_regs != nullptr) << 17,
                                       uint64_t(trans_a) | uint64_t(trans_b) << 1 | uint64_t(accumulate) << 2};
    const std::lock_guard<std::mutex> lock(wg.issue_mu);
    const size_t i = tl_wgmma_issued++;
    if (i == wg.issues.size())
      wg.issues.push_back(what);
    else if (wg.issues[i] != what)
      wgmma_fail("the threads of a warpgroup issued different wgmmas (wgmma.mma_async is .sync.aligned)");
  }
  WgmmaOp op{d, n, bf16, a_regs != nullptr, {}, desc_a, desc_b, trans_a, trans_b, accumulate, a_regs};
  if (!tl_wgmma_acc_at_issue.count(d)) tl_wgmma_acc_at_issue[d] = std::vector<float>(d, d + n / 2);
  if (a_regs != nullptr) {  // gather the warpgroup's A registers now (the collective reads them at issue)
    WarpGroup& wg = my_warpgroup();
    const int t = int(tl_tid % 128);
    std::memcpy(wg.slot[t], a_regs, 16);
    wg.bar.arrive_and_wait();
    op.a_regs.resize(128 * 4);
    for (int i = 0; i < 128; ++i) std::memcpy(&op.a_regs[4 * i], wg.slot[i], 16);
    wg.bar.arrive_and_wait();
  }
  tl_wgmma.open.push_back(std::move(op));
}

inline void wgmma_perform(const WgmmaOp& op) {
  const int t = int(tl_tid % 128), w = t / 32, g = (t % 32) / 4, q = t % 4;
  if (op.a_in_regs && std::memcmp(op.a_src, &op.a_regs[4 * t], 16) != 0)
    wgmma_fail("A registers of a wgmma written before the wait_group that retires it");
  if (t == 0) {  // one thread per warpgroup checks what the collective reads
    if (!op.a_in_regs) check_operand_proxy(op.desc_a, 64, op.trans_a);
    check_operand_proxy(op.desc_b, op.n, op.trans_b);
  }
  if (auto it = tl_wgmma_acc_at_issue.find(op.d); it != tl_wgmma_acc_at_issue.end()) {
    if (std::memcmp(op.d, it->second.data(), it->second.size() * sizeof(float)) != 0)
      wgmma_fail("accumulators of a wgmma written before the wait_group that retires it");
    tl_wgmma_acc_at_issue.erase(it);
  }
  float A[64][16];
  if (op.a_in_regs) {
    for (int i = 0; i < 128; ++i) {
      const int wi = i / 32, gi = (i % 32) / 4, qi = i % 4;
      const uint32_t* r = &op.a_regs[4 * i];
      const int rows[4] = {16 * wi + gi, 16 * wi + gi + 8, 16 * wi + gi, 16 * wi + gi + 8};
      const int cols[4] = {2 * qi, 2 * qi, 2 * qi + 8, 2 * qi + 8};
      for (int e = 0; e < 4; ++e) {
        A[rows[e]][cols[e]] = half_bits_to_float(uint16_t(r[e] & 0xFFFF), op.bf16);
        A[rows[e]][cols[e] + 1] = half_bits_to_float(uint16_t(r[e] >> 16), op.bf16);
      }
    }
  } else {
    const SmemDesc sa = decode_desc(op.desc_a);
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = op.trans_a ? mn_major_elem(sa, m, k, op.bf16) : k_major_elem(sa, m, k, op.bf16);
  }
  const SmemDesc sb = decode_desc(op.desc_b);
  for (int j = 0; j < op.n / 8; ++j) {
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * q + (e % 2);
      float acc = op.accumulate ? op.d[4 * j + e] : 0.0f;
      for (int k = 0; k < 16; ++k) {
        const float b = op.trans_b ? mn_major_elem(sb, col, k, op.bf16) : k_major_elem(sb, col, k, op.bf16);
        acc = std::fma(A[row][k], b, acc);
      }
      op.d[4 * j + e] = acc;
    }
  }
}

inline void wgmma_fence() { tl_wgmma_fenced = true; }
inline void wgmma_commit() { tl_wgmma.commit(); }
inline void wgmma_wait(int n) {
  tl_wgmma.retire(size_t(n), [](const WgmmaOp& op) { wgmma_perform(op); });
  tl_wgmma_fenced = false;
  // wgmma.wait_group is .sync.aligned: the warp leaves it together, so after
  // it any lane may tell other groups that the warp's operand reads are done.
  my_warp().bar.arrive_and_wait();
}

}  // namespace cuda_emu
