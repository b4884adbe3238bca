// The one seam between the CUDA sources and the CPU emulator. Kernels and
// launchers include this header, never the PTX wrappers themselves: on the GPU
// it includes the real-hardware wrappers below; under the emulator
// (scripts/cuda_emu, which compiles the kernels and launchers as host C++ with
// COGKERN_CUDA_EMULATION defined) it includes the emulator's, which provide
// the same names in the same namespaces:
//   cogkern::sm80   ElemTraits<T> (mma.sync), smem_addr, ldmatrix_x4[_trans],
//                   cp_async_16 / _commit / _wait, fast_exp2, opaque_lane
//   cogkern::sm90   wgmma (Wgmma<N, T>, wgmma_fence / _commit / _wait),
//                   fence_operands, fence_proxy_async_shared,
//                   store_for_async_proxy, mbarriers, TMA loads, bulk
//                   reductions, named barriers, setmaxnreg
//   cogkern         launch_kernel
//   COGKERN_DYNAMIC_SMEM(name)   the kernel's dynamic shared memory
//   COGKERN_SM90A_DEVICE_CODE    1 where sm_90a-only code may be compiled
//                                (sm_90a device code, and the emulator)
// Nothing else in csrc/ tests for the emulator.
#pragma once

#if defined(COGKERN_CUDA_EMULATION)
#include "cuda_emu_device.h"  // scripts/cuda_emu (on the emulator's include path)
#define COGKERN_SM90A_DEVICE_CODE 1
#else
#include "common/cuda/launch_kernel.cuh"
#include "common/cuda/ptx_sm80.cuh"
#include "common/cuda/ptx_sm90_async.cuh"
#include "common/cuda/ptx_sm90_wgmma.cuh"
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define COGKERN_SM90A_DEVICE_CODE 1
#else
#define COGKERN_SM90A_DEVICE_CODE 0
#endif
#endif
