// Device building blocks of the flash-attention kernels (flash_fwd_launch.cu,
// flash_bwd_launch.cu): the sm_80+ tensor-core path's PTX (mma.sync, ldmatrix,
// cp.async: common/cuda/ptx_sm80.cuh, through common/cuda/device_seam.h), a
// bank-conflict-free shared-memory tile layout, and the fragment layouts the
// kernels rely on. Everything here works on sm_80 and sm_90.
//
// ----------------------------------------------------------------------------
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", 16-bit A/B,
// fp32 C/D). In a warp, lane = 4 * g + t with g = lane / 4 (the "groupID",
// 0..7) and t = lane % 4 (the "threadID_in_group", 0..3):
//   A (16 x 16, row-major), four .b32 registers of two 16-bit values each:
//     a0 = A[g    ][2t .. 2t+1]    a1 = A[g + 8][2t .. 2t+1]
//     a2 = A[g    ][2t+8 .. 2t+9]  a3 = A[g + 8][2t+8 .. 2t+9]
//   B (16 x 8, "col": element (k, n)), two .b32 registers:
//     b0 = B[2t .. 2t+1][g]        b1 = B[2t+8 .. 2t+9][g]
//   C, D (16 x 8, fp32), four registers:
//     c0, c1 = C[g][2t], C[g][2t+1]     c2, c3 = C[g+8][2t], C[g+8][2t+1]
// Consequence used throughout (FlashAttention-2's register reuse): the C
// fragments of two adjacent n8 tiles 2j and 2j+1 of a 16 x N product, packed
// pairwise to 16 bits, ARE the A fragment of k-slice j (columns 16j..16j+15):
//     a0 = pack(C[2j].c0, c1)  a1 = pack(C[2j].c2, c3)
//     a2 = pack(C[2j+1].c0, c1)  a3 = pack(C[2j+1].c2, c3)
// so P = softmax(S) feeds the next MMA straight from registers.
//
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA "ldmatrix"):
// lanes 8i .. 8i+7 give the shared addresses of the 8 rows (16 bytes each) of
// matrix i; register ri of lane (4g + t) receives
//     without .trans: row g, elements 2t, 2t+1 of matrix i
//     with .trans:    elements (row 2t, col g) and (row 2t+1, col g) of matrix i
// Hence, for a tile stored row-major [row][col] in shared memory:
//   * A fragment of rows r0..r0+15, cols c0..c0+15 (A = the stored tile):
//       no .trans; lane l addresses row r0 + (l % 16), col c0 + (l / 16) * 8
//       (matrices: rows 0-7/cols 0-7, rows 8-15/cols 0-7, rows 0-7/cols 8-15,
//        rows 8-15/cols 8-15 -> a0, a1, a2, a3).
//   * B fragments of two n8 tiles when B(k, n) = stored[n][k] (e.g. B = K^T
//     with K stored [key][dim]): no .trans; lane l addresses row
//     n0 + (l % 8) + (l / 16) * 8, col k0 + ((l / 8) % 2) * 8
//     -> r0, r1 = (b0, b1) of tile n0; r2, r3 = (b0, b1) of tile n0 + 8.
//   * B fragments of two n8 tiles when B(k, n) = stored[k][n] (e.g. B = V with
//     V stored [key][dim]): .trans; lane l addresses row
//     k0 + (l % 8) + ((l / 8) % 2) * 8, col n0 + (l / 16) * 8
//     -> r0, r1 = (b0, b1) of tile n0; r2, r3 = (b0, b1) of tile n0 + 8.
//   * A fragment when A(m, k) = stored[k][m] (A = a transposed stored tile):
//       .trans; lane l addresses row k0 + (l % 8) + (l / 16) * 8,
//       col m0 + ((l / 8) % 2) * 8 -> a0, a1, a2, a3.
// ----------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/attention_math.h"
#include "attention/flash/flash_params.h"
#include "common/cuda/device_seam.h"

namespace cogkern::flash {

constexpr int kWarpSize = 32;

// The sm_80+ PTX wrappers (common/cuda/ptx_sm80.cuh on the GPU, the emulator's
// on the CPU): ElemTraits<T> packs two fp32 values into one .b32 register of
// two 16-bit values (low half = first element) and issues the mma for the type.
using sm80::ElemTraits;
using sm80::smem_addr;
using sm80::ldmatrix_x4;
using sm80::ldmatrix_x4_trans;
using sm80::cp_async_16;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::fast_exp2;
using sm80::opaque_lane;

// ---------------------------------------------------------------------------
// Tile layout in shared memory: ROWS x COLS 16-bit elements, row-major, in
// 16-byte chunks of 8 elements. Chunk c of row r is stored at chunk
// swizzle(r, c), an XOR permutation inside the row, so that the 8 rows an
// ldmatrix phase reads (same logical chunk, 8 consecutive rows) and the rows a
// cp.async phase writes fall into 8 different 16-byte bank groups.
// ---------------------------------------------------------------------------

template <int COLS>
struct SmemTile {
  static_assert(COLS % 16 == 0 && COLS >= 16, "tile rows hold whole 16-element MMA slices");
  static constexpr int kChunks = COLS / 8;  // 16-byte chunks per row

  __device__ __forceinline__ static int swizzle(int row, int chunk) {
    if constexpr (kChunks >= 8) {
      return chunk ^ (row & 7);
    } else if constexpr (kChunks == 4) {
      // 64-byte rows: two rows share a 128-byte line; rows 2 apart must differ.
      return chunk ^ ((row >> 1) & 3);
    } else {  // kChunks == 2: 32-byte rows, four rows per line.
      return chunk ^ ((row >> 2) & 1);
    }
  }
  // Element offset of (row, col); col % 8 is kept inside the chunk.
  __device__ __forceinline__ static int offset(int row, int col) {
    return row * COLS + swizzle(row, col >> 3) * 8 + (col & 7);
  }
};

// Loads rows [row0, row0 + ROWS) of a [seq, COLS] row stream into a swizzled
// tile with cp.async; `row_ptr(r)` returns the global address of row r (only
// called for r < seq). Rows >= seq are zero-filled.
template <int ROWS, int COLS, int THREADS, typename T, typename RowPtr>
__device__ __forceinline__ void load_tile_async(T* tile, int64_t row0, int64_t seq, const T* any_valid,
                                                RowPtr row_ptr) {
  using L = SmemTile<COLS>;
  constexpr int kTotal = ROWS * L::kChunks;
  static_assert(kTotal % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kTotal / THREADS; ++i) {
    const int idx = int(threadIdx.x) + i * THREADS;
    const int r = idx / L::kChunks, c = idx % L::kChunks;
    const int64_t grow = row0 + r;
    const bool valid = grow < seq;
    const T* src = valid ? row_ptr(grow) + c * 8 : any_valid;
    cp_async_16(smem_addr(tile + L::offset(r, c * 8)), src, valid);
  }
}

// ---------------------------------------------------------------------------
// Warp-level fragment loads from swizzled tiles (addressing as in the header).
// ---------------------------------------------------------------------------

// A fragment, rows r0..r0+15 and cols c0..c0+15 of the stored tile.
template <int COLS, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int r0, int c0, int lane) {
  const int row = r0 + (lane & 15);
  const int col = c0 + (lane >> 4) * 8;
  ldmatrix_x4(a, smem_addr(tile + SmemTile<COLS>::offset(row, col)));
}

// A fragment of A = stored^T: A rows m0..m0+15 are stored cols, A cols
// (k) k0..k0+15 are stored rows.
template <int COLS, typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int k0, int m0, int lane) {
  const int row = k0 + (lane & 7) + (lane >> 4) * 8;
  const int col = m0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(a, smem_addr(tile + SmemTile<COLS>::offset(row, col)));
}

// B fragments of n8 tiles n0 and n0 + 8 for B(k, n) = stored[n][k], k0..k0+15:
// b[0], b[1] for tile n0; b[2], b[3] for tile n0 + 8.
template <int COLS, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  const int col = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(b, smem_addr(tile + SmemTile<COLS>::offset(row, col)));
}

// B fragments of n8 tiles n0 and n0 + 8 for B(k, n) = stored[k][n], k0..k0+15.
template <int COLS, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = n0 + (lane >> 4) * 8;
  ldmatrix_x4_trans(b, smem_addr(tile + SmemTile<COLS>::offset(row, col)));
}

// What a query-tile block (the forward kernels, the backward's dq kernel)
// works on: (batch * head, query tile of BM rows) from blockIdx.x, the rows of
// q^, k^ (contiguous [seq][D] per head) and v, and the keys it can see. Causal
// grids run the longest (last) query tiles first.
template <typename T, int D>
struct QueryTileBlock {
  int64_t bh, b, h, m0;
  int64_t kv_end;  // keys [0, kv_end): all, or up to the tile's last query when causal
  const T* q;
  const T* k;
  const T* v;
  int64_t v_stride;  // between v rows (tokens)
};
template <typename T, int D, int BM>
__device__ __forceinline__ QueryTileBlock<T, D> query_tile_block(const FlashArgs& a) {
  const int64_t seq = a.seq;
  const int64_t n_mtiles = ceil_div(seq, BM);
  QueryTileBlock<T, D> f;
  f.bh = int64_t(blockIdx.x) / n_mtiles;
  int64_t m_tile = int64_t(blockIdx.x) % n_mtiles;
  if (a.causal) m_tile = n_mtiles - 1 - m_tile;
  f.m0 = m_tile * BM;
  f.b = f.bh / a.heads;
  f.h = f.bh % a.heads;
  f.kv_end = a.causal ? (f.m0 + BM < seq ? f.m0 + BM : seq) : seq;
  f.q = static_cast<const T*>(a.q_hat) + f.bh * seq * D;
  f.k = static_cast<const T*>(a.k_hat) + f.bh * seq * D;
  f.v = static_cast<const T*>(a.v.ptr) + f.b * a.v.stride_b + f.h * a.v.stride_h;
  f.v_stride = a.v.stride_s;
  return f;
}

// Reductions over the 4 lanes of a quad (the lanes holding one C row).
// fmaxf drops a NaN; online_softmax_row says why the NaN reaches the output anyway.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// The online-softmax step of one C-fragment row over a key tile, shared by the
// mma.sync forward and the Hopper forwards (Sm90RowSoftmax). score(i, j) is a
// reference to the thread's element j (0, 1) of n8 block i of the row (masked
// already); it is overwritten with P = exp2(s c - m' c). Updates the running
// max; returns the tile's partial sum (this thread's share) and sets alpha,
// the factor by which the old sum and O must shrink.
//
// The max is fmaxf (one FMNMX) over four independent partial maxima instead
// of softmax_max's NaN-propagating compare-and-select chain (three dependent
// instructions per element). fmaxf drops a NaN score, so m' is never NaN (the
// running max starts at -inf; a tile of only NaN and -inf scores leaves it as
// it was), but the NaN still reaches the output through the sum: its own
// P = exp2(NaN * c - m' c) is NaN (FFMA and MUFU.EX2 propagate it), hence the
// row sum l, lse = ln(l) + scale m and, through P V (NaN times any v, also 0),
// every O element of the row are NaN, and later tiles keep them NaN
// (NaN * alpha, also for alpha = 0). Emulator section `nan` pins this with one
// NaN score among finite ones (a NaN in one k row), and mutations.py checks
// that it fails when a NaN score's P is dropped.
template <int NT, typename Score>
__device__ __forceinline__ float online_softmax_row(Score score, float& row_max, float c, float& alpha) {
  static_assert(NT % 2 == 0, "pairs of n8 blocks feed the partial maxima");
  float part[4] = {score(0, 0), score(0, 1), score(1, 0), score(1, 1)};
#pragma unroll
  for (int i = 2; i < NT; i += 2) {
    part[0] = fmaxf(part[0], score(i, 0));
    part[1] = fmaxf(part[1], score(i, 1));
    part[2] = fmaxf(part[2], score(i + 1, 0));
    part[3] = fmaxf(part[3], score(i + 1, 1));
  }
  const float tile_max = quad_max(fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3])));
  const float new_max = fmaxf(row_max, tile_max);
  alpha = softmax_rescale<float>(row_max, new_max, c);
  const float shift = softmax_shift<float>(new_max, c);
  const auto p_of = [&](float s) { return fast_exp2(fmaf(s, c, -shift)); };  // [mut:softmax-nan-exp]
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    float& s0 = score(i, 0);
    float& s1 = score(i, 1);
    s0 = p_of(s0);
    s1 = p_of(s1);
    sum += s0 + s1;
  }
  row_max = new_max;
  return sum;
}

// Stores two adjacent elements (2 x 16 bits) with one 32-bit store.
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = ElemTraits<T>::pack(lo, hi);
}

// dst[0] += lo and dst[1] += hi, each atomically (dst 8-byte aligned): one
// 64-bit vector reduction on sm_90+.
__device__ __forceinline__ void atomic_add_pair(float* dst, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(lo, hi));
#else
  atomicAdd(dst, lo);
  atomicAdd(dst + 1, hi);
#endif
}

// The block of a backward key-tile kernel: (batch * head, keys [n0, n0 + BN)),
// and the query tiles of BM rows that see those keys: all, or from the one
// holding query n0 when causal.
template <typename T>
struct KeyTileBlock {
  int64_t bh, b, h, n0;
  int64_t m_first;  // first query tile
  int n_mtiles;     // query tiles from m_first to the sequence end
  const T* q;
  const T* k;
  const T* v;
  const T* dout;
  int64_t v_stride, dout_stride;  // between rows (tokens) of v and dO
};
template <typename T, int D, int BN, int BM>
__device__ __forceinline__ KeyTileBlock<T> key_tile_block(const FlashArgs& a) {
  const int64_t seq = a.seq;
  const int64_t n_ntiles = ceil_div(seq, BN);
  KeyTileBlock<T> f;
  f.bh = int64_t(blockIdx.x) / n_ntiles;
  f.n0 = (int64_t(blockIdx.x) % n_ntiles) * BN;
  f.b = f.bh / a.heads;
  f.h = f.bh % a.heads;
  f.m_first = a.causal ? f.n0 / BM : 0;
  f.n_mtiles = int(ceil_div(seq, BM) - f.m_first);
  f.q = static_cast<const T*>(a.q_hat) + f.bh * seq * D;
  f.k = static_cast<const T*>(a.k_hat) + f.bh * seq * D;
  f.v = static_cast<const T*>(a.v.ptr) + f.b * a.v.stride_b + f.h * a.v.stride_h;
  f.dout = static_cast<const T*>(a.grad_out.ptr) + f.b * a.grad_out.stride_b + f.h * a.grad_out.stride_h;
  f.v_stride = a.v.stride_s;
  f.dout_stride = a.grad_out.stride_s;
  return f;
}

// Stores a backward key-tile kernel's results for the thread's two keys
// key_lo and key_lo + 8 (C-fragment rows g and g + 8): dv in the input dtype,
// dk^ in fp32 for the epilogue (norm and RoPE backward). dv(i, e), dk(i, e):
// element e of n8 block i of the thread's accumulators.
template <typename T, int D, typename DvAt, typename DkAt>
__device__ __forceinline__ void store_key_grads(const FlashArgs& a, const KeyTileBlock<T>& blk, int64_t key_lo, int t,
                                                DvAt dv, DkAt dk) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = key_lo + 8 * r;
    if (key >= a.seq) continue;
    T* dv_dst = static_cast<T*>(a.grad_v.ptr) + a.grad_v.offset(blk.b, key, blk.h);
    float* dk_dst = a.dk_hat + (blk.bh * a.seq + key) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      store_pair(dv_dst + i * 8 + 2 * t, dv(i, 2 * r), dv(i, 2 * r + 1));
      *reinterpret_cast<float2*>(dk_dst + i * 8 + 2 * t) = make_float2(dk(i, 2 * r), dk(i, 2 * r + 1));
    }
  }
}

}  // namespace cogkern::flash
