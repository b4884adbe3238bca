// The CUDA runtime calls of the launchers, emulated (cuda_emu_runtime.h).
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>

#include "cuda_emu_async.h"  // encode_tensor_map_tiled

namespace cuda_emu {
namespace {

std::mutex g_mu;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize, per kernel
constexpr int kDefaultDynamicSmem = 48 * 1024;  // without opting in

}  // namespace

EmuDevice& emu_device() {
  static EmuDevice device;
  return device;
}

cudaError_t launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  int allowed = kDefaultDynamicSmem;
  {
    const std::lock_guard<std::mutex> lock(g_mu);
    const auto it = g_max_dynamic_smem.find(kernel);
    if (it != g_max_dynamic_smem.end()) allowed = it->second;
  }
  if (threads == 0 || threads > 1024 || block.z != 1 || grid.x == 0 || grid.y != 1 || grid.z != 1 ||
      smem > size_t(allowed)) {
    std::fprintf(stderr,
                 "cuda_emu: launch refused (cudaErrorInvalidValue): grid (%u, %u, %u), block (%u, %u, %u), %zu bytes "
                 "of dynamic shared memory, %d allowed for this kernel\n",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, allowed);
    return cudaErrorInvalidValue;
  }
  launch(grid.x, block.x, block.y, smem, body);
  return cudaSuccess;
}

}  // namespace cuda_emu

extern "C" {

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > cuda_emu::emu_device().smem_per_block_optin) {
    std::fprintf(stderr, "cuda_emu: cudaFuncSetAttribute refused (cudaErrorInvalidValue): %d bytes of dynamic shared "
                 "memory, the device allows %d\n", value, cuda_emu::emu_device().smem_per_block_optin);
    return cudaErrorInvalidValue;
  }
  const std::lock_guard<std::mutex> lock(cuda_emu::g_mu);
  cuda_emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  std::memset(attr, 0, sizeof(*attr));
  attr->ptxVersion = attr->binaryVersion = cuda_emu::emu_device().ptx_version;
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const cuda_emu::EmuDevice& d = cuda_emu::emu_device();
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.multiprocessors; return cudaSuccess;
    default:
      std::fprintf(stderr, "cuda_emu: cudaDeviceGetAttribute(%d) is not emulated\n", int(attr));
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size, size_t) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  *blocks = 1;  // EmuDevice: one resident block per SM
  return cudaSuccess;
}

// The driver entry points the launchers look up: the TMA tensor-map encoder
// (csrc/common/cuda/sm90_tensor_map.h), which is the emulator's.
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  const bool found = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = found ? reinterpret_cast<void*>(&cuda_emu::encode_tensor_map_tiled) : nullptr;
  if (status != nullptr) *status = found ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() { return cudaSuccess; }  // launch errors are returned by launch_kernel

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

}  // extern "C"
