// The host runtime calls the launchers make (csrc/**/*_launch.cu), emulated for
// one device whose properties run_emu.py chooses (an H100/H200 by default;
// an sm_89 part, with 99 KB of shared memory per block, to test the
// launchers' fallbacks). Launches check what the hardware checks: at most
// 1024 threads, 1-D grids (all cogkern uses), and dynamic shared memory above
// 48 KB only up to what cudaFuncSetAttribute allowed for that kernel, itself
// at most the device's opt-in limit. The C API is defined in emu_runtime.cpp,
// with the driver entry point the TMA tensor maps are encoded through
// (cuTensorMapEncodeTiled: the emulator's, cuda_emu_async.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>

namespace cuda_emu {

struct EmuDevice {
  int cc_major = 9, cc_minor = 0;
  int smem_per_block_optin = 227 * 1024;
  // A GPU of few SMs, each holding one resident block of any kernel
  // (cudaOccupancyMaxActiveBlocksPerMultiprocessor): launchers that size their
  // grid to fill the GPU (the optimizer's grid-stride kernels) launch fewer
  // blocks than there are work items, so the grid-stride loops run here.
  int multiprocessors = 3;
  int ptx_version = 90;  // of every kernel: the build's sm_90a code
};
EmuDevice& emu_device();

// Runs body as the kernel `kernel` over grid x block threads (cuda_emu::launch)
// after the launch-time checks; returns the launch's error, as cudaGetLastError would.
cudaError_t launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

}  // namespace cuda_emu

// The runtime's C++ overloads for kernel pointers (cuda_runtime.h, which nvcc includes).
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}
template <typename T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* entry, int block_size,
                                                                 size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(entry), block_size,
                                                         dynamic_smem);
}
