// Shared pieces of the Hopper (wgmma) flash-attention kernels
// (flash_{fwd,bwd}_sm90{,_ws}_kernel.cuh): row tiles streamed from global
// memory into the 128-byte-swizzled panels wgmma reads (cp.async here, or the
// TMA maps below), and the two product shapes the kernels issue on them.
#pragma once

#include "attention/flash/flash_common.cuh"
#include "attention/flash/flash_params.h"
#include "common/cuda/sm90_tensor_map.h"
#include "common/cuda/sm90_wgmma.cuh"

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

// acc (+)= A B^T over the D / 16 k-slices of two K-major operands kept as
// 64-column panels (4 slices each): A's 64 rows start at a_rows, B's at
// b_rows, each operand's next panel a_panel_bytes / b_panel_bytes further.
// Issued, not committed; the first slice overwrites acc.
template <typename Mma, int D>
__device__ __forceinline__ void issue_ss_k_major(float (&acc)[Mma::kRegs], uint32_t a_rows, uint32_t a_panel_bytes,
                                                 uint32_t b_rows, uint32_t b_panel_bytes) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t panel = uint32_t(ks / 4);
    Mma::ss(acc, sm90::desc_k_major(a_rows + panel * a_panel_bytes, ks % 4),
            sm90::desc_k_major(b_rows + panel * b_panel_bytes, ks % 4), ks > 0);
  }
}

// acc += A B over KS k-slices: A from registers (a[kk] holds slice kk), B
// MN-major (stored [k][n], as v or q^ tiles are) in 64-column panels that
// start at b_base, panel_bytes apart. Issued, not committed.
template <typename Mma, int KS>
__device__ __forceinline__ void issue_rs_mn_major(float (&acc)[Mma::kRegs], const uint32_t (&a)[KS][4], uint32_t b_base,
                                                  uint32_t panel_bytes) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) Mma::template rs<1>(acc, a[kk], sm90::desc_mn_major(b_base, kk, panel_bytes), true);
}

// The fp32 accumulators of n8 blocks 2kk and 2kk + 1 of a 64-row product,
// packed to 16 bits: the A registers of k-slice kk of the next product (the
// wgmma accumulator layout is mma.sync's, see sm90_wgmma.cuh).
template <typename T, int KS>
__device__ __forceinline__ void pack_a_slices(const float (&acc)[KS * 8], uint32_t (&a)[KS][4]) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[kk][r] = ElemTraits<T>::pack(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
  }
}

// Host side of the warp-specialized kernels' TMA loads (sm90_tensor_map.h):
// boxes of box_rows rows of one 64-column panel, rows past the sequence end
// read as zeros. False when the driver refuses the map.
// The scratch q^ / k^ (and dq^-shaped) rows, [batch * heads][seq][D]:
template <int D>
inline bool make_head_rows_map(CUtensorMap* map, const void* base, const FlashArgs& a, uint32_t box_rows) {
  const uint64_t seq = uint64_t(a.seq);
  const uint64_t dims[3] = {D, seq, uint64_t(a.batch * a.heads)}, strides[2] = {D, seq * D};
  return sm90::make_panel_tensor_map(map, base, 3, dims, strides, box_rows);
}
// A caller's [batch][seq][heads][D] view (v, dO): 4-D, coordinates (column, token, head, batch).
template <int D>
inline bool make_bshd_map(CUtensorMap* map, const BshdTensor& t, const FlashArgs& a, uint32_t box_rows) {
  const uint64_t dims[4] = {D, uint64_t(a.seq), uint64_t(a.heads), uint64_t(a.batch)};
  uint64_t strides[3] = {uint64_t(t.stride_s), uint64_t(t.stride_h), uint64_t(t.stride_b)};
  // A dimension of size 1 is never stepped along: give it a stride the driver
  // accepts whatever the view says.
  for (int i = 0; i < 3; ++i)
    if (dims[i + 1] == 1) strides[i] = i == 0 ? D : strides[i - 1] * dims[i];
  return sm90::make_panel_tensor_map(map, t.ptr, 4, dims, strides, box_rows);
}

}  // namespace cogkern::flash
