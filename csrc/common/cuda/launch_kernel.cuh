// One kernel launch: launch_kernel(kernel, grid, block, smem, stream, args...)
// is kernel<<<grid, block, smem, stream>>>(args...) followed by
// cudaGetLastError(). Under the CPU emulator (COGKERN_CUDA_EMULATION,
// scripts/cuda_emu) the same call runs the kernel on emulated threads, after
// the checks the hardware makes at launch (block size, dynamic shared memory
// within what cudaFuncSetAttribute allowed), so the emulator runs the
// launchers' own code, not a copy of it.
#pragma once

#include <cuda_runtime_api.h>

#include <utility>

namespace cogkern {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
#if defined(COGKERN_CUDA_EMULATION)
  (void)stream;  // the emulator runs every launch to completion, in order
  return ::cuda_emu::launch_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem,
                                   [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace cogkern
