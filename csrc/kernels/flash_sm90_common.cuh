// Shared pieces of the Hopper (wgmma) flash-attention kernels
// (flash_fwd_sm90_kernel.cuh, flash_bwd_sm90_kernel.cuh): row tiles streamed
// from global memory into the 128-byte-swizzled panels wgmma reads.
#pragma once

#include "kernels/flash_common.cuh"
#include "kernels/flash_launch.h"
#include "kernels/sm90_wgmma.cuh"

namespace cogkern::flash {

// Rows [row0, row0 + ROWS) of a [seq, D] row stream into D / 64 swizzled
// panels of ROWS lines (panel p = columns 64p..64p+63, ROWS * 128 bytes), with
// cp.async; rows >= seq are zero-filled.
template <int ROWS, int D, int THREADS, typename T, typename RowPtr>
__device__ __forceinline__ void load_panels_async(unsigned char* panels, int64_t row0, int64_t seq, const T* any_valid,
                                                  RowPtr row_ptr) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kTotal / THREADS; ++i) {
    const int idx = int(threadIdx.x) + i * THREADS;
    const int r = idx / kChunks, col = (idx % kChunks) * 8;
    const int64_t grow = row0 + r;
    const bool valid = grow < seq;
    const T* src = valid ? row_ptr(grow) + col : any_valid;
    unsigned char* panel = panels + (col / sm90::kPanelCols) * (ROWS * 128);
    cp_async_16(smem_addr(panel + sm90::sw128_offset(r, col % sm90::kPanelCols)), src, valid);
  }
}

}  // namespace cogkern::flash
