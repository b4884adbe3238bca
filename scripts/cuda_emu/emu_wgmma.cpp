// The wgmma conformance kernel (csrc/attention/flash/sm90/wgmma_selftest_kernel.cuh)
// under the emulator (cuda_emu_wgmma.h, cuda_emu_async.h), launched through its real
// host code (wgmma_selftest_launch.cu: device check, tensor maps, shared memory, the
// launch), behind a C API for run_emu.py.
#include "attention/flash/sm90/wgmma_selftest_launch.h"

// q, k, v: [64][head_dim] 16-bit (bf16 or fp16); s [64][64], o and u [64][head_dim] fp32.
// tma: load the tiles through TMA tensor maps. Returns the launch's error (0: none).
extern "C" int emu_wgmma_selftest(const void* q, const void* k, const void* v, float* s, float* o, float* u,
                                  int head_dim, int bf16, int tma) {
  return int(cogkern::sm90::launch_wgmma_selftest(q, k, v, s, o, u, head_dim, bf16 != 0, tma != 0, nullptr));
}
