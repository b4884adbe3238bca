// Launchers of the Hopper (wgmma) flash-attention backward key-tile kernels
// (flash_bwd_sm90_kernel.cuh, flash_bwd_sm90_ws_kernel.cuh). run_flash_bwd
// (flash_bwd_launch.cu) calls them instead of the mma.sync key-tile kernel when
// COGKERN_ATTENTION_SM90_BWD is 1 (two warpgroups per block), 2 (one, two
// blocks per SM) or 3 (warp-specialized, TMA) and the GPU and the build allow
// it; opt-in until validated on a GPU.
#include "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh"
#include "attention/flash/flash_launch_kernel.cuh"

namespace cogkern::flash {
namespace {

template <typename T, int D, int WARPGROUPS, bool ATOMIC_DQ>
__global__ void __launch_bounds__(Sm90BwdConfig<D, WARPGROUPS>::kThreads, Sm90BwdConfig<D, WARPGROUPS>::kMinBlocks)
    flash_bwd_sm90_kernel(const FlashArgs a) {
#if COGKERN_SM90A_DEVICE_CODE
  COGKERN_DYNAMIC_SMEM(smem);
  flash_bwd_sm90_body<T, D, WARPGROUPS, ATOMIC_DQ>(a, smem);
#else
  __trap();  // never launched: sm90_backward_mode() checks the code is sm_90a
#endif
}

template <typename T, int D, bool ATOMIC_DQ>
__global__ void __launch_bounds__(Sm90WsBwdConfig<D>::kThreads, 1)
    flash_bwd_sm90_ws_kernel(const FlashArgs a, const __grid_constant__ Sm90BwdMaps maps) {
#if COGKERN_SM90A_DEVICE_CODE
  COGKERN_DYNAMIC_SMEM(smem);
  flash_bwd_sm90_ws_body<T, D, ATOMIC_DQ>(a, maps, smem);
#else
  __trap();
#endif
}

template <typename T, int D, bool ATOMIC_DQ>
cudaError_t launch_ws(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90WsBwdConfig<D>;
  Sm90BwdMaps maps;
  if (!make_sm90_bwd_maps<D>(a, &maps)) return cudaErrorInvalidValue;
  return launch_flash_kernel(flash_bwd_sm90_ws_kernel<T, D, ATOMIC_DQ>, a.batch * a.heads * ceil_div(a.seq, C::kBN),
                             C::kThreads, sm90_ws_bwd_smem_bytes<D>(), a, stream, maps);
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
  return sm90_opt_in_mode("COGKERN_ATTENTION_SM90_BWD", 3, kSm90DefaultBackwardMode,
                          reinterpret_cast<const void*>(flash_bwd_sm90_kernel<T, D, 2, true>));
}

template <typename T, int D>
void retire_sm90_backward_mode(int mode) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  retire_sm90_mode(reinterpret_cast<const void*>(flash_bwd_sm90_kernel<T, D, 2, true>), device, mode);
}

template <typename T, int D>
cudaError_t run_flash_bwd_kv_sm90(const FlashArgs& a, int mode, bool atomic_dq, cudaStream_t stream) {
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  switch (mode) {
    case 1: return atomic_dq ? launch<T, D, 2, true>(a, stream) : launch<T, D, 2, false>(a, stream);
    case 2: return atomic_dq ? launch<T, D, 1, true>(a, stream) : launch<T, D, 1, false>(a, stream);
    case 3: return atomic_dq ? launch_ws<T, D, true>(a, stream) : launch_ws<T, D, false>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

#define COGKERN_SM90_BWD_INSTANTIATE(T, D) \
  template int sm90_backward_mode<T, D>();  \
  template void retire_sm90_backward_mode<T, D>(int); \
  template cudaError_t run_flash_bwd_kv_sm90<T, D>(const FlashArgs&, int, bool, cudaStream_t);
COGKERN_ATTENTION_CONFIGS(COGKERN_SM90_BWD_INSTANTIATE)
#undef COGKERN_SM90_BWD_INSTANTIATE

}  // namespace cogkern::flash
