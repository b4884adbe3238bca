// The launch every flash-attention kernel shares (nvcc only): a FlashArgs
// argument (and any extra ones, e.g. TMA descriptors), dynamic shared memory
// beyond the default 48 KB allowed first.
#pragma once

#include "kernels/flash_launch.h"

namespace cogkern::flash {

template <typename Kernel, typename... Extra>
cudaError_t launch_flash_kernel(Kernel kernel, int64_t blocks, int threads, size_t smem, const FlashArgs& a,
                                cudaStream_t stream, const Extra&... extra) {
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), threads, smem, stream>>>(a, extra...);
  return cudaGetLastError();
}

}  // namespace cogkern::flash
