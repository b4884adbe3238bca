// Shared by the CUDA kernels and the CPU backend. No torch headers here: this
// directory compiles on its own with nvcc or a plain C++ compiler.
#pragma once

#include <cmath>
#include <cstdint>

// Always inlined, as nvcc does with __forceinline__: on the CPU this is also
// what lets the shared bodies be compiled inside the SIMD clones of a CPU loop
// (common/cpu/simd_clones.h) instead of being called at the baseline ISA.
#if defined(__CUDACC__)
#define CK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define CK_HD inline __attribute__((always_inline))
#else
#define CK_HD inline
#endif

namespace cogkern {

// Element types crossing the torch-free boundary (the glue maps torch dtypes onto these).
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// The type the math runs in: fp32 for every storage type but float64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Storage <-> math conversions. 16-bit types (c10::Half, __half, __nv_bfloat16, ...)
// all convert through float; double stays double.
template <typename A, typename T> CK_HD A to_acc(T v) { return static_cast<A>(static_cast<float>(v)); }
template <> CK_HD double to_acc<double, double>(double v) { return v; }
template <typename T, typename A> CK_HD T from_acc(A v) { return T(static_cast<float>(v)); }
template <> CK_HD double from_acc<double, double>(double v) { return v; }

CK_HD void sincos_acc(float a, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(a, s, c);  // full-precision path; the arguments are small
#else
  *s = std::sin(a);
  *c = std::cos(a);
#endif
}
CK_HD void sincos_acc(double a, double* s, double* c) {
#if defined(__CUDA_ARCH__)
  sincos(a, s, c);
#else
  *s = std::sin(a);
  *c = std::cos(a);
#endif
}

CK_HD float exp2_acc(float a) {
#if defined(__CUDA_ARCH__)
  return exp2f(a);
#else
  return std::exp2(a);
#endif
}
CK_HD double exp2_acc(double a) { return exp2(a); }

CK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cogkern
