// Multi-tensor apply, torch-free: a list of tensors is cut into fixed-size
// chunks; a launch covers every (tensor, chunk) of the list and a functor
// processes one of them. The CUDA kernel hands chunks to blocks (grid-stride
// over the global chunk index), the CPU backend hands them to threads; both run
// the same functor body, with `lane` / `nlanes` standing for the threads that
// share a chunk (threadIdx.x / blockDim.x on the GPU, 0 / 1 on the CPU).
//
// The tensor list travels inside the kernel's parameter block (up to 32 KB on
// Volta and newer with CUDA >= 12.1), so a launch needs no device-side table,
// no host-to-device copy, and can be captured into a CUDA graph as is.
#pragma once

#include <cstring>

#include "common/host_device.h"

namespace cogkern {

// Elements per work item. A multiple of every vector width used below.
constexpr int64_t kMultiTensorChunk = 32768;
// Elements one lane handles per loop iteration (one vector load per operand).
constexpr int kMultiTensorILP = 4;

CK_HD int64_t chunks_of(int64_t numel) { return ceil_div(numel, kMultiTensorChunk); }

// The tensor owning global chunk c: the last t with chunk_begin(t) <= c.
// `begin(t)` is non-decreasing in t; tensors without elements own no chunk.
template <typename BeginOf>
CK_HD int find_chunk_owner(int num_tensors, int64_t c, BeginOf begin) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin(mid) <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) MtVec {
  T v[N];
};

// Loads N elements at p[0..n) (n <= N), as one vector when `vector_ok`
// (aligned and full); missing elements are left as `fill`.
// On the host a full group is a memcpy (no alignment needed; the compiler
// makes it one SIMD load), so the CPU backend may use any N.
template <typename T, int N>
CK_HD void mt_load(const T* p, int64_t n, bool vector_ok, T (&out)[N], T fill) {
#if !defined(__CUDA_ARCH__)
  if (n == N) {
    std::memcpy(out, p, sizeof(out));
    return;
  }
#endif
  if (vector_ok && n == N) {
    const MtVec<T, N> v = *reinterpret_cast<const MtVec<T, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = v.v[k];
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = k < n ? p[k] : fill;
}

template <typename T, int N>
CK_HD void mt_store(T* p, int64_t n, bool vector_ok, const T (&in)[N]) {
#if !defined(__CUDA_ARCH__)
  if (n == N) {
    std::memcpy(p, in, sizeof(in));
    return;
  }
#endif
  if (vector_ok && n == N) {
    MtVec<T, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = in[k];
    *reinterpret_cast<MtVec<T, N>*>(p) = v;
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) p[k] = in[k];
  }
}

CK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

CK_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

CK_HD bool is_finite_acc(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

}  // namespace cogkern
