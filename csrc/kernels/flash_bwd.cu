// Launcher and instantiations of the flash-attention backward (kernels:
// flash_bwd_kernel.cuh; on Hopper, opt-in, the key-tile kernel of
// flash_bwd_sm90.cu).
#include "kernels/flash_bwd_kernel.cuh"

namespace cogkern::flash {
namespace {

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t blocks, int threads, size_t smem, const FlashArgs& a,
                   cudaStream_t stream) {
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(blocks), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

template <typename T, int D>
cudaError_t run_flash_bwd(const FlashArgs& a, bool deterministic, cudaStream_t stream) {
  using C = BwdConfig<D>;
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  const int64_t bhs = a.batch * a.heads;
  const int64_t kv_blocks = bhs * ceil_div(a.seq, C::kBN);
  cudaError_t err;
  if (sm90_backward_enabled<T, D>()) {
    err = run_flash_bwd_kv_sm90<T, D>(a, !deterministic, stream);
  } else if (deterministic) {
    err = launch(flash_bwd_kv_kernel<T, D, C::kBM, C::kBN, C::kWarps, false>, kv_blocks, C::kWarps * kWarpSize,
                 bwd_kv_smem_bytes<T, D, false>(), a, stream);
  } else {
    err = launch(flash_bwd_kv_kernel<T, D, C::kBM, C::kBN, C::kWarps, true>, kv_blocks, C::kWarps * kWarpSize,
                 bwd_kv_smem_bytes<T, D, true>(), a, stream);
  }
  if (err != cudaSuccess || !deterministic) return err;
  return launch(flash_bwd_dq_kernel<T, D, C::kDqBM, C::kDqBN, C::kDqWarps>, bhs * ceil_div(a.seq, C::kDqBM),
                C::kDqWarps * kWarpSize, bwd_dq_smem_bytes<T, D>(), a, stream);
}

template cudaError_t run_flash_bwd<__half, 64>(const FlashArgs&, bool, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 128>(const FlashArgs&, bool, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 64>(const FlashArgs&, bool, cudaStream_t);
template cudaError_t run_flash_bwd<__nv_bfloat16, 128>(const FlashArgs&, bool, cudaStream_t);

}  // namespace cogkern::flash
