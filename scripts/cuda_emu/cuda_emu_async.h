// Emulated Hopper asynchronous-data-movement and synchronization PTX
// (csrc/common/cuda/ptx_sm90_async.cuh): mbarriers, TMA tile loads
// (cp.async.bulk.tensor) with their tensor maps, named barriers, setmaxnreg.
// Implemented from the PTX ISA and the driver's cuTensorMapEncodeTiled
// documentation:
//  - mbarrier: a phase completes when its pending arrival count reaches zero
//    and its transaction count (expect_tx bytes minus bytes landed) is zero;
//    then the pending count is reset. try_wait.parity(P) succeeds once the
//    phase of parity P has completed, i.e. while the current phase's parity
//    differs from P.
//  - TMA: a box of the tensor lands in shared memory dim 0 fastest, 128-byte
//    swizzled on the absolute shared address like wgmma reads it,
//    out-of-bounds elements zero; the box's full byte count completes on the
//    mbarrier. When it lands: see COGKERN_EMU_LAGGARD in cuda_emu_prelude.h.
//  - Tensor maps: cuTensorMapEncodeTiled's argument rules are checked (the
//    driver rejects the same), the map is kept in the CUtensorMap's 128 bytes.
// Waits that cannot complete abort after 60 s (a hang on the GPU).
#pragma once

#include <cuda.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cuda_emu_wgmma.h"  // swizzle128 (and cuda_emu_ptx.h)

namespace cuda_emu {

[[noreturn]] inline void async_fail(const char* what, uint32_t addr) {
  std::fprintf(stderr, "cuda_emu: block %u thread %u: %s (shared address %u)\n", unsigned(tl_block_idx.x), tl_tid, what,
               addr);
  std::abort();
}

// Blocks on the block's sync condition until done() holds; the caller holds
// `lock` and has counted itself as blocked.
template <typename Done>
inline void block_until(std::unique_lock<std::mutex>& lock, Done done, const char* what, uint32_t addr) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!done()) {
    if (g_block->sync_cv.wait_until(lock, deadline) == std::cv_status::timeout && !done()) async_fail(what, addr);
  }
}

// ---- mbarrier --------------------------------------------------------------
inline MBarrier& mbarrier_at(uint32_t addr) {
  auto it = g_block->mbarriers.find(addr);
  if (it == g_block->mbarriers.end()) async_fail("mbarrier used before mbarrier.init", addr);
  return it->second;
}

// With sync_mu held: completes the phase if nothing is missing; releases its
// waiters. With every arrival in and copies queued (late landing), wakes the
// waiters instead, which land them: without that wake-up a waiter that went to
// sleep before the last arrival or the copy slept until some other barrier
// moved, or until its 60 s deadline, and a waiter downstream of it could time out.
inline void mbarrier_try_complete(MBarrier& m) {
  if (m.pending == 0 && !m.copies.empty()) {
    g_block->sync_cv.notify_all();
    return;
  }
  if (m.pending != 0 || m.tx != 0) return;
  ++m.phase;
  m.pending = m.count;
  g_block->others_blocked.fetch_sub(m.others_waiting);
  m.others_waiting = 0;
  g_block->sync_cv.notify_all();
}

inline void mbar_init(uint32_t addr, uint32_t count) {
  if (addr % 8) async_fail("mbarrier not 8-byte aligned", addr);
  check_smem(addr, 8);
  if (count == 0) async_fail("mbarrier.init with count 0", addr);
  const std::lock_guard<std::mutex> lock(g_block->sync_mu);
  MBarrier& m = g_block->mbarriers[addr];
  m = MBarrier{};
  m.count = m.pending = count;
}

inline void mbar_arrive_impl(uint32_t addr, uint32_t tx_bytes) {
  const std::lock_guard<std::mutex> lock(g_block->sync_mu);
  MBarrier& m = mbarrier_at(addr);
  if (m.pending == 0) async_fail("mbarrier arrival beyond its count", addr);
  m.tx += long(tx_bytes);
  --m.pending;
  mbarrier_try_complete(m);
}
inline void mbar_arrive(uint32_t addr) { mbar_arrive_impl(addr, 0); }
inline void mbar_arrive_expect_tx(uint32_t addr, uint32_t bytes) { mbar_arrive_impl(addr, bytes); }

// With sync_mu held: lands the copies queued on m (late landing).
inline void mbarrier_land_copies(MBarrier& m) {
  auto copies = std::move(m.copies);
  m.copies.clear();
  for (auto& land : copies) m.tx -= land();
  mbarrier_try_complete(m);
}

inline void mbar_wait(uint32_t addr, uint32_t parity) {
  {
    std::unique_lock<std::mutex> lock(g_block->sync_mu);
    MBarrier& m = mbarrier_at(addr);
    const auto done = [&] { return (m.phase & 1u) != (parity & 1u); };
    // Late landing: the copies this phase expects land now, once every arrival is in.
    if (!done() && m.pending == 0 && !m.copies.empty()) mbarrier_land_copies(m);
    if (!done()) {
      if (laggard_schedule() && !is_laggard()) ++m.others_waiting;
      note_blocking();
      block_until(lock, [&] {
        if (!done() && m.pending == 0 && !m.copies.empty()) mbarrier_land_copies(m);
        return done();
      }, "mbarrier wait never completes (missing arrival, or fewer TMA bytes than expected)", addr);
    }
  }
  lag();  // COGKERN_EMU_LAGGARD
}

// ---- TMA ---------------------------------------------------------------------
// What cuTensorMapEncodeTiled recorded, kept inside the CUtensorMap.
struct EmuTensorMap {
  const unsigned char* base;
  uint32_t rank, elem_bytes, swizzle;
  uint64_t dims[5];
  uint64_t strides[5];  // bytes; strides[0] = elem_bytes
  uint32_t box[5];
};
static_assert(sizeof(EmuTensorMap) <= sizeof(CUtensorMap));

inline CUresult encode_tensor_map_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                                        const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                        const cuuint32_t* element_strides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
  const auto bad = [](const char* why) {
    std::fprintf(stderr, "cuda_emu: cuTensorMapEncodeTiled rejects the map: %s\n", why);
    return CUDA_ERROR_INVALID_VALUE;
  };
  uint32_t elem = 0;
  switch (type) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: case CU_TENSOR_MAP_DATA_TYPE_FLOAT16: case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16:
      elem = 2; break;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: elem = 4; break;
    default: return bad("data type not emulated");
  }
  if (reinterpret_cast<uintptr_t>(map) % 64) return bad("map not 64-byte aligned");
  if (rank < 1 || rank > 5) return bad("rank outside 1..5");
  if (reinterpret_cast<uintptr_t>(address) % 16) return bad("global address not 16-byte aligned");
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return bad("interleave not emulated");
  if (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B) return bad("swizzle not emulated");
  if (oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) return bad("NaN out-of-bounds fill not emulated");
  EmuTensorMap m{};
  m.base = static_cast<const unsigned char*>(address);
  m.rank = rank;
  m.elem_bytes = elem;
  m.swizzle = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : 0;
  m.strides[0] = elem;
  for (uint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32)) return bad("globalDim outside 1..2^32");
    if (box[i] == 0 || box[i] > 256) return bad("boxDim outside 1..256");
    if (element_strides[i] != 1) return bad("elementStrides other than 1 not emulated");
    m.dims[i] = dims[i];
    m.box[i] = box[i];
    if (i > 0) {
      const uint64_t st = strides[i - 1];
      if (st % 16 || st >= (uint64_t(1) << 40)) return bad("globalStrides not a multiple of 16 below 2^40");
      m.strides[i] = st;
    }
  }
  if ((box[0] * elem) % 16) return bad("boxDim[0] * element size not a multiple of 16 bytes");
  if (m.swizzle && box[0] * elem > m.swizzle) return bad("box inner dimension larger than the swizzle span");
  for (uint32_t i = rank; i < 5; ++i) m.dims[i] = m.box[i] = 1;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

inline long tma_land(const EmuTensorMap& m, uint32_t dst, const int32_t (&c)[5]) {
  const uint64_t row_bytes = uint64_t(m.box[0]) * m.elem_bytes;
  uint64_t off = 0;
  for (uint32_t i4 = 0; i4 < m.box[4]; ++i4)
    for (uint32_t i3 = 0; i3 < m.box[3]; ++i3)
      for (uint32_t i2 = 0; i2 < m.box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < m.box[1]; ++i1, off += row_bytes)
          for (uint32_t i0 = 0; i0 < m.box[0]; ++i0) {
            const int64_t at[5] = {int64_t(c[0]) + i0, int64_t(c[1]) + i1, int64_t(c[2]) + i2, int64_t(c[3]) + i3,
                                   int64_t(c[4]) + i4};
            bool inside = true;
            uint64_t src = 0;
            for (int k = 0; k < 5; ++k) {
              inside = inside && at[k] >= 0 && uint64_t(at[k]) < m.dims[k];
              src += uint64_t(at[k]) * m.strides[k];
            }
            uint32_t a = dst + uint32_t(off + uint64_t(i0) * m.elem_bytes);
            if (m.swizzle) a = swizzle128(a);
            check_smem(a, m.elem_bytes);
            if (inside)
              std::memcpy(smem_at(a), m.base + src, m.elem_bytes);
            else
              std::memset(smem_at(a), 0, m.elem_bytes);
            note_async_write(a, m.elem_bytes);
          }
  return long(off);
}

// cp.async.bulk.tensor.{rank}d.shared::cluster.global.mbarrier::complete_tx::bytes
inline void tma_load(uint32_t dst, const void* tensor_map, uint32_t bar, const int32_t (&coords)[5]) {
  EmuTensorMap m;
  std::memcpy(&m, tensor_map, sizeof(m));
  if (dst % 128 || (m.swizzle == 128 && dst % 1024))
    async_fail("TMA destination not 128-byte (1024-byte with the 128-byte swizzle) aligned", dst);
  const std::lock_guard<std::mutex> lock(g_block->sync_mu);
  MBarrier& mb = mbarrier_at(bar);
  if (laggard_schedule()) {  // early landing
    mb.tx -= tma_land(m, dst, coords);
    mbarrier_try_complete(mb);
  } else {
    mb.copies.push_back([m, dst, coords] { return tma_land(m, dst, coords); });
    mbarrier_try_complete(mb);
  }
}

// ---- bulk reductions (cp.reduce.async.bulk ... add.f32) ------------------------
// Queued per thread in bulk groups like cp.async (tl_bulk in the prelude) and
// performed only when cp.async.bulk.wait_group retires the group: the source is
// read as late as allowed, so a kernel that rewrites it before the wait adds
// the new values and fails the checks. Under COGKERN_EMU_LAGGARD they are
// performed at issue instead (as early as allowed: a source not yet written
// by the other warps shows).
inline void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || src % 16 || bytes % 16)
    async_fail("bulk reduce: addresses 16-byte aligned and a multiple of 16 bytes expected", src);
  check_smem(src, bytes);
  const auto reduce = [dst, src, bytes] {
    check_async_read(src, bytes, "bulk reduction");
    for (uint32_t i = 0; i < bytes / 4; ++i) {
      float v;
      std::memcpy(&v, smem_at(src + 4 * i), 4);
      std::atomic_ref<float>(dst[i]).fetch_add(v);
    }
  };
  if (laggard_schedule())
    reduce();
  else
    tl_bulk.open.push_back(reduce);
}
inline void bulk_commit() { tl_bulk.commit(); }
inline void bulk_wait(int n) { tl_bulk.retire(size_t(n), [](auto& op) { op(); }); }

// ---- named barriers --------------------------------------------------------------
inline void named_barrier(unsigned id, unsigned count, bool wait) {
  if (id == 0 || id >= 16 || count % 32) async_fail("named barrier: id 1..15 and a multiple of 32 threads expected", id);
  std::unique_lock<std::mutex> lock(g_block->sync_mu);
  NamedBarrier& nb = g_block->named[id];
  if (nb.arrived == 0) nb.count = count;
  if (nb.count != count) async_fail("named barrier used with two thread counts at once", id);
  if (++nb.arrived == nb.count) {
    nb.arrived = 0;
    ++nb.generation;
    g_block->others_blocked.fetch_sub(nb.others_waiting);
    nb.others_waiting = 0;
    g_block->sync_cv.notify_all();
  } else if (wait) {
    const unsigned long gen = nb.generation;
    if (laggard_schedule() && !is_laggard()) ++nb.others_waiting;
    note_blocking();
    block_until(lock, [&] { return nb.generation != gen; }, "named barrier never completes", id);
  }
  lock.unlock();
  if (wait) lag();  // COGKERN_EMU_LAGGARD
}

}  // namespace cuda_emu
