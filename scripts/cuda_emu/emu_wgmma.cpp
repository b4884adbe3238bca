// The wgmma conformance kernel (csrc/attention/flash/sm90/wgmma_selftest_kernel.cuh)
// under the emulator (cuda_emu_wgmma.h, cuda_emu_async.h), behind a C API for run_emu.py.
#include <stdexcept>

#include "attention/flash/sm90/wgmma_selftest_kernel.cuh"
#include "common/cuda/dispatch.cuh"

using namespace cogkern::sm90;

namespace {
template <typename T, int D>
void run(const uint16_t* q, const uint16_t* k, const uint16_t* v, float* s, float* o, float* u, bool tma) {
  alignas(128) SelftestMaps maps{};
  if (tma) {
    if (!make_selftest_maps<D>(q, k, v, &maps)) throw std::runtime_error("tensor maps refused");
    cuda_emu::launch(1, kWarpgroupThreads, selftest_smem_bytes(D),
                     [&] { wgmma_selftest_body<T, D, true>(q, k, v, s, o, u, maps, cuda_emu::dynamic_smem()); });
  } else {
    cuda_emu::launch(1, kWarpgroupThreads, selftest_smem_bytes(D),
                     [&] { wgmma_selftest_body<T, D, false>(q, k, v, s, o, u, maps, cuda_emu::dynamic_smem()); });
  }
}
}  // namespace

extern "C" int emu_wgmma_selftest(const uint16_t* q, const uint16_t* k, const uint16_t* v, float* s, float* o,
                                  float* u, int head_dim, int bf16, int tma) {
  return cogkern::switch_head_dim(head_dim, 1, [&]<int D>() {
    bf16 ? run<__nv_bfloat16, D>(q, k, v, s, o, u, tma) : run<__half, D>(q, k, v, s, o, u, tma);
    return 0;
  });
}
