// Conformance check of the wgmma building blocks (sm90_wgmma.cuh) on one
// attention-shaped tile, run by one warpgroup:
//   S = Q K^T       (64 x 64; A and B K-major from 128-byte-swizzled panels)
//   O = 16bit(S) V  (64 x D;  A from the S accumulators in registers, B = V
//                    MN-major, i.e. V as stored [key][dim])
//   U = V[:, :64]^T V (64 x D; A and B both MN-major from shared memory: the
//                    backward's dQ = dS K with dS^T stored [key][query])
// with Q [64][D], K [64][D], V [64][D] row-major in global memory, D = 64 or
// 128. S, O and U go back to global memory in fp32 so that the test compares
// them with torch.matmul. With TMA, the tiles come in through TMA tensor maps
// and an mbarrier (ptx_sm90_async.cuh) instead of ordinary loads and stores: the
// check that TMA's 128-byte swizzle is the layout the wgmma descriptors read,
// and that the transaction bytes complete the barrier, apart from any
// attention kernel. Exactly the layouts and fragment moves the Hopper
// attention forward and backward need; the GPU test is
// tests/test_sm90_wgmma_cuda.py, the CPU one scripts/cuda_emu/run_emu.py
// (emulator).
#pragma once

#include "attention/flash/flash_common.cuh"  // ElemTraits<T>::pack: two floats -> one A register
#include "common/cuda/device_seam.h"
#include "common/cuda/sm90_tensor_map.h"
#include "common/cuda/sm90_wgmma.cuh"

namespace cogkern::sm90 {

constexpr int kSelftestRows = 64;  // queries (one warpgroup's M) and keys

// Bytes of dynamic shared memory the kernel needs for head dim D: the three
// tiles, the mbarrier (TMA), and the 1024 bytes it may skip to align its panels.
__host__ __device__ constexpr int selftest_smem_bytes(int d) { return 3 * kSelftestRows * d * 2 + 8 + kPanelGroupBytes; }

// The TMA path's tensor maps: q, k, v as [64][D] row-major, one box of 64 rows per panel.
struct SelftestMaps {
  CUtensorMap q, k, v;
};
template <int D>
inline bool make_selftest_maps(const void* q, const void* k, const void* v, SelftestMaps* maps) {
  const uint64_t dims[2] = {D, kSelftestRows}, strides[1] = {D};
  return make_panel_tensor_map(&maps->q, q, 2, dims, strides, kSelftestRows) &&
         make_panel_tensor_map(&maps->k, k, 2, dims, strides, kSelftestRows) &&
         make_panel_tensor_map(&maps->v, v, 2, dims, strides, kSelftestRows);
}

// Copies a row-major [64][D] 16-bit matrix into D/64 swizzled panels of 64
// rows (panel p holds columns 64p..64p+63, kSelftestRows * 128 bytes each).
template <int D>
__device__ __forceinline__ void load_panels(unsigned char* panels, const uint16_t* src, int tid) {
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  for (int i = tid; i < kSelftestRows * kChunksPerRow; i += kWarpgroupThreads) {
    const int row = i / kChunksPerRow, col = (i % kChunksPerRow) * 8;
    const uint4 v = *reinterpret_cast<const uint4*>(src + row * D + col);
    unsigned char* panel = panels + (col / kPanelCols) * (kSelftestRows * 128);
    store_for_async_proxy(panel + sw128_offset(row, col % kPanelCols), v);
  }
}

// Stores a 64 x N fp32 accumulator (one warpgroup's) to a row-major [64][N] matrix.
template <int N>
__device__ __forceinline__ void store_rows(float* dst, const float (&acc)[N / 2], int tid) {
  const int w = tid / 32, g = (tid % 32) / 4, qd = tid % 4;
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[(16 * w + g + (e >= 2 ? 8 : 0)) * N + 8 * j + 2 * qd + (e % 2)] = acc[4 * j + e];
  }
}

template <typename T, int D, bool TMA>
__device__ __forceinline__ void wgmma_selftest_body(const uint16_t* q, const uint16_t* k, const uint16_t* v, float* s_out,
                                                    float* o_out, float* u_out, const SelftestMaps& maps,
                                                    unsigned char* smem_raw) {
  unsigned char* smem = align_to_panel_group(smem_raw);  // [mut:tile-align]
  constexpr int kMatrixBytes = kSelftestRows * D * 2;
  unsigned char* qs = smem;
  unsigned char* ks = smem + kMatrixBytes;
  unsigned char* vs = smem + 2 * kMatrixBytes;
  const int tid = int(threadIdx.x);
  if constexpr (TMA) {
    const uint32_t bar = smem_addr(smem + 3 * kMatrixBytes);
    if (tid == 0) {
      mbar_init(bar, 1);
      mbar_init_fence();
    }
    __syncthreads();
    if (tid == 0) {
      mbar_arrive_expect_tx(bar, 3 * kMatrixBytes);
      for (int p = 0; p < D / kPanelCols; ++p) {
        const uint32_t panel = uint32_t(p * kSelftestRows * 128);
        tma_load_2d(smem_addr(qs) + panel, &maps.q, bar, p * kPanelCols, 0);  // [mut:probe-tma-q]
        tma_load_2d(smem_addr(ks) + panel, &maps.k, bar, p * kPanelCols, 0);
        tma_load_2d(smem_addr(vs) + panel, &maps.v, bar, p * kPanelCols, 0);
      }
    }
    mbar_wait(bar, 0);
  } else {
    load_panels<D>(qs, q, tid);
    load_panels<D>(ks, k, tid);  // [mut:probe-load-k]
    load_panels<D>(vs, v, tid);
    fence_proxy_async_shared();  // ordinary stores -> tensor-core reads
    __syncthreads();
  }

  // S = Q K^T over D / 16 k-slices (4 per 64-column panel).
  constexpr int kPanelBytes = kSelftestRows * 128;
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.0f;
  wgmma_fence();
#pragma unroll
  for (int ks_i = 0; ks_i < D / 16; ++ks_i) {
    const int panel = ks_i / 4, slice = ks_i % 4;
    Wgmma<64, T>::ss(s, desc_k_major(smem_addr(qs + panel * kPanelBytes), slice),
                     desc_k_major(smem_addr(ks + panel * kPanelBytes), slice), ks_i > 0);  // [mut:tile-desc-k]
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(s);

  store_rows<kSelftestRows>(s_out, s, tid);

  // O = 16bit(S) V: the accumulators of n8 blocks 2j, 2j+1 are the A registers
  // of key slice j; V is the MN-major B (panels kPanelBytes apart along D).
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  uint32_t a[kSelftestRows / 16][4];  // written before the fence that orders them before the wgmma
#pragma unroll
  for (int j = 0; j < kSelftestRows / 16; ++j) {
    a[j][0] = flash::ElemTraits<T>::pack(s[8 * j + 0], s[8 * j + 1]);
    a[j][1] = flash::ElemTraits<T>::pack(s[8 * j + 2], s[8 * j + 3]);  // [mut:probe-pack-a1]
    a[j][2] = flash::ElemTraits<T>::pack(s[8 * j + 4], s[8 * j + 5]);  // [mut:probe-pack-a2]
    a[j][3] = flash::ElemTraits<T>::pack(s[8 * j + 6], s[8 * j + 7]);
  }
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < kSelftestRows / 16; ++j)
    Wgmma<D, T>::template rs<1>(o, a[j], desc_mn_major(smem_addr(vs), j, kPanelBytes), j > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(o);
  fence_operands(a);
  store_rows<D>(o_out, o, tid);

  // U = V[:, :64]^T V: A(m, k) = V[k][m] is V's first panel read MN-major
  // (transposed), B(k, n) = V[k][n] MN-major as in O. Reuses o's registers.
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < kSelftestRows / 16; ++j)
    Wgmma<D, T>::template ss<1, 1>(o, desc_mn_major(smem_addr(vs), j, kPanelBytes),
                                   desc_mn_major(smem_addr(vs), j, kPanelBytes), j > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(o);
  store_rows<D>(u_out, o, tid);
}

}  // namespace cogkern::sm90
