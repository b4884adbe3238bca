// Internal interface between the attention orchestration
// (attention_launch.cu) and the tensor-core flash kernels (flash_fwd_launch.cu,
// flash_bwd_launch.cu). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/attention_math.h"
#include "attention/attention_launch.h"
#include "common/cuda/dispatch.cuh"  // COGKERN_ATTENTION_CONFIGS: the explicit instantiations

namespace cogkern::flash {

struct FlashArgs {
  int64_t batch = 0, heads = 0, seq = 0;
  // q^ = R(norm(q)) and k^ = R(norm(k)) from the prologue: [batch, heads, seq,
  // head_dim] contiguous, in the input dtype.
  const void* q_hat = nullptr;
  const void* k_hat = nullptr;
  // v (and, backward, grad_out): [batch, seq, heads, head_dim] views whose rows
  // start on 16-byte boundaries (base 16-byte aligned, strides multiples of 8).
  BshdTensor v;
  float scale = 1.f;       // softmax scale
  float scale_log2 = 1.f;  // scale * log2(e): exp(scale * x) = exp2(x * scale_log2)
  bool causal = false;
  float* lse = nullptr;    // [batch, heads, seq]: written by the forward, read by the backward

  // Forward.
  BshdTensorMut out;  // rows 4-byte aligned (element pairs are stored as one word)

  // Backward.
  BshdTensor grad_out;
  const float* delta = nullptr;  // [batch, heads, seq]: rowsum(dO * O) - dlse
  float* dq_hat = nullptr;       // [batch, heads, seq, head_dim]: dL/dq^ (zeroed by the caller unless deterministic)
  float* dk_hat = nullptr;       // [batch, heads, seq, head_dim]: dL/dk^
  BshdTensorMut grad_v;          // rows 4-byte aligned
};

// The flash kernels' view of one attention call: q^, k^ and the fp32 gradients
// live in the scratch; v, out, lse and the other gradients are the op's own.
inline FlashArgs flash_args(const AttentionParams& P, const AttentionScratch& s) {
  FlashArgs a;
  a.batch = P.batch;
  a.heads = P.heads;
  a.seq = P.seq;
  a.q_hat = s.q_hat;
  a.k_hat = s.k_hat;
  a.v = P.v;
  a.scale = float(P.scale);
  a.scale_log2 = softmax_log2_scale<float>(P.scale);
  a.causal = P.causal;
  a.lse = static_cast<float*>(P.lse);
  a.out = P.out;
  a.grad_out = P.grad_out;
  a.delta = s.delta;
  a.dq_hat = s.dq_hat;
  a.dk_hat = s.dk_hat;
  a.grad_v = P.grad_v;
  return a;
}

// T, D: a pair of common/dispatch.h's lists (COGKERN_ATTENTION_CONFIGS).
template <typename T, int D>
cudaError_t run_flash_fwd(const FlashArgs& a, cudaStream_t stream);

// The Hopper (wgmma) forwards, sm90/flash_fwd_sm90_launch.cu. sm90_forward_mode(): 0 (use
// the mma.sync kernel), 1 (plain schedule), 2 (pipelined), 3 (pipelined,
// warp-specialized with TMA loads) or 4 (3 with ping-pong), from COGKERN_ATTENTION_SM90 (opt-in until
// validated on a GPU), and only on a compute capability 9.0 device with sm_90a
// code in the build. run_flash_fwd_sm90 fails with cudaErrorInvalidValue when
// the tensor maps of modes 3 and 4 cannot be made.
template <typename T, int D>
int sm90_forward_mode();
template <typename T, int D>
cudaError_t run_flash_fwd_sm90(const FlashArgs& a, int mode, cudaStream_t stream);

// deterministic: dq^ by a second, query-parallel kernel instead of atomics.
template <typename T, int D>
cudaError_t run_flash_bwd(const FlashArgs& a, bool deterministic, cudaStream_t stream);

// Whether the backward may take the atomic-dq^ path on the current device. Not
// at D = 128 on GPUs with 99 KB of shared memory per block (sm_86 / sm_89:
// RTX 30xx / 40xx, A10, L4, L40): the mma.sync atomic kernel needs 104.5 KB
// there. The caller then asks for the deterministic path (96.5 KB, then the
// dq^ kernel): the same result, bitwise reproducible.
template <typename T, int D>
bool atomic_dq_fits();

// The Hopper (wgmma) backward key-tile kernels, flash_bwd_sm90_launch.cu, which
// run_flash_bwd uses instead of the mma.sync one when sm90_backward_mode() is
// not 0: COGKERN_ATTENTION_SM90_BWD=1 (two warpgroups per block), 2 (one
// warpgroup per block, two blocks per SM) or 3 (warp-specialized: a TMA
// producer and two math warpgroups), opt-in until validated on a GPU,
// on a compute capability 9.0 device with sm_90a code in the build.
// atomic_dq: it also adds dq^ (atomics); otherwise only dv and dk^.
template <typename T, int D>
int sm90_backward_mode();
template <typename T, int D>
cudaError_t run_flash_bwd_kv_sm90(const FlashArgs& a, int mode, bool atomic_dq, cudaStream_t stream);

// The Hopper kernels that run when their switch is unset (or holds anything
// but 0 .. max_mode): 0, the mma.sync ones, until a GPU run has validated and
// timed the wgmma ones (benchmarks/RESULTS.md; flip these, the default-kernel
// test and the README together).
constexpr int kSm90DefaultForwardMode = 0;
constexpr int kSm90DefaultBackwardMode = 0;

// Whether the build holds sm_90a code (CMake sets it from TORCH_CUDA_ARCH_LIST):
// a device can't tell sm_90 code, where the Hopper kernels are a trap, from
// sm_90a code (both report PTX version 90).
#ifndef COGKERN_BUILD_HAS_SM90A
#define COGKERN_BUILD_HAS_SM90A 0
#endif
constexpr bool kBuildHasSm90a = COGKERN_BUILD_HAS_SM90A != 0;

// The kernel mode the switch env_name selects: its value when it is one digit
// 0 .. max_mode, else default_mode; then 0 (mma.sync) unless the build holds
// sm_90a code, the current device is compute capability 9.0 and `kernel` (a
// __global__ function) was not JIT-compiled from older PTX. Shared by
// sm90_forward_mode and sm90_backward_mode.
int sm90_opt_in_mode(const char* env_name, int max_mode, int default_mode, const void* kernel);

// The first-use guard (python/cogkern/_guard.py) retires a Hopper mode that
// failed its check on a device: from then on sm90_opt_in_mode answers 0
// (mma.sync) where it would have answered that mode, for that kernel family
// (`kernel`, as passed to sm90_opt_in_mode) on that device. Process-wide; never undone.
void retire_sm90_mode(const void* kernel, int device, int mode);
template <typename T, int D>
void retire_sm90_forward_mode(int mode);  // on the current device
template <typename T, int D>
void retire_sm90_backward_mode(int mode);

}  // namespace cogkern::flash
