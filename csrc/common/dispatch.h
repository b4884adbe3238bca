// The storage dtypes and head dims the CUDA attention kernels are built for,
// listed once, and the dispatch over them (in the manner of FlashAttention-2's
// static_switch.h). Everything else derives from the two X-macro lists below:
// the runtime switches of the launchers, the explicit instantiations
// (COGKERN_CUDA_FOR_EACH_TYPE_AND_HEAD_DIM), the argument checks and the lists
// Python reads (cogkern._C.cuda_attention_head_dims() / _dtypes()).
//
// Adding a head dim: add it to COGKERN_CUDA_HEAD_DIMS and give every tile config
// (FwdConfig, BwdConfig, Sm90FwdConfig, Sm90WsFwdConfig, Sm90BwdConfig,
// Sm90WsBwdConfig) a specialization for it; their primary templates are left
// undefined, so a listed head dim without its tiles fails to compile.
//
// No CUDA headers here: the dtype list names __half / __nv_bfloat16 only as
// tokens, which the switches and instantiations expand in .cu files.
#pragma once

#include <cstdint>
#include <string>

#include "common/host_device.h"

// X(D, ...) for every head dim.
#define COGKERN_CUDA_HEAD_DIMS(X, ...) X(64, __VA_ARGS__) X(128, __VA_ARGS__)

// X(DType enumerator, device storage type, torch dtype name, ...) for every dtype.
#define COGKERN_CUDA_DTYPES(X, ...) \
  X(kHalf, __half, "float16", __VA_ARGS__) X(kBFloat16, __nv_bfloat16, "bfloat16", __VA_ARGS__)

// M(T, D) once for every (storage type, head dim) pair: explicit instantiations.
#define COGKERN_CUDA_FOR_EACH_TYPE_AND_HEAD_DIM(M) COGKERN_CUDA_DTYPES(COGKERN_DETAIL_TYPE_ROW, M)
#define COGKERN_DETAIL_TYPE_ROW(E, T, NAME, M) COGKERN_CUDA_HEAD_DIMS(COGKERN_DETAIL_TYPE_AND_HEAD_DIM, M, T)
#define COGKERN_DETAIL_TYPE_AND_HEAD_DIM(D, M, T) M(T, D)

// COGKERN_HEADDIM_SWITCH(head_dim, D, fallback, [&] { ... D ... }): runs the
// lambda with `constexpr int D` equal to head_dim, or evaluates to fallback
// when head_dim is not listed.
#define COGKERN_HEADDIM_SWITCH(HEAD_DIM, CONST_NAME, FALLBACK, ...)                           \
  [&] {                                                                                       \
    COGKERN_CUDA_HEAD_DIMS(COGKERN_DETAIL_HEADDIM_CASE, HEAD_DIM, CONST_NAME, __VA_ARGS__) \
    return FALLBACK;                                                                          \
  }()
#define COGKERN_DETAIL_HEADDIM_CASE(VALUE, HEAD_DIM, CONST_NAME, ...) \
  if ((HEAD_DIM) == VALUE) {                                          \
    constexpr static int CONST_NAME = VALUE;                          \
    return __VA_ARGS__();                                             \
  }

// COGKERN_DTYPE_SWITCH(dtype, T, fallback, [&] { ... T ... }): runs the lambda
// with `using T` = the device storage type of dtype (a cogkern::DType), or
// evaluates to fallback when dtype is not listed.
#define COGKERN_DTYPE_SWITCH(DTYPE, TYPE_NAME, FALLBACK, ...)                            \
  [&] {                                                                                  \
    COGKERN_CUDA_DTYPES(COGKERN_DETAIL_DTYPE_CASE, DTYPE, TYPE_NAME, __VA_ARGS__) \
    return FALLBACK;                                                                     \
  }()
#define COGKERN_DETAIL_DTYPE_CASE(E, T, NAME, DTYPE, TYPE_NAME, ...) \
  if ((DTYPE) == ::cogkern::DType::E) {                              \
    using TYPE_NAME = T;                                             \
    return __VA_ARGS__();                                            \
  }

namespace cogkern {

#define COGKERN_DETAIL_ITEM(D, ...) D,
inline constexpr int kCudaHeadDims[] = {COGKERN_CUDA_HEAD_DIMS(COGKERN_DETAIL_ITEM)};
#undef COGKERN_DETAIL_ITEM
#define COGKERN_DETAIL_ITEM(E, T, NAME, ...) DType::E,
inline constexpr DType kCudaDTypes[] = {COGKERN_CUDA_DTYPES(COGKERN_DETAIL_ITEM)};
#undef COGKERN_DETAIL_ITEM
#define COGKERN_DETAIL_ITEM(E, T, NAME, ...) NAME,
inline constexpr const char* kCudaDTypeNames[] = {COGKERN_CUDA_DTYPES(COGKERN_DETAIL_ITEM)};
#undef COGKERN_DETAIL_ITEM

constexpr bool cuda_head_dim_listed(int64_t head_dim) {
  for (const int d : kCudaHeadDims)
    if (d == head_dim) return true;
  return false;
}

constexpr bool cuda_dtype_listed(DType dtype) {
  for (const DType t : kCudaDTypes)
    if (t == dtype) return true;
  return false;
}

// "64 or 128" / "float16 or bfloat16", for error messages.
template <typename Item, size_t N, typename Format>
std::string or_list(const Item (&items)[N], Format format) {
  std::string out;
  for (size_t i = 0; i < N; ++i) out += (i == 0 ? "" : i + 1 == N ? " or " : ", ") + format(items[i]);
  return out;
}
inline std::string cuda_head_dims_text() {
  return or_list(kCudaHeadDims, [](int d) { return std::to_string(d); });
}
inline std::string cuda_dtypes_text() {
  return or_list(kCudaDTypeNames, [](const char* name) { return std::string(name); });
}

}  // namespace cogkern
