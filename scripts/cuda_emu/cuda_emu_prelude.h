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
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
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

namespace cuda_emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim tl_thread_idx, tl_block_idx;
inline Dim g_block_dim, g_grid_dim;

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
};
inline Block* g_block = nullptr;

inline Warp& my_warp() { return *g_block->warps[tl_thread_idx.x / 32]; }
inline int my_lane() { return int(tl_thread_idx.x % 32); }

// Runs body() as grid x threads GPU threads with `smem` bytes of dynamic shared memory.
inline void launch(unsigned grid, unsigned threads, size_t smem, const std::function<void()>& body) {
  g_grid_dim = {grid, 1, 1};
  g_block_dim = {threads, 1, 1};
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
        tl_thread_idx = {t, 0, 0};
        body();
      });
    }
    for (auto& th : pool) th.join();
    g_block = nullptr;
  }
}

inline unsigned char* dynamic_smem() { return g_block->dyn_smem.data(); }

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::tl_thread_idx)
#define blockIdx (::cuda_emu::tl_block_idx)
#define blockDim (::cuda_emu::g_block_dim)
#define gridDim (::cuda_emu::g_grid_dim)

inline void __syncthreads() { ::cuda_emu::g_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::cuda_emu::my_warp().bar.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  auto& w = ::cuda_emu::my_warp();
  const int lane = ::cuda_emu::my_lane();
  static_assert(sizeof(T) <= 64);
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.slot[lane ^ lane_mask], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
