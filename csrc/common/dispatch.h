// The dtypes and head dims the CUDA attention kernels are built for, listed
// once (in the manner of FlashAttention-2's static_switch.h). Torch-free and
// CUDA-free: the op glue (argument checks), the module (which tells Python)
// and the CUDA launchers (switches, explicit instantiations) all read these.
//
// Adding a head dim: add it to COGKERN_ATTENTION_HEAD_DIMS, then give each
// tile config its specialization for it (flash/flash_fwd_kernel.cuh FwdConfig,
// flash/flash_bwd_kernel.cuh BwdConfig, flash/sm90/*: Sm90FwdConfig,
// Sm90WsFwdConfig); a config without one fails to compile. The instantiations
// and the switches follow from the list.
#pragma once

#include <cstdint>
#include <string>

#include "common/host_device.h"

// X(a, b, D) for each head dim D (a, b: passed through).
#define COGKERN_ATTENTION_HEAD_DIMS(X, a, b) X(a, b, 64) X(a, b, 128)

// X(a, DTYPE, T, NAME) for each dtype of the CUDA kernels: DType::DTYPE, stored
// as the CUDA type T (a token here; only CUDA translation units expand it),
// torch.NAME in Python.
#define COGKERN_CUDA_DTYPES(X, a) X(a, kHalf, __half, float16) X(a, kBFloat16, __nv_bfloat16, bfloat16)

// X(T, D) for every (dtype, head dim) pair the attention kernels are built
// for: one line per launcher instantiates them all.
#define COGKERN_ATTENTION_CONFIGS(X) COGKERN_CUDA_DTYPES(COGKERN_DETAIL_DTYPE_CONFIGS, X)
#define COGKERN_DETAIL_DTYPE_CONFIGS(X, DTYPE, T, NAME) COGKERN_ATTENTION_HEAD_DIMS(COGKERN_DETAIL_CONFIG, X, T)
#define COGKERN_DETAIL_CONFIG(X, T, D) X(T, D)

namespace cogkern {

#define COGKERN_DETAIL_HEAD_DIM_ITEM(a, b, D) D,
#define COGKERN_DETAIL_DTYPE_ITEM(a, DTYPE, T, NAME) DType::DTYPE,
#define COGKERN_DETAIL_DTYPE_NAME(a, DTYPE, T, NAME) #NAME,
inline constexpr int kAttentionHeadDims[] = {COGKERN_ATTENTION_HEAD_DIMS(COGKERN_DETAIL_HEAD_DIM_ITEM, _, _)};
inline constexpr DType kCudaDTypes[] = {COGKERN_CUDA_DTYPES(COGKERN_DETAIL_DTYPE_ITEM, _)};
inline constexpr const char* kCudaDTypeNames[] = {COGKERN_CUDA_DTYPES(COGKERN_DETAIL_DTYPE_NAME, _)};  // torch names
#undef COGKERN_DETAIL_HEAD_DIM_ITEM
#undef COGKERN_DETAIL_DTYPE_ITEM
#undef COGKERN_DETAIL_DTYPE_NAME

constexpr bool is_attention_head_dim(int64_t d) {
  for (int listed : kAttentionHeadDims)
    if (d == listed) return true;
  return false;
}

constexpr bool is_cuda_dtype(DType t) {
  for (DType listed : kCudaDTypes)
    if (t == listed) return true;
  return false;
}

// Whether the CUDA attention kernels exist for this dtype and head dim.
constexpr bool attention_cuda_supported(DType dtype, int64_t head_dim) {
  return is_cuda_dtype(dtype) && is_attention_head_dim(head_dim);
}

// "64 or 128": the listed head dims, for error messages.
inline std::string attention_head_dims_text() {
  std::string s;
  for (size_t i = 0; i < std::size(kAttentionHeadDims); ++i) {
    if (i > 0) s += i + 1 == std::size(kAttentionHeadDims) ? " or " : ", ";
    s += std::to_string(kAttentionHeadDims[i]);
  }
  return s;
}

}  // namespace cogkern
