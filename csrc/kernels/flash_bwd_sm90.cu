// Launcher of the Hopper (wgmma) flash-attention backward key-tile kernel
// (flash_bwd_sm90_kernel.cuh). run_flash_bwd (flash_bwd.cu) calls it instead
// of the mma.sync key-tile kernel when COGKERN_ATTENTION_SM90_BWD=1 and the
// GPU and the build allow it; opt-in until validated on a GPU.
#include <cstdlib>
#include <cstring>

#include "kernels/flash_bwd_sm90_kernel.cuh"
#include "kernels/flash_kernel_launch.cuh"

namespace cogkern::flash {
namespace {

template <typename T, int D, bool ATOMIC_DQ>
__global__ void __launch_bounds__(Sm90BwdConfig<D>::kThreads, 1) flash_bwd_sm90_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem[];
  flash_bwd_sm90_body<T, D, ATOMIC_DQ>(a, smem);
#else
  __trap();  // never launched: sm90_backward_enabled() checks the code is sm_90a
#endif
}

template <typename T, int D, bool ATOMIC_DQ>
cudaError_t launch(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90BwdConfig<D>;
  return launch_flash_kernel(flash_bwd_sm90_kernel<T, D, ATOMIC_DQ>, a.batch * a.heads * ceil_div(a.seq, C::kBN),
                             C::kThreads, sm90_bwd_smem_bytes<D>(), a, stream);
}

}  // namespace

template <typename T, int D>
bool sm90_backward_enabled() {
  const char* env = std::getenv("COGKERN_ATTENTION_SM90_BWD");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  return sm90a_kernel_runs_here(reinterpret_cast<const void*>(flash_bwd_sm90_kernel<T, D, true>));
}

template <typename T, int D>
cudaError_t run_flash_bwd_kv_sm90(const FlashArgs& a, bool atomic_dq, cudaStream_t stream) {
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  return atomic_dq ? launch<T, D, true>(a, stream) : launch<T, D, false>(a, stream);
}

#define COGKERN_SM90_BWD_INSTANTIATE(T, D) \
  template bool sm90_backward_enabled<T, D>(); \
  template cudaError_t run_flash_bwd_kv_sm90<T, D>(const FlashArgs&, bool, cudaStream_t);
COGKERN_SM90_BWD_INSTANTIATE(__half, 64)
COGKERN_SM90_BWD_INSTANTIATE(__half, 128)
COGKERN_SM90_BWD_INSTANTIATE(__nv_bfloat16, 64)
COGKERN_SM90_BWD_INSTANTIATE(__nv_bfloat16, 128)
#undef COGKERN_SM90_BWD_INSTANTIATE

}  // namespace cogkern::flash
