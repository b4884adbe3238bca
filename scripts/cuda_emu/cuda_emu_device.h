// The emulator's side of csrc/common/cuda/device_seam.h: under
// COGKERN_CUDA_EMULATION the seam includes this header instead of the
// real-hardware wrappers (csrc/common/cuda/ptx_*.cuh, launch_kernel.cuh), and
// it provides the same names in the same namespaces, implemented by the
// emulator (cuda_emu_ptx.h: mma.sync, ldmatrix, cp.async; cuda_emu_wgmma.h:
// wgmma and the async proxy; cuda_emu_async.h: mbarriers, TMA, bulk
// reductions, named barriers; emu_runtime.cpp: the launch).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_emu_async.h"  // and cuda_emu_wgmma.h, cuda_emu_ptx.h
#include "cuda_emu_runtime.h"

// Dynamic shared memory of a kernel: the emulated block's.
#define COGKERN_DYNAMIC_SMEM(name) unsigned char* name = ::cuda_emu::dynamic_smem()

namespace cogkern::sm80 {
using ::cuda_emu::ElemTraits;
using ::cuda_emu::smem_addr;
using ::cuda_emu::ldmatrix_x4;
using ::cuda_emu::ldmatrix_x4_trans;
using ::cuda_emu::cp_async_16;
using ::cuda_emu::cp_async_commit;
using ::cuda_emu::cp_async_wait;
using ::cuda_emu::fast_exp2;
using ::cuda_emu::opaque_lane;
}  // namespace cogkern::sm80

namespace cogkern::sm90 {
using ::cuda_emu::smem_addr;

// wgmma (cuda_emu_wgmma.h).
using ::cuda_emu::wgmma_commit;
using ::cuda_emu::wgmma_fence;
template <int N>
inline void wgmma_wait() { ::cuda_emu::wgmma_wait(N); }
template <int N, typename T>
struct Wgmma {
  static constexpr int kRegs = N / 2;
  template <int TRANS_A = 0, int TRANS_B = 0>
  static void ss(float (&d)[kRegs], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    ::cuda_emu::wgmma_issue(d, N, ::cuda_emu::is_bf16<T>(), nullptr, desc_a, desc_b, TRANS_A != 0, TRANS_B != 0,
                            accumulate);
  }
  template <int TRANS_B>
  static void rs(float (&d)[kRegs], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
    ::cuda_emu::wgmma_issue(d, N, ::cuda_emu::is_bf16<T>(), a, 0, desc_b, false, TRANS_B != 0, accumulate);
  }
};
// Register pins order the compiler's code around asynchronous wgmmas; the
// emulator performs a wgmma at its wait, so there is nothing to pin.
template <int N>
inline void fence_operands(float (&)[N]) {}
template <int N, int M>
inline void fence_operands(uint32_t (&)[N][M]) {}
// The async proxy (cuda_emu_ptx.h, "Proxies"): ordinary stores meant for it are
// recorded, and an async read of one before the writer's fence fails.
inline void fence_proxy_async_shared() { ::cuda_emu::fence_proxy_async(); }
template <typename V>
inline void store_for_async_proxy(unsigned char* p, const V& v) {
  *reinterpret_cast<V*>(p) = v;
  ::cuda_emu::note_generic_store(smem_addr(p), uint32_t(sizeof(V)));
}

// mbarriers, TMA, bulk reductions, named barriers, setmaxnreg (cuda_emu_async.h).
inline void mbar_init(uint32_t bar, uint32_t count) { ::cuda_emu::mbar_init(bar, count); }
inline void mbar_init_fence() {}
inline void mbar_arrive(uint32_t bar) { ::cuda_emu::mbar_arrive(bar); }
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { ::cuda_emu::mbar_arrive_expect_tx(bar, bytes); }
inline void mbar_wait(uint32_t bar, uint32_t parity) { ::cuda_emu::mbar_wait(bar, parity); }
inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  ::cuda_emu::tma_load(dst, map, bar, {c0, c1, 0, 0, 0});
}
inline void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  ::cuda_emu::tma_load(dst, map, bar, {c0, c1, c2, 0, 0});
}
inline void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2, int c3) {
  ::cuda_emu::tma_load(dst, map, bar, {c0, c1, c2, c3, 0});
}
inline void prefetch_tensor_map(const CUtensorMap*) {}
inline void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) { ::cuda_emu::bulk_reduce_add_f32(dst, src, bytes); }
inline void bulk_commit() { ::cuda_emu::bulk_commit(); }
template <int N>
inline void bulk_wait_read() { ::cuda_emu::bulk_wait(N); }
template <int N>
inline void bulk_wait() { ::cuda_emu::bulk_wait(N); }
inline void named_barrier_sync(unsigned id, unsigned threads) { ::cuda_emu::named_barrier(id, threads, true); }
inline void named_barrier_arrive(unsigned id, unsigned threads) { ::cuda_emu::named_barrier(id, threads, false); }
template <int REGS>
inline void increase_max_registers() {}
template <int REGS>
inline void decrease_max_registers() {}
}  // namespace cogkern::sm90

namespace cogkern {
// The launch (csrc/common/cuda/launch_kernel.cuh): the launch-time checks, then
// the kernel on emulated threads (cuda_emu_runtime.h, emu_runtime.cpp).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  (void)stream;  // the emulator runs every launch to completion, in order
  return ::cuda_emu::launch_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem,
                                   [&] { kernel(args...); });
}
}  // namespace cogkern
