// Host entry of the wgmma conformance kernel (wgmma_selftest_kernel.cuh).
// Torch-free; the op glue is wgmma_selftest_op_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

namespace cogkern::sm90 {

// q, k, v: row-major [64][head_dim] fp16 or bf16 on the device; s: [64][64]
// fp32, o and u: [64][head_dim] fp32. head_dim 64 or 128. tma: the tiles come
// in through TMA (16-byte-aligned q, k, v). Needs an sm_90a build and a
// compute capability 9.0 device (cudaErrorInvalidDeviceFunction otherwise).
cudaError_t launch_wgmma_selftest(const void* q, const void* k, const void* v, float* s, float* o, float* u,
                                  int head_dim, bool bf16, bool tma, cudaStream_t stream);

}  // namespace cogkern::sm90
