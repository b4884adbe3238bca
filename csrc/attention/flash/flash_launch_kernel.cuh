// The launch every flash-attention kernel shares: a FlashArgs argument (and
// any extra ones, e.g. TMA descriptors), dynamic shared memory beyond the
// default 48 KB allowed first.
#pragma once

#include "attention/flash/flash_params.h"
#include "common/cuda/device_seam.h"  // launch_kernel

namespace cogkern::flash {

template <typename Kernel, typename... Extra>
cudaError_t launch_flash_kernel(Kernel kernel, int64_t blocks, int threads, size_t smem, const FlashArgs& a,
                                cudaStream_t stream, const Extra&... extra) {
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // [mut:smem-opt-in]
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, dim3(unsigned(blocks)), dim3(unsigned(threads)), smem, stream, a, extra...);
}

}  // namespace cogkern::flash
