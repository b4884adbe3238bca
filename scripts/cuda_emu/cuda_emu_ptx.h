// Emulated PTX wrappers of csrc/common/cuda/ptx_sm80.cuh (ldmatrix, mma.sync,
// cp.async, ex2), implemented from the PTX ISA's fragment definitions with
// the warp exchange of cuda_emu_prelude.h. The kernels reach them through
// csrc/common/cuda/device_seam.h (cuda_emu_device.h: the same names).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace cuda_emu {

// Shared-memory "addresses" are byte offsets into the block's dynamic shared
// memory, plus kSmemBase (cuda_emu_prelude.h).
inline uint32_t smem_addr(const void* p) {
  return uint32_t(static_cast<const unsigned char*>(p) - dynamic_smem()) + kSmemBase;
}

inline void check_smem(uint32_t addr, size_t bytes);
inline uint16_t smem_u16(uint32_t addr) {
  check_smem(addr, 2);
  uint16_t v;
  std::memcpy(&v, smem_at(addr), 2);
  return v;
}

// ldmatrix.x4: lanes 8i..8i+7 give the 8 row addresses of matrix i; lane 4g+t
// receives (row g, cols 2t, 2t+1) of each matrix, or with .trans (rows 2t,
// 2t+1, col g).
inline void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  auto& w = my_warp();
  const int lane = my_lane();
  std::memcpy(w.slot[lane], &addr, 4);
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    uint32_t a_lo, a_hi;
    if (!trans) {
      uint32_t row;
      std::memcpy(&row, w.slot[8 * i + g], 4);
      a_lo = row + 4 * t;
      a_hi = a_lo + 2;
    } else {
      uint32_t row0, row1;
      std::memcpy(&row0, w.slot[8 * i + 2 * t], 4);
      std::memcpy(&row1, w.slot[8 * i + 2 * t + 1], 4);
      a_lo = row0 + 2 * g;
      a_hi = row1 + 2 * g;
    }
    if (a_lo % 2 || a_hi % 2) std::abort();
    r[i] = uint32_t(smem_u16(a_lo)) | (uint32_t(smem_u16(a_hi)) << 16);
  }
  w.bar.arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  if (addr % 16) std::abort();  // ldmatrix rows are 16-byte aligned
  ldmatrix_impl(r, addr, false);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  if (addr % 16) std::abort();
  ldmatrix_impl(r, addr, true);
}

inline float half_bits_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}

// mma.sync.m16n8k16.row.col.f32.{f16,bf16}: gathers the warp's A (16x16),
// B (16x8) and C fragments, each lane computes its own D elements.
struct MmaSlot {
  uint32_t a[4], b[2];
};
inline void mma_impl(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  auto& w = my_warp();
  const int lane = my_lane();
  MmaSlot mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(w.slot[lane], &mine, sizeof(MmaSlot));
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaSlot s;
    std::memcpy(&s, w.slot[l], sizeof(MmaSlot));
    const int g = l / 4, t = l % 4;
    auto lo = [&](uint32_t v) { return half_bits_to_float(uint16_t(v & 0xffff), bf16); };
    auto hi = [&](uint32_t v) { return half_bits_to_float(uint16_t(v >> 16), bf16); };
    A[g][2 * t] = lo(s.a[0]);
    A[g][2 * t + 1] = hi(s.a[0]);
    A[g + 8][2 * t] = lo(s.a[1]);
    A[g + 8][2 * t + 1] = hi(s.a[1]);
    A[g][2 * t + 8] = lo(s.a[2]);
    A[g][2 * t + 9] = hi(s.a[2]);
    A[g + 8][2 * t + 8] = lo(s.a[3]);
    A[g + 8][2 * t + 9] = hi(s.a[3]);
    B[2 * t][g] = lo(s.b[0]);
    B[2 * t + 1][g] = hi(s.b[0]);
    B[2 * t + 8][g] = lo(s.b[1]);
    B[2 * t + 9][g] = hi(s.b[1]);
  }
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int e = 0; e < 4; ++e) {
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[rows[e]][k], B[k][cols[e]], acc);
    d[e] = acc;
  }
}

template <typename T>
struct ElemTraits;
template <>
struct ElemTraits<__half> {
  static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    std::memcpy(&u, &h, 4);
    return u;
  }
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { mma_impl(d, a, b0, b1, false); }
};
template <>
struct ElemTraits<__nv_bfloat16> {
  static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    std::memcpy(&u, &h, 4);
    return u;
  }
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { mma_impl(d, a, b0, b1, true); }
};

// cp.async: each thread's copies are queued per commit group and performed
// only when cp.async.wait_group retires the group (the latest completion the
// PTX ISA allows), so a read of a tile before its wait sees stale data. Under
// the laggard schedule they land at issue instead (the earliest), like TMA
// copies: a buffer refilled while another group still reads it shows.
struct AsyncCopy {
  uint32_t dst;
  const void* src;
  bool valid;
};
inline void note_generic_store(uint32_t addr, uint32_t bytes);
inline void perform_copy(const AsyncCopy& c) {
  if (c.valid)
    std::memcpy(smem_at(c.dst), c.src, 16);
  else
    std::memset(smem_at(c.dst), 0, 16);
  note_generic_store(c.dst, 16);  // cp.async writes through the generic proxy
}
inline thread_local AsyncGroups<AsyncCopy> tl_cp_async;

inline void check_smem(uint32_t addr, size_t bytes) {
  if (addr < kSmemBase || addr - kSmemBase + bytes > g_block->dyn_smem.size() - 16) {
    std::fprintf(stderr, "cuda_emu: shared memory access [%u, %zu) out of bounds\n", addr, addr + bytes);
    std::abort();
  }
}

// ---- Proxies ----------------------------------------------------------------------
// The tensor cores (wgmma) and the copy engine (TMA, bulk reductions) reach
// shared memory through the async proxy; ordinary stores and cp.async go
// through the generic one. Data written through the generic proxy and read
// through the async one needs fence.proxy.async by the writing thread before
// the synchronization that hands it over. The kernels mark such stores
// (sm90::store_for_async_proxy; cp.async landings are marked here), each
// thread's fence clears its own marks, and an async-proxy read of a marked
// byte fails.
constexpr uint16_t kCleanByte = 0xFFFF;
inline thread_local std::vector<std::pair<uint32_t, uint32_t>> tl_generic_stores;  // (address, bytes), unfenced
inline std::atomic<uint16_t>& smem_writer_at(uint32_t addr) { return g_block->smem_writer[addr - kSmemBase]; }
inline void note_generic_store(uint32_t addr, uint32_t bytes) {
  check_smem(addr, bytes);
  for (uint32_t b = 0; b < bytes; ++b) smem_writer_at(addr + b).store(uint16_t(tl_tid), std::memory_order_relaxed);
  tl_generic_stores.emplace_back(addr, bytes);
}
inline void fence_proxy_async() {
  for (const auto& [addr, bytes] : tl_generic_stores)
    for (uint32_t b = 0; b < bytes; ++b) {
      uint16_t mine = uint16_t(tl_tid);
      smem_writer_at(addr + b).compare_exchange_strong(mine, kCleanByte, std::memory_order_relaxed);
    }
  tl_generic_stores.clear();
}
inline void check_async_read(uint32_t addr, uint32_t bytes, const char* reader) {
  for (uint32_t b = 0; b < bytes; ++b) {
    const uint16_t w = smem_writer_at(addr + b).load(std::memory_order_relaxed);
    if (w != kCleanByte) {
      std::fprintf(stderr,
                   "cuda_emu: thread %u: %s reads shared address %u, which thread %u wrote with an ordinary store "
                   "(or cp.async) and has not fenced (fence.proxy.async) since\n",
                   tl_tid, reader, addr + b, unsigned(w));
      std::abort();
    }
  }
}
// An async-proxy write (a TMA landing): the bytes are no generic store's any more.
inline void note_async_write(uint32_t addr, uint32_t bytes) {
  for (uint32_t b = 0; b < bytes; ++b) smem_writer_at(addr + b).store(kCleanByte, std::memory_order_relaxed);
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  if (dst % 16 || reinterpret_cast<uintptr_t>(src) % 16) std::abort();  // cp.async 16 needs 16-byte alignment
  check_smem(dst, 16);
  if (laggard_schedule())
    perform_copy({dst, src, valid});
  else
    tl_cp_async.open.push_back({dst, src, valid});
}
inline void cp_async_commit() { tl_cp_async.commit(); }
template <int N>
inline void cp_async_wait() {
  tl_cp_async.retire(N, perform_copy);
}

inline float fast_exp2(float x) { return std::exp2(x); }
inline int opaque_lane(int lane) { return lane; }

}  // namespace cuda_emu
