// Host entry points of the CUDA fused attention (attention_launch.cu and
// the flash kernels). Torch-free: the caller allocates the scratch buffers.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/attention_math.h"
#include "common/dispatch.h"  // attention_cuda_supported: the listed dtypes and head dims

namespace cogkern {

// Device buffers the CUDA attention works in (all contiguous).
struct AttentionScratch {
  void* q_hat = nullptr;  // [batch, heads, seq, head_dim], input dtype: R(norm(q))
  void* k_hat = nullptr;  // [batch, heads, seq, head_dim], input dtype: R(norm(k))
  // Backward only.
  float* delta = nullptr;          // [batch, heads, seq]
  float* dq_hat = nullptr;         // [batch, heads, seq, head_dim]
  float* dk_hat = nullptr;         // [batch, heads, seq, head_dim]
  float* norm_partials = nullptr;  // [4 * head_dim * attention_norm_partial_blocks(P)] when P.norm != kNone
};

// Number of per-block partial sums of the norm parameter grads the backward
// writes (deterministic two-pass reduction).
int64_t attention_norm_partial_blocks(const AttentionParams& P);

// Whether the kernels can load t (P's shape and dtype) as it is: every
// [batch, seq, heads] row starts on a 16-byte boundary (16-byte tile loads),
// and no dimension of size > 1 has stride 0 (TMA tensor maps). Else the
// caller passes a contiguous copy.
bool attention_rows_loadable(const BshdTensor& t, const AttentionParams& P);

// Forward: writes P.out and P.lse (float). P.v must satisfy attention_rows_loadable.
cudaError_t launch_attention_forward(const AttentionParams& P, const AttentionScratch& scratch, cudaStream_t stream);

// Backward: writes P.grad_q, grad_k, grad_v and the norm parameter grads
// (float, overwritten). P.v and P.grad_out must satisfy attention_rows_loadable.
// deterministic: bitwise reproducible (dq^ without atomics, at the cost of
// recomputing the scores in a second kernel).
cudaError_t launch_attention_backward(const AttentionParams& P, const AttentionScratch& scratch, bool deterministic,
                                      cudaStream_t stream);

// The kernels launch_attention_forward / _backward pick for this dtype and
// head dim on the current device, from the build and COGKERN_ATTENTION_SM90 /
// COGKERN_ATTENTION_SM90_BWD. forward: 0 mma.sync, 1 wgmma (plain), 2 wgmma
// (pipelined); backward: 0 mma.sync, 1 wgmma (two warpgroups per block),
// 2 wgmma (one). cudaErrorInvalidValue for an unsupported dtype / head dim.
cudaError_t attention_kernel_modes(DType dtype, int64_t head_dim, int* forward, int* backward);

// Retires a Hopper kernel mode (1.. as above) of one direction for this dtype
// and head dim on the current device, after it failed the first-use guard's
// check: attention_kernel_modes and the launches then use mma.sync instead.
cudaError_t retire_attention_kernel_mode(DType dtype, int64_t head_dim, bool backward, int mode);

}  // namespace cogkern
