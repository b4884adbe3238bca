// Launcher of the Hopper (wgmma) flash-attention forward (kernel:
// flash_fwd_sm90_kernel.cuh). run_flash_fwd (flash_fwd.cu) calls it instead
// of the mma.sync kernel when COGKERN_ATTENTION_SM90=1 and the GPU and the
// build allow it; until it has been validated on a GPU it is opt-in.
#include <cstdlib>
#include <cstring>

#include "kernels/flash_fwd_sm90_kernel.cuh"

namespace cogkern::flash {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(Sm90FwdConfig<D>::kThreads, 1) flash_fwd_sm90_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem[];
  flash_fwd_sm90_body<T, D>(a, smem);
#else
  __trap();  // never launched: sm90_forward_available() checks the code is sm_90a
#endif
}

}  // namespace

template <typename T, int D>
bool sm90_forward_available() {
  const char* env = std::getenv("COGKERN_ATTENTION_SM90");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0) return false;
  // The device code must come from sm_90a: PTX of an older target, JIT-compiled
  // for this GPU, holds only the trap.
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, flash_fwd_sm90_kernel<T, D>) == cudaSuccess && attr.ptxVersion >= 90;
}

template <typename T, int D>
cudaError_t run_flash_fwd_sm90(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90FwdConfig<D>;
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  const int64_t blocks = a.batch * a.heads * ceil_div(a.seq, C::kBM);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  constexpr size_t smem = sm90_fwd_smem_bytes<D>();
  auto kernel = flash_fwd_sm90_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), C::kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

#define COGKERN_SM90_FWD_INSTANTIATE(T, D)                                   \
  template bool sm90_forward_available<T, D>();                              \
  template cudaError_t run_flash_fwd_sm90<T, D>(const FlashArgs&, cudaStream_t);
COGKERN_SM90_FWD_INSTANTIATE(__half, 64)
COGKERN_SM90_FWD_INSTANTIATE(__half, 128)
COGKERN_SM90_FWD_INSTANTIATE(__nv_bfloat16, 64)
COGKERN_SM90_FWD_INSTANTIATE(__nv_bfloat16, 128)
#undef COGKERN_SM90_FWD_INSTANTIATE

}  // namespace cogkern::flash
