// Launcher of the Hopper (wgmma) flash-attention backward key-tile kernel
// (flash_bwd_sm90_kernel.cuh). run_flash_bwd (flash_bwd.cu) calls it instead
// of the mma.sync key-tile kernel when COGKERN_ATTENTION_SM90_BWD is 1 (two
// warpgroups per block) or 2 (one, two blocks per SM) and the GPU and the
// build allow it; opt-in until validated on a GPU.
#include "kernels/flash_bwd_sm90_kernel.cuh"
#include "kernels/flash_kernel_launch.cuh"

namespace cogkern::flash {
namespace {

template <typename T, int D, int WARPGROUPS, bool ATOMIC_DQ>
__global__ void __launch_bounds__(Sm90BwdConfig<D, WARPGROUPS>::kThreads, Sm90BwdConfig<D, WARPGROUPS>::kMinBlocks)
    flash_bwd_sm90_kernel(const FlashArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem[];
  flash_bwd_sm90_body<T, D, WARPGROUPS, ATOMIC_DQ>(a, smem);
#else
  __trap();  // never launched: sm90_backward_mode() checks the code is sm_90a
#endif
}

template <typename T, int D, int WARPGROUPS, bool ATOMIC_DQ>
cudaError_t launch(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90BwdConfig<D, WARPGROUPS>;
  return launch_flash_kernel(flash_bwd_sm90_kernel<T, D, WARPGROUPS, ATOMIC_DQ>,
                             a.batch * a.heads * ceil_div(a.seq, C::kBN), C::kThreads,
                             sm90_bwd_smem_bytes<D, WARPGROUPS>(), a, stream);
}

}  // namespace

template <typename T, int D>
int sm90_backward_mode() {
  return sm90_opt_in_mode("COGKERN_ATTENTION_SM90_BWD", 2,
                          reinterpret_cast<const void*>(flash_bwd_sm90_kernel<T, D, 2, true>));
}

template <typename T, int D>
cudaError_t run_flash_bwd_kv_sm90(const FlashArgs& a, int mode, bool atomic_dq, cudaStream_t stream) {
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  if (mode == 2) return atomic_dq ? launch<T, D, 1, true>(a, stream) : launch<T, D, 1, false>(a, stream);
  return atomic_dq ? launch<T, D, 2, true>(a, stream) : launch<T, D, 2, false>(a, stream);
}

#define COGKERN_SM90_BWD_INSTANTIATE(T, D) \
  template int sm90_backward_mode<T, D>();  \
  template cudaError_t run_flash_bwd_kv_sm90<T, D>(const FlashArgs&, int, bool, cudaStream_t);
COGKERN_SM90_BWD_INSTANTIATE(__half, 64)
COGKERN_SM90_BWD_INSTANTIATE(__half, 128)
COGKERN_SM90_BWD_INSTANTIATE(__nv_bfloat16, 64)
COGKERN_SM90_BWD_INSTANTIATE(__nv_bfloat16, 128)
#undef COGKERN_SM90_BWD_INSTANTIATE

}  // namespace cogkern::flash
