// The runtime switches over common/dispatch.h's lists, for the CUDA
// launchers: DType <-> CUDA element type, and (dtype, head dim) -> a call of
// a template instantiated for exactly that pair.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dispatch.h"

namespace cogkern {

template <typename T>
struct DTypeOf;  // DTypeOf<__half>::value == DType::kHalf, ...
#define COGKERN_DETAIL_DTYPE_OF(a, DTYPE, T, NAME) \
  template <>                               \
  struct DTypeOf<T> {                       \
    static constexpr DType value = DType::DTYPE; \
  };
COGKERN_CUDA_DTYPES(COGKERN_DETAIL_DTYPE_OF, _)
#undef COGKERN_DETAIL_DTYPE_OF

// f.template operator()<T, D>() for the listed pair equal to (dtype,
// head_dim), e.g. switch_attention_config(P.dtype, P.head_dim,
// cudaErrorInvalidValue, [&]<typename T, int D>() { return run<T, D>(P); });
// `otherwise` for a pair that is not listed.
template <typename R, typename F>
R switch_attention_config(DType dtype, int64_t head_dim, R otherwise, F&& f) {
#define COGKERN_DETAIL_CASE(T, D) \
  if (dtype == DTypeOf<T>::value && head_dim == D) return f.template operator()<T, D>();
  COGKERN_ATTENTION_CONFIGS(COGKERN_DETAIL_CASE)
#undef COGKERN_DETAIL_CASE
  return otherwise;
}

// The same over head dims alone (for a kernel whose dtype is a runtime flag).
template <typename R, typename F>
R switch_head_dim(int64_t head_dim, R otherwise, F&& f) {
#define COGKERN_DETAIL_CASE(a, b, D) \
  if (head_dim == D) return f.template operator()<D>();
  COGKERN_ATTENTION_HEAD_DIMS(COGKERN_DETAIL_CASE, _, _)
#undef COGKERN_DETAIL_CASE
  return otherwise;
}

}  // namespace cogkern
