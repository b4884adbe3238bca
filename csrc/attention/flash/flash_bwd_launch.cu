// Launcher and instantiations of the flash-attention backward (kernels:
// flash_bwd_kernel.cuh; on Hopper, opt-in, the key-tile kernel of
// flash_bwd_sm90_launch.cu).
#include "attention/flash/flash_bwd_kernel.cuh"
#include "attention/flash/flash_launch_kernel.cuh"

namespace cogkern::flash {

template <typename T, int D>
bool atomic_dq_fits() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return true;  // the launch reports the error
  return bwd_kv_smem_bytes<T, D, true>() <= size_t(optin);
}

template <typename T, int D>
cudaError_t run_flash_bwd(const FlashArgs& a, bool deterministic, cudaStream_t stream) {
  using C = BwdConfig<D>;
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  const int64_t bhs = a.batch * a.heads;
  const int64_t kv_blocks = bhs * ceil_div(a.seq, C::kBN);
  cudaError_t err;
  if (const int mode = sm90_backward_mode<T, D>()) {
    err = run_flash_bwd_kv_sm90<T, D>(a, mode, !deterministic, stream);
  } else if (deterministic) {
    err = launch_flash_kernel(flash_bwd_kv_kernel<T, D, C::kBM, C::kBN, C::kWarps, false>, kv_blocks,
                              C::kWarps * kWarpSize, bwd_kv_smem_bytes<T, D, false>(), a, stream);
  } else {
    err = launch_flash_kernel(flash_bwd_kv_kernel<T, D, C::kBM, C::kBN, C::kWarps, true>, kv_blocks,
                              C::kWarps * kWarpSize, bwd_kv_smem_bytes<T, D, true>(), a, stream);
  }
  if (err != cudaSuccess || !deterministic) return err;
  return launch_flash_kernel(flash_bwd_dq_kernel<T, D, C::kDqBM, C::kDqBN, C::kDqWarps>,
                             bhs * ceil_div(a.seq, C::kDqBM), C::kDqWarps * kWarpSize, bwd_dq_smem_bytes<T, D>(), a,
                             stream);
}

#define COGKERN_BWD_INSTANTIATE(T, D) \
  template bool atomic_dq_fits<T, D>();  \
  template cudaError_t run_flash_bwd<T, D>(const FlashArgs&, bool, cudaStream_t);
COGKERN_ATTENTION_CONFIGS(COGKERN_BWD_INSTANTIATE)
#undef COGKERN_BWD_INSTANTIATE

}  // namespace cogkern::flash
