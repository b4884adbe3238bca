// Launcher of the wgmma conformance kernel (tiles loaded with ordinary
// loads, or with TMA). The kernel body exists only in
// sm_90a code (wgmma); other targets get a trap, and the host refuses to
// launch on anything but compute capability 9.0.
#include "attention/flash/sm90/wgmma_selftest_launch.h"
#include "attention/flash/sm90/wgmma_selftest_kernel.cuh"
#include "common/cuda/dispatch.cuh"

namespace cogkern::sm90 {
namespace {

template <typename T, int D, bool TMA>
__global__ void __launch_bounds__(kWarpgroupThreads, 1)
    wgmma_selftest_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, float* s, float* o, float* u,
                          const __grid_constant__ SelftestMaps maps) {
#if COGKERN_SM90A_DEVICE_CODE
  COGKERN_DYNAMIC_SMEM(smem);
  wgmma_selftest_body<T, D, TMA>(q, k, v, s, o, u, maps, smem);
#else
  __trap();
#endif
}

template <typename T, int D, bool TMA>
cudaError_t launch_typed(const void* q, const void* k, const void* v, float* s, float* o, float* u,
                         cudaStream_t stream) {
  constexpr int smem = selftest_smem_bytes(D);
  auto kernel = wgmma_selftest_kernel<T, D, TMA>;
  SelftestMaps maps{};
  if (TMA && !make_selftest_maps<D>(q, k, v, &maps)) return cudaErrorInvalidValue;
  // The device code must come from sm_90a (wgmma): PTX of an older target,
  // JIT-compiled for this GPU, holds only the trap, and so does sm_90 code,
  // which reports the same PTX version (hence the build's own word).
#if !defined(COGKERN_BUILD_HAS_SM90A) || !COGKERN_BUILD_HAS_SM90A
  return cudaErrorInvalidDeviceFunction;
#endif
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.ptxVersion < 90) return cudaErrorInvalidDeviceFunction;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(kernel, dim3(1), dim3(kWarpgroupThreads), smem, stream, static_cast<const uint16_t*>(q),
                       static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), s, o, u, maps);
}

template <int D>
cudaError_t launch_dim(const void* q, const void* k, const void* v, float* s, float* o, float* u, bool bf16, bool tma,
                       cudaStream_t stream) {
  if (tma)
    return bf16 ? launch_typed<__nv_bfloat16, D, true>(q, k, v, s, o, u, stream)
                : launch_typed<__half, D, true>(q, k, v, s, o, u, stream);
  return bf16 ? launch_typed<__nv_bfloat16, D, false>(q, k, v, s, o, u, stream)
              : launch_typed<__half, D, false>(q, k, v, s, o, u, stream);
}

}  // namespace

cudaError_t launch_wgmma_selftest(const void* q, const void* k, const void* v, float* s, float* o, float* u,
                                  int head_dim, bool bf16, bool tma, cudaStream_t stream) {
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0) return cudaErrorInvalidDeviceFunction;
  return switch_head_dim(head_dim, cudaErrorInvalidValue,
                         [&]<int D>() { return launch_dim<D>(q, k, v, s, o, u, bf16, tma, stream); });
}

}  // namespace cogkern::sm90
