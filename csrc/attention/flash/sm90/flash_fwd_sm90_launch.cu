// Launchers of the Hopper (wgmma) flash-attention forwards (kernels:
// flash_fwd_sm90_kernel.cuh, flash_fwd_sm90_ws_kernel.cuh). run_flash_fwd
// (flash_fwd_launch.cu) calls them instead of the mma.sync kernel when
// COGKERN_ATTENTION_SM90 is 1 (plain schedule), 2 (pipelined), 3
// (warp-specialized, TMA) or 4 (that with ping-pong between the consumer
// warpgroups) and the GPU and the build allow it; until they have
// been validated on a GPU they are opt-in.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <set>
#include <tuple>

#include "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh"
#include "attention/flash/flash_launch_kernel.cuh"

namespace cogkern::flash {
namespace {

template <typename T, int D, bool PIPELINED>
__global__ void __launch_bounds__(Sm90FwdConfig<D>::kThreads, 1) flash_fwd_sm90_kernel(const FlashArgs a) {
#if COGKERN_SM90A_DEVICE_CODE
  COGKERN_DYNAMIC_SMEM(smem);
  flash_fwd_sm90_body<T, D, PIPELINED>(a, smem);
#else
  __trap();  // never launched: sm90_forward_mode() checks the code is sm_90a
#endif
}

template <typename T, int D, bool PINGPONG>
__global__ void __launch_bounds__(Sm90WsFwdConfig<D>::kThreads, 1)
    flash_fwd_sm90_ws_kernel(const FlashArgs a, const __grid_constant__ Sm90FwdMaps maps) {
#if COGKERN_SM90A_DEVICE_CODE
  COGKERN_DYNAMIC_SMEM(smem);
  flash_fwd_sm90_ws_body<T, D, PINGPONG>(a, maps, smem);
#else
  __trap();
#endif
}

template <typename T, int D, bool PIPELINED>
cudaError_t launch(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90FwdConfig<D>;
  return launch_flash_kernel(flash_fwd_sm90_kernel<T, D, PIPELINED>, a.batch * a.heads * ceil_div(a.seq, C::kBM),
                             C::kThreads, sm90_fwd_smem_bytes<D, PIPELINED>(), a, stream);
}

template <typename T, int D, bool PINGPONG>
cudaError_t launch_ws(const FlashArgs& a, cudaStream_t stream) {
  using C = Sm90WsFwdConfig<D>;
  Sm90FwdMaps maps;
  if (!make_sm90_fwd_maps<D>(a, &maps)) return cudaErrorInvalidValue;
  return launch_flash_kernel(flash_fwd_sm90_ws_kernel<T, D, PINGPONG>, a.batch * a.heads * ceil_div(a.seq, C::kBM),
                             C::kThreads, sm90_ws_fwd_smem_bytes<D>(), a, stream, maps);
}

}  // namespace

namespace {
// The (kernel, device, mode) triples the guard retired. Read on every attention
// call: the flag keeps the common case (nothing retired) to one relaxed load.
std::atomic<bool> g_any_retired{false};
std::mutex g_retired_mutex;
std::set<std::tuple<const void*, int, int>> g_retired;

bool sm90_mode_retired(const void* kernel, int device, int mode) {
  if (!g_any_retired.load(std::memory_order_acquire)) return false;
  const std::lock_guard<std::mutex> lock(g_retired_mutex);
  return g_retired.count({kernel, device, mode}) != 0;
}
}  // namespace

void retire_sm90_mode(const void* kernel, int device, int mode) {
  const std::lock_guard<std::mutex> lock(g_retired_mutex);
  g_retired.insert({kernel, device, mode});
  g_any_retired.store(true, std::memory_order_release);
}

int sm90_opt_in_mode(const char* env_name, int max_mode, int default_mode, const void* kernel) {
  const char* env = std::getenv(env_name);
  const bool valid = env != nullptr && env[0] >= '0' && env[0] <= char('0' + max_mode) && env[1] == '\0';
  const int mode = valid ? env[0] - '0' : default_mode;
  if (mode == 0 || !kBuildHasSm90a) return 0;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0) return 0;
  // The device code must come from sm_90a: PTX of an older target, JIT-compiled
  // for this GPU, holds only the trap (and so does sm_90 code, which
  // kBuildHasSm90a rules out).
  if (sm90_mode_retired(kernel, device, mode)) return 0;
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 ? mode : 0;
}

template <typename T, int D>
int sm90_forward_mode() {
  return sm90_opt_in_mode("COGKERN_ATTENTION_SM90", 4, kSm90DefaultForwardMode,
                          reinterpret_cast<const void*>(flash_fwd_sm90_kernel<T, D, false>));
}

template <typename T, int D>
void retire_sm90_forward_mode(int mode) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  retire_sm90_mode(reinterpret_cast<const void*>(flash_fwd_sm90_kernel<T, D, false>), device, mode);
}

template <typename T, int D>
cudaError_t run_flash_fwd_sm90(const FlashArgs& a, int mode, cudaStream_t stream) {
  if (a.seq <= 0 || a.batch * a.heads <= 0) return cudaSuccess;
  switch (mode) {
    case 1: return launch<T, D, false>(a, stream);
    case 2: return launch<T, D, true>(a, stream);
    case 3: return launch_ws<T, D, false>(a, stream);
    case 4: return launch_ws<T, D, true>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

#define COGKERN_SM90_FWD_INSTANTIATE(T, D) \
  template int sm90_forward_mode<T, D>();  \
  template void retire_sm90_forward_mode<T, D>(int); \
  template cudaError_t run_flash_fwd_sm90<T, D>(const FlashArgs&, int, cudaStream_t);
COGKERN_ATTENTION_CONFIGS(COGKERN_SM90_FWD_INSTANTIATE)
#undef COGKERN_SM90_FWD_INSTANTIATE

}  // namespace cogkern::flash
