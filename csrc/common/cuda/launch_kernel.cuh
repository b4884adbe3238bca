// One kernel launch: launch_kernel(kernel, grid, block, smem, stream, args...)
// is kernel<<<grid, block, smem, stream>>>(args...) followed by
// cudaGetLastError(). Every launcher launches through it. Real hardware only:
// launchers include common/cuda/device_seam.h, which includes this header on
// the GPU; on the CPU the emulator's launch_kernel (scripts/cuda_emu/
// cuda_emu_device.h) takes its place with the same signature, makes the checks
// the hardware makes at launch (block size, dynamic shared memory within what
// cudaFuncSetAttribute allowed) and runs the kernel on emulated threads, so the
// emulator runs the launchers' own code, not a copy of it.
#pragma once

#include <cuda_runtime_api.h>

#include <utility>

namespace cogkern {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace cogkern
