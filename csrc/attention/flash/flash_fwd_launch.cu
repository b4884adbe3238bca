// Launcher and instantiations of the flash-attention forward (kernel:
// flash_fwd_kernel.cuh).
#include "attention/flash/flash_fwd_kernel.cuh"
#include "attention/flash/flash_launch_kernel.cuh"

namespace cogkern::flash {

template <typename T, int D>
cudaError_t run_flash_fwd(const FlashArgs& a, cudaStream_t stream) {
  using C = FwdConfig<D>;
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  if (const int mode = sm90_forward_mode<T, D>()) return run_flash_fwd_sm90<T, D>(a, mode, stream);
  return launch_flash_kernel(flash_fwd_kernel<T, D, C::kBM, C::kBN, C::kWarps>,  // [mut:fwd-grid]
                             a.batch * a.heads * ceil_div(a.seq, C::kBM), C::kWarps * kWarpSize, fwd_smem_bytes<T, D>(),
                             a, stream);
}

#define COGKERN_FWD_INSTANTIATE(T, D) template cudaError_t run_flash_fwd<T, D>(const FlashArgs&, cudaStream_t);
COGKERN_ATTENTION_CONFIGS(COGKERN_FWD_INSTANTIATE)
#undef COGKERN_FWD_INSTANTIATE

}  // namespace cogkern::flash
