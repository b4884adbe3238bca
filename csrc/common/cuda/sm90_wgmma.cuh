// Hopper (sm_90a) warpgroup MMA building blocks: shared-memory matrix
// descriptors, the 128-byte-swizzled tile layout they read, and the fences
// around wgmma (its PTX wrappers, Wgmma<N, T> and wgmma_fence / _commit /
// _wait, are in common/cuda/ptx_sm90_wgmma.cuh, reached through
// common/cuda/device_seam.h). The base for the FA3-class attention path;
// checked on the CPU by the emulator (scripts/cuda_emu/cuda_emu_wgmma.h,
// scripts/cuda_emu/run_emu.py) and on the GPU by
// tests/test_sm90_wgmma_cuda.py against torch.matmul.
//
// ----------------------------------------------------------------------------
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16} (PTX ISA, "Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate"): the 128 threads of a warpgroup
// (4 consecutive warps, the first warp index divisible by 4) compute
// D(64 x N) (+)= A(64 x 16) * B(16 x N). A and B come from shared memory through
// 64-bit descriptors; A may instead come from registers.
//   Accumulator (fp32, N/2 registers per thread): thread t, warp w = t / 32,
//   lane l = 4g + q (g = l / 4, q = l % 4); for each n8 block j:
//     d[4j + 0], d[4j + 1] = D[16w + g    ][8j + 2q], D[16w + g    ][8j + 2q + 1]
//     d[4j + 2], d[4j + 3] = D[16w + g + 8][8j + 2q], D[16w + g + 8][8j + 2q + 1]
//   i.e. each warp owns 16 rows, laid out like mma.sync's m16n8 C fragments.
//   A from registers (four .b32 of two 16-bit values): warp w's rows 16w..16w+15
//   in mma.sync's m16n8k16 A layout:
//     a0 = A[16w+g][2q..2q+1]   a1 = A[16w+g+8][2q..2q+1]
//     a2 = A[16w+g][2q+8..2q+9] a3 = A[16w+g+8][2q+8..2q+9]
//   so, as with mma.sync, the accumulators of n8 blocks 2j and 2j+1, packed
//   pairwise to 16 bits, are the A registers of k-slice j (P = softmax(S) feeds
//   P * V without leaving registers).
//
// Shared-memory tiles here use the 128-byte swizzle (descriptor layout type 1,
// CUTLASS's Swizzle<3,4,3>): a panel of 64 16-bit columns, one 128-byte line per
// row, in groups of 8 rows (1024 bytes, 1024-byte aligned); the 16-byte chunk c
// of row r is stored at chunk c ^ (r % 8) of its line. The hardware applies the
// XOR to address bits [4,7) from bits [7,10), so panels must start 1024-byte
// aligned and a descriptor may start mid-line (k-slices of a K-major panel).
//   K-major operand (rows = M or N, the 16 K values of a slice contiguous):
//     start = panel + 32 * (k-slice within the panel), SBO = 1024 (next 8 rows),
//     LBO unused (1).
//   MN-major operand (rows = K, the M or N values contiguous; e.g. V as B with
//     V stored [key][dim], or dS as A with dS^T stored [key][query]):
//     start = panel + 16 * 128 * (k-slice), SBO = 1024 (next 8 K rows),
//     LBO = byte distance to the next 64-column panel.
// Descriptor bits: [0,14) start >> 4, [16,30) LBO >> 4, [32,46) SBO >> 4,
// [49,52) base offset (0), [62,64) layout type (1 = 128-byte swizzle).
// ----------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/cuda/device_seam.h"

namespace cogkern::sm90 {

constexpr int kWarpgroupThreads = 128;
constexpr int kPanelCols = 64;         // 16-bit columns per 128-byte swizzled line
constexpr int kPanelGroupBytes = 1024; // 8 lines: the swizzle period and the SBO

// Byte offset of element (row, col) of a 128-byte-swizzled panel (col < 64).
__host__ __device__ __forceinline__ uint32_t sw128_offset(int row, int col) {
  return uint32_t(row) * 128u + ((uint32_t(col / 8) ^ uint32_t(row % 8)) * 16u) + uint32_t(col % 8) * 2u;
}

__host__ __device__ __forceinline__ uint64_t sw128_descriptor(uint32_t smem_byte_addr, uint32_t lbo_bytes) {
  uint64_t d = 0;
  d |= uint64_t((smem_byte_addr >> 4) & 0x3FFFu);
  d |= uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16;
  d |= uint64_t((kPanelGroupBytes >> 4) & 0x3FFFu) << 32;
  d |= uint64_t(1) << 62;  // 128-byte swizzle
  return d;
}

// K-major slice k (16 columns) of a panel that starts at smem_byte_addr.
__host__ __device__ __forceinline__ uint64_t desc_k_major(uint32_t panel_addr, int k_slice) {
  return sw128_descriptor(panel_addr + uint32_t(k_slice) * 32u, 16u);
}

// MN-major slice k (16 rows) of panels of `rows` lines each, the next 64 columns
// (N/M) `panel_stride` bytes further.
__host__ __device__ __forceinline__ uint64_t desc_mn_major(uint32_t panel_addr, int k_slice, uint32_t panel_stride) {
  return sw128_descriptor(panel_addr + uint32_t(k_slice) * 16u * 128u, panel_stride);
}

// The first 1024-byte-aligned address at or after p (dynamic shared memory
// guarantees less; the swizzle reads address bits 7..9, so panels need it).
__device__ __forceinline__ unsigned char* align_to_panel_group(unsigned char* p) {
  const uint32_t addr = smem_addr(p);
  return p + (kPanelGroupBytes - addr % kPanelGroupBytes) % kPanelGroupBytes;
}

// wgmma_fence() with the registers that ordinary code has just written and the
// next batches read (A fragments) or accumulate into pinned before it. The
// fence names no registers, so without the pins the compiler may sink those
// writes (a rescale of the accumulators, the packing of P) below it; ptxas
// then has to serialize the wgmmas to stay correct, and the overlap is gone
// (FA3 fences its operands before warpgroup_arrive for the same reason).
template <typename... Regs>
__device__ __forceinline__ void wgmma_fence_after(Regs&... regs) {
  (fence_operands(regs), ...);
  wgmma_fence();
}

}  // namespace cogkern::sm90
