// Host emulation of the CUDA execution model, just enough to run cogkern's
// attention kernels (csrc/kernels/*_kernel.cuh, attention_rows.cuh) as plain
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
#include <cstring>
#include <functional>
#include <memory>
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
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<WarpGroup>> warpgroups;  // only when the block is whole warpgroups
  std::vector<unsigned char> dyn_smem;
  // COGKERN_EMU_LAGGARD: __syncthreads entries by threads outside the laggard group, and those done.
  std::atomic<long> other_arrivals{0};
  std::atomic<long> others_inside{0};  // of those, now waiting in __syncthreads
  std::atomic<long> others_done{0};
  std::mutex lag_mu;
  std::condition_variable lag_cv;
};
inline Block* g_block = nullptr;

inline Warp& my_warp() { return *g_block->warps[tl_tid / 32]; }
inline int my_lane() { return int(tl_tid % 32); }

inline unsigned char* dynamic_smem() { return g_block->dyn_smem.data(); }

// COGKERN_EMU_LAGGARD=1: an adversarial schedule. In each block one group of
// threads (a warpgroup, or a warp in blocks that are not whole warpgroups;
// block b picks group b % groups) runs behind: at each __syncthreads exit,
// cp.async wait and wgmma wait it pauses until every other thread of the block
// waits in __syncthreads (or 2 s have passed). The others run as far ahead
// as the barriers let them, so a group reading shared memory that another
// group writes without a barrier in between reads stale data, and the checks
// fail. Blocks alternate the laggard, so both sides of each exchange lag once.
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
// A thread outside the laggard group entered a barrier or finished: when that
// makes all of them wait or be done, wake the laggard.
inline void note_progress() {
  if (!laggard_schedule()) return;
  if (g_block->others_inside.load() + g_block->others_done.load() < lag_others()) return;
  { const std::lock_guard<std::mutex> lock(g_block->lag_mu); }  // no lost wake-up
  g_block->lag_cv.notify_all();
}
inline thread_local long tl_barriers_passed = 0;  // by this (laggard) thread, in this block
inline void lag() {
  if (!is_laggard()) return;
  const long others = lag_others();
  // Every other thread waits in the next barrier (it has entered tl_barriers_passed + 1) or is done.
  const auto ahead = [&] {
    return g_block->other_arrivals.load() >= others * (tl_barriers_passed + 1) - g_block->others_done.load();
  };
  // The time limit only guards against a kernel whose groups also wait for each other some other way.
  std::unique_lock<std::mutex> lock(g_block->lag_mu);
  g_block->lag_cv.wait_for(lock, std::chrono::seconds(2), ahead);
}

// Runs body() as a grid of `grid` blocks of block_x x block_y GPU threads
// with `smem` bytes of dynamic shared memory.
inline void launch(unsigned grid, unsigned block_x, unsigned block_y, size_t smem, const std::function<void()>& body) {
  const unsigned threads = block_x * block_y;
  g_grid_dim = {grid, 1, 1};
  g_block_dim = {block_x, block_y, 1};
  g_block_threads = threads;
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.bar = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
    if (threads % 128 == 0)
      for (unsigned g = 0; g < threads / 128; ++g) blk.warpgroups.push_back(std::make_unique<WarpGroup>());
    blk.dyn_smem.assign(smem + 16, 0xCD);  // poison: reads of unwritten shared memory show up as garbage
    g_block = &blk;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        tl_block_idx = {b, 0, 0};
        tl_thread_idx = {t % block_x, t / block_x, 0};
        tl_tid = t;
        body();
        if (!is_laggard()) {
          g_block->others_done.fetch_add(1);
          note_progress();
        }
      });
    }
    for (auto& th : pool) th.join();
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
  const bool laggard = ::cuda_emu::is_laggard();
  if (!laggard) {
    blk.other_arrivals.fetch_add(1);
    blk.others_inside.fetch_add(1);
    ::cuda_emu::note_progress();
  }
  blk.bar->arrive_and_wait();
  if (!laggard) blk.others_inside.fetch_sub(1);
  if (laggard) {
    ++::cuda_emu::tl_barriers_passed;
    ::cuda_emu::lag();  // COGKERN_EMU_LAGGARD
  }
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
