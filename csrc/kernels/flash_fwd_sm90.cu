// Launchers of the Hopper (wgmma) flash-attention forward (kernel:
// flash_fwd_sm90_kernel.cuh). run_flash_fwd (flash_fwd.cu) calls them instead
// of the mma.sync kernel when COGKERN_ATTENTION_SM90 is 1 (plain schedule) or
// 2 (pipelined) and the GPU and the build allow it; until they have been
// validated on a GPU they are opt-in.
#include <cstdlib>
#include <cstring>

#include "kernels/flash_fwd_sm90_kernel.cuh"
#include "kernels/flash_kernel_launch.cuh"

namespace cogkern::flash {
namespace {

template <typename T, int D, bool PIPELINED>
__global__ void __launch_bounds__(Sm90FwdConfig<D>::kThreads, 1) flash_fwd_sm90_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem[];
  flash_fwd_sm90_body<T, D, PIPELINED>(a, smem);
#else
  __trap();  // never launched: sm90_forward_mode() checks the code is sm_90a
#endif
}

template <typename T, int D, bool PIPELINED>
cudaError_t launch(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90FwdConfig<D>;
  return launch_flash_kernel(flash_fwd_sm90_kernel<T, D, PIPELINED>, a.batch * a.heads * ceil_div(a.seq, C::kBM),
                             C::kThreads, sm90_fwd_smem_bytes<D, PIPELINED>(), a, stream);
}

}  // namespace

int sm90_opt_in_mode(const char* env_name, const void* kernel) {
  const char* env = std::getenv(env_name);
  if (env == nullptr) return 0;
  const int mode = std::strcmp(env, "1") == 0 ? 1 : std::strcmp(env, "2") == 0 ? 2 : 0;
  if (mode == 0) return 0;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0) return 0;
  // The device code must come from sm_90a: PTX of an older target, JIT-compiled
  // for this GPU, holds only the trap.
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 ? mode : 0;
}

template <typename T, int D>
int sm90_forward_mode() {
  return sm90_opt_in_mode("COGKERN_ATTENTION_SM90", reinterpret_cast<const void*>(flash_fwd_sm90_kernel<T, D, false>));
}

template <typename T, int D>
cudaError_t run_flash_fwd_sm90(const FlashArgs& a, bool pipelined, cudaStream_t stream) {
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  return pipelined ? launch<T, D, true>(a, stream) : launch<T, D, false>(a, stream);
}

#define COGKERN_SM90_FWD_INSTANTIATE(T, D) \
  template int sm90_forward_mode<T, D>();  \
  template cudaError_t run_flash_fwd_sm90<T, D>(const FlashArgs&, bool, cudaStream_t);
COGKERN_SM90_FWD_INSTANTIATE(__half, 64)
COGKERN_SM90_FWD_INSTANTIATE(__half, 128)
COGKERN_SM90_FWD_INSTANTIATE(__nv_bfloat16, 64)
COGKERN_SM90_FWD_INSTANTIATE(__nv_bfloat16, 128)
#undef COGKERN_SM90_FWD_INSTANTIATE

}  // namespace cogkern::flash
