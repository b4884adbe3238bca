// Host emulation of the CUDA execution model, just enough to run cogkern's
// attention kernels (csrc/**/*_kernel.cuh, attention_row_kernels.cuh) as plain
// C++ on the CPU: every GPU thread of a block is a std::thread, __syncthreads
// is a block barrier, warp collectives exchange values through per-warp
// slots between two warp barriers. Blocks run one after another. Force-included
// (g++ -include) before the kernel headers; see run_emu.py.
#pragma once

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <algorithm>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <array>
#include <mutex>
#include <thread>
#include <vector>

// Kernel-side keywords. __shared__ variables are function statics: one per
// kernel instantiation, shared by the block's threads (blocks run serially).
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __grid_constant__
#define __grid_constant__

namespace cuda_emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim tl_thread_idx, tl_block_idx;
inline thread_local unsigned tl_tid = 0;  // linear thread index in the block (x fastest): warps are cut from it
inline Dim g_block_dim, g_grid_dim;
inline unsigned g_block_threads = 0;

struct Warp {
  std::barrier<> bar{32};
  alignas(16) unsigned char slot[32][64];  // per-lane publication area
};

// The 128 threads of a warpgroup (wgmma's collective), like Warp.
struct WarpGroup {
  std::barrier<> bar{128};
  alignas(16) unsigned char slot[128][16];
  // The wgmmas the warpgroup has issued, in order, as the first thread to
  // issue each described it (cuda_emu_wgmma.h): every thread must issue the same.
  std::mutex issue_mu;
  std::vector<std::array<uint64_t, 4>> issues;
};

struct Block;
// Runs once when the last thread reaches a __syncthreads, before any leaves:
// the threads it releases are no longer blocked (COGKERN_EMU_LAGGARD).
struct SyncRelease {
  Block* blk;
  void operator()() noexcept;
};

// A named barrier (bar.sync / bar.arrive id, count).
struct NamedBarrier {
  unsigned count = 0, arrived = 0;
  unsigned long generation = 0;
  long others_waiting = 0;  // non-laggard threads blocked in it
};

// An mbarrier (see cuda_emu_async.h): its state lives here, keyed by its
// shared-memory address, not in the 8 bytes of shared memory.
struct MBarrier {
  unsigned count = 0, pending = 0;  // expected and still missing arrivals of the current phase
  long tx = 0;                      // transaction bytes still expected
  unsigned long phase = 0;          // completed phases
  std::vector<std::function<long()>> copies;  // TMA copies issued, not landed (each returns its bytes)
  long others_waiting = 0;
};

struct Block {
  std::unique_ptr<std::barrier<SyncRelease>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<WarpGroup>> warpgroups;  // only when the block is whole warpgroups
  std::vector<unsigned char> dyn_smem;
  // Per byte of dyn_smem: the thread whose ordinary (generic-proxy) store put
  // it there and has not yet executed fence.proxy.async since, or kCleanByte
  // (see cuda_emu_ptx.h, "Proxies").
  std::unique_ptr<std::atomic<uint16_t>[]> smem_writer;
  // COGKERN_EMU_LAGGARD: threads outside the laggard group that are blocked in
  // a wait (counted up by the thread that blocks, down by the thread whose
  // arrival releases it, so that a released thread counts as running at
  // once) or done.
  std::atomic<long> others_blocked{0};
  std::atomic<long> others_done{0};
  std::atomic<long> others_in_sync{0};  // of the blocked, those in the current __syncthreads
  std::mutex lag_mu;
  std::condition_variable lag_cv;
  // Named barriers and mbarriers (cuda_emu_async.h), under one lock.
  std::mutex sync_mu;
  std::condition_variable sync_cv;
  NamedBarrier named[16];
  std::map<uint32_t, MBarrier> mbarriers;
};
inline void SyncRelease::operator()() noexcept { blk->others_blocked.fetch_sub(blk->others_in_sync.exchange(0)); }
inline Block* g_block = nullptr;

inline Warp& my_warp() { return *g_block->warps[tl_tid / 32]; }
inline int my_lane() { return int(tl_tid % 32); }

inline unsigned char* dynamic_smem() { return g_block->dyn_smem.data(); }
// The shared-memory address of dynamic_smem()[0]. Hardware guarantees dynamic
// shared memory far less than the 1024-byte alignment the 128-byte swizzle
// needs (the kernels align their panels themselves, align_to_panel_group):
// starting at a 16- but not 128-aligned address makes a kernel that forgets
// to, or reads the unaligned base, fail here as it would there.
constexpr uint32_t kSmemBase = 0x210;
// The byte at shared-memory address addr.
inline unsigned char* smem_at(uint32_t addr) { return dynamic_smem() + (addr - kSmemBase); }

// COGKERN_EMU_LAGGARD=1: an adversarial schedule. In each block one group of
// threads (a warpgroup, or a warp in blocks that are not whole warpgroups;
// block b picks group b % groups) runs behind: at each exit from a block-level
// wait (__syncthreads, named barrier, mbarrier) and at each cp.async or wgmma
// wait it pauses until every other thread of the block is blocked in a wait
// or done (or 2 s have passed). The others run as far ahead as the barriers
// let them, so a group reading shared memory that another group writes
// without a barrier in between reads stale data, and the checks fail. Blocks
// alternate the laggard, so both sides of each exchange lag once. TMA copies
// and cp.async land at issue under this schedule (as early as possible: a
// stage refilled while another group still reads it shows), at the wait
// otherwise (as late as possible: a read before the wait shows).
inline unsigned lag_group_size() { return g_block->warpgroups.empty() ? 32u : 128u; }
inline bool laggard_schedule() {
  static const bool on = std::getenv("COGKERN_EMU_LAGGARD") != nullptr;
  return on;
}
inline bool is_laggard() {
  if (!laggard_schedule()) return false;
  const unsigned size = lag_group_size(), groups = (g_block_threads + size - 1) / size;
  return groups > 1 && tl_tid / size == tl_block_idx.x % groups;
}
// Threads outside the laggard group, in this block.
inline long lag_others() {
  const unsigned size = lag_group_size(), groups = (g_block_threads + size - 1) / size, lag = tl_block_idx.x % groups;
  return long(g_block_threads) - long(std::min(g_block_threads, (lag + 1) * size) - lag * size);
}
inline bool others_quiet() {
  return g_block->others_blocked.load() + g_block->others_done.load() >= lag_others();
}
// A thread outside the laggard group blocked or finished: when that makes all
// of them blocked or done, wake the laggard.
inline void note_progress() {
  if (!laggard_schedule() || !others_quiet()) return;
  { const std::lock_guard<std::mutex> lock(g_block->lag_mu); }  // no lost wake-up
  g_block->lag_cv.notify_all();
}
// Called by every thread about to block in a block-level wait.
inline void note_blocking() {
  if (!laggard_schedule() || is_laggard()) return;
  g_block->others_blocked.fetch_add(1);
  note_progress();
}
inline void lag();

// One thread's asynchronous operations of one kind (cp.async, wgmma, bulk
// reductions), in the PTX commit-group model: issued into the open group,
// committed, and performed only when a wait retires their group (the latest
// moment the PTX ISA allows), oldest first.
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::vector<std::vector<Op>> committed;  // oldest first
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // Performs the groups until at most n are left.
  template <typename Perform>
  void retire(size_t n, Perform perform) {
    lag();  // COGKERN_EMU_LAGGARD
    while (committed.size() > n) {
      for (auto& op : committed.front()) perform(op);
      committed.erase(committed.begin());
    }
  }
  bool empty() const { return open.empty() && committed.empty(); }
};
// Bulk reductions this thread has issued (cuda_emu_async.h); checked at exit.
inline thread_local AsyncGroups<std::function<void()>> tl_bulk;

inline void lag() {
  if (!is_laggard()) return;
  // The time limit only guards against a kernel whose groups also wait for each other some other way.
  std::unique_lock<std::mutex> lock(g_block->lag_mu);
  g_block->lag_cv.wait_for(lock, std::chrono::seconds(2), others_quiet);
}

// At block exit every mbarrier must be between phases with no transaction
// bytes or TMA copies outstanding (on the GPU a copy still in flight when the
// block exits writes freed shared memory, and a phase that cannot complete
// hangs its waiters), and no named barrier may hold arrivals nobody waited
// for (an unbalanced hand-over protocol).
inline void check_barriers_idle(unsigned block) {
  for (unsigned id = 0; id < 16; ++id) {
    if (g_block->named[id].arrived != 0) {
      std::fprintf(stderr, "cuda_emu: block %u exits with %u arrivals pending on named barrier %u\n", block,
                   g_block->named[id].arrived, id);
      std::abort();
    }
  }
  for (const auto& [addr, m] : g_block->mbarriers) {
    if (m.tx != 0 || !m.copies.empty() || m.pending != m.count) {
      std::fprintf(stderr,
                   "cuda_emu: block %u exits with mbarrier @%u mid-phase: %u of %u arrivals missing, %ld transaction "
                   "bytes and %zu TMA copies outstanding\n",
                   block, addr, m.pending, m.count, m.tx, m.copies.size());
      std::abort();
    }
  }
}

// Runs body() as a grid of `grid` blocks of block_x x block_y GPU threads
// with `smem` bytes of dynamic shared memory.
inline void launch(unsigned grid, unsigned block_x, unsigned block_y, size_t smem, const std::function<void()>& body) {
  const unsigned threads = block_x * block_y;
  // The hardware's launch limits (sm_90: 227 KB of dynamic shared memory per block, after opt-in).
  if (threads == 0 || threads > 1024 || smem > 227u * 1024u) {
    std::fprintf(stderr, "cuda_emu: launch of %u threads with %zu bytes of dynamic shared memory exceeds the "
                 "hardware's limits (1024 threads, 227 KB)\n", threads, smem);
    std::abort();
  }
  g_grid_dim = {grid, 1, 1};
  g_block_dim = {block_x, block_y, 1};
  g_block_threads = threads;
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.bar = std::make_unique<std::barrier<SyncRelease>>(threads, SyncRelease{&blk});
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
    if (threads % 128 == 0)
      for (unsigned g = 0; g < threads / 128; ++g) blk.warpgroups.push_back(std::make_unique<WarpGroup>());
    blk.dyn_smem.assign(smem + 16, 0xCD);  // poison: reads of unwritten shared memory show up as garbage
    blk.smem_writer = std::make_unique<std::atomic<uint16_t>[]>(smem + 16);
    for (size_t i = 0; i < smem + 16; ++i) blk.smem_writer[i].store(0xFFFF, std::memory_order_relaxed);
    g_block = &blk;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        tl_block_idx = {b, 0, 0};
        tl_thread_idx = {t % block_x, t / block_x, 0};
        tl_tid = t;
        body();
        if (!tl_bulk.empty()) {
          std::fprintf(stderr, "cuda_emu: block %u thread %u exits with bulk operations it never waited for\n", b, t);
          std::abort();
        }
        if (laggard_schedule() && !is_laggard()) {
          g_block->others_done.fetch_add(1);
          note_progress();
        }
      });
    }
    for (auto& th : pool) th.join();
    check_barriers_idle(b);
    g_block = nullptr;
  }
}
inline void launch(unsigned grid, unsigned threads, size_t smem, const std::function<void()>& body) {
  launch(grid, threads, 1, smem, body);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::tl_thread_idx)
#define blockIdx (::cuda_emu::tl_block_idx)
#define blockDim (::cuda_emu::g_block_dim)
#define gridDim (::cuda_emu::g_grid_dim)

inline void __syncthreads() {
  auto& blk = *::cuda_emu::g_block;
  if (::cuda_emu::laggard_schedule() && !::cuda_emu::is_laggard()) {
    blk.others_in_sync.fetch_add(1);  // before blocked: the release subtracts it
    ::cuda_emu::note_blocking();
  }
  blk.bar->arrive_and_wait();
  ::cuda_emu::lag();  // COGKERN_EMU_LAGGARD
}
inline void __syncwarp(unsigned = 0xffffffffu) { ::cuda_emu::my_warp().bar.arrive_and_wait(); }

namespace cuda_emu {
// Every lane publishes v; a lane reads lane src's value (its own when src is
// outside the warp, as __shfl_down_sync does past the end).
template <typename T>
inline T warp_shuffle(T v, int src) {
  auto& w = my_warp();
  static_assert(sizeof(T) <= 64);
  std::memcpy(w.slot[my_lane()], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r = v;
  if (src >= 0 && src < 32) std::memcpy(&r, w.slot[src], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}
}  // namespace cuda_emu

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return ::cuda_emu::warp_shuffle(v, ::cuda_emu::my_lane() ^ lane_mask);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
  return ::cuda_emu::warp_shuffle(v, ::cuda_emu::my_lane() + int(delta));
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// The host runtime calls of the launchers (cudaFuncSetAttribute, ...) and
// their launches (launch_kernel: csrc/common/cuda/launch_kernel.cuh, emulated in cuda_emu_device.h).
#include "cuda_emu_runtime.h"
