// Hopper (sm_90a) warpgroup MMA building blocks: wgmma wrappers, shared-memory
// matrix descriptors, and the 128-byte-swizzled tile layout they read. The
// base for the FA3-class attention path; checked on the CPU by the emulator
// (scripts/cuda_emu/cuda_emu_wgmma.h, scripts/cuda_emu/run_emu.py) and
// on the GPU by tests/test_sm90_wgmma_cuda.py against torch.matmul.
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

#if defined(COGKERN_CUDA_EMULATION)
}  // namespace cogkern::sm90
#include "cuda_emu_wgmma.h"
namespace cogkern::sm90 {
using ::cuda_emu::smem_addr;
using ::cuda_emu::wgmma_commit;
using ::cuda_emu::wgmma_fence;
template <int N>
__device__ __forceinline__ void wgmma_wait() { ::cuda_emu::wgmma_wait(N); }
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
#else

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// Orders this thread's earlier register and shared-memory accesses before the
// warpgroup's next wgmma (needed before the first wgmma and whenever the
// accumulator or A registers were touched by other instructions).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Closes the batch of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed batches are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

template <int N, typename T>
struct Wgmma;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
// The instructions exist only in sm_90a code; other targets never call these.
// The operand lists are written out: inline asm needs one operand per register.
#define COGKERN_WGMMA_M64N64(T, TY) \
template <> \
struct Wgmma<64, T> { \
  static constexpr int kRegs = 32; \
  template <int TRANS_A = 0, int TRANS_B = 0> \
  static __device__ __forceinline__ void ss(float (&d)[kRegs], uint64_t desc_a, uint64_t desc_b, bool accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(TRANS_A), "n"(TRANS_B)); \
  } \
  template <int TRANS_B> \
  static __device__ __forceinline__ void rs(float (&d)[kRegs], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(TRANS_B)); \
  } \
};

#define COGKERN_WGMMA_M64N128(T, TY) \
template <> \
struct Wgmma<128, T> { \
  static constexpr int kRegs = 64; \
  template <int TRANS_A = 0, int TRANS_B = 0> \
  static __device__ __forceinline__ void ss(float (&d)[kRegs], uint64_t desc_a, uint64_t desc_b, bool accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(TRANS_A), "n"(TRANS_B)); \
  } \
  template <int TRANS_B> \
  static __device__ __forceinline__ void rs(float (&d)[kRegs], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(TRANS_B)); \
  } \
};

// D(64 x N) (+)= A(64 x 16) * B(16 x N): ss() with A and B in shared memory,
// each K-major or, with TRANS_A / TRANS_B, MN-major; rs() with A in registers
// and B K-major or, with TRANS_B, MN-major.
COGKERN_WGMMA_M64N64(__nv_bfloat16, "bf16")
COGKERN_WGMMA_M64N64(__half, "f16")
COGKERN_WGMMA_M64N128(__nv_bfloat16, "bf16")
COGKERN_WGMMA_M64N128(__half, "f16")
#undef COGKERN_WGMMA_M64N64
#undef COGKERN_WGMMA_M64N128
#endif  // sm_90a
#endif  // COGKERN_CUDA_EMULATION

// The first 1024-byte-aligned address at or after p (dynamic shared memory
// guarantees less; the swizzle reads address bits 7..9, so panels need it).
__device__ __forceinline__ unsigned char* align_to_panel_group(unsigned char* p) {
  const uint32_t addr = smem_addr(p);
  return p + (kPanelGroupBytes - addr % kPanelGroupBytes) % kPanelGroupBytes;
}

// Pins registers that an asynchronous wgmma writes (accumulators) or reads
// (A operands) at this point of the instruction stream. The compiler sees a
// wgmma's register operands as used and defined by the issuing asm statement
// alone; without this it may move reads of the accumulators above the
// wgmma_wait that makes them valid, or reuse an in-flight A register early.
// Put it right after the wgmma_wait, on every register array the waited
// batches used (CUTLASS's warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#if !defined(COGKERN_CUDA_EMULATION)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int N, int M>
__device__ __forceinline__ void fence_operands(uint32_t (&r)[N][M]) {
#if !defined(COGKERN_CUDA_EMULATION)
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int k = 0; k < M; ++k) asm volatile("" : "+r"(r[i][k])::"memory");
#endif
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

// Makes this thread's ordinary shared-memory stores visible to the tensor
// cores' (async proxy) reads; each writing thread, before the barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if !defined(COGKERN_CUDA_EMULATION)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  ::cuda_emu::fence_proxy_async();
#endif
}

// An ordinary shared-memory store of data that the tensor cores or the copy
// engine (the async proxy) read next: the writing thread must call
// fence_proxy_async_shared() before the barrier that hands it over. (The
// emulator records these stores and fails an async read of one before that
// fence.)
template <typename V>
__device__ __forceinline__ void store_for_async_proxy(unsigned char* p, const V& v) {
  *reinterpret_cast<V*>(p) = v;
#if defined(COGKERN_CUDA_EMULATION)
  ::cuda_emu::note_generic_store(smem_addr(p), uint32_t(sizeof(V)));
#endif
}

}  // namespace cogkern::sm90
