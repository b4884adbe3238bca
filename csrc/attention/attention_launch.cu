// CUDA fused attention: the per-row stages around the flash kernels, and the
// host orchestration.
//
// Forward:  prologue (q^ = R(norm(q)), k^ = R(norm(k)) into [B, H, S, D]
//           scratch in the input dtype) -> flash_fwd (out, lse).
// Backward: prologue again (q^, k^ recomputed exactly as in the forward, plus
//           delta = rowsum(dO * O) - dlse) -> flash_bwd (dv, and dq^, dk^ in
//           fp32) -> epilogue (dq^, dk^ through R^T and the norm backward into
//           dq, dk; per-block partial sums of the norm parameter grads) ->
//           a fixed-order reduction of those partials.
// The norm, RoPE and softmax formulas are the shared ones of attention_math.h and
// rope3d_math.h (the CPU backend runs the same functions). Kernels: attention_row_kernels.cuh.
#include "attention/attention_row_kernels.cuh"
#include "attention/flash/flash_params.h"
#include "common/cuda/device_seam.h"  // launch_kernel
#include "common/cuda/dispatch.cuh"

namespace cogkern {
namespace {

using rows::kRowThreads;
using rows::kTokens;
using rows::attention_prologue_kernel;
using rows::attention_epilogue_kernel;
using rows::norm_grad_reduce_kernel;

bool rows_aligned(const void* ptr, int64_t sb, int64_t ss, int64_t sh, int64_t elem_bytes, int64_t align) {
  const int64_t elems = align / elem_bytes;
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(align) == 0 && sb % elems == 0 && ss % elems == 0 &&
         sh % elems == 0;
}

template <typename T, int D>
cudaError_t forward_typed(const AttentionParams& P, const AttentionScratch& s, cudaStream_t stream) {
  if (!rows_aligned(P.out.ptr, P.out.stride_b, P.out.stride_s, P.out.stride_h, sizeof(T), 4))
    return cudaErrorMisalignedAddress;
  const unsigned blocks = unsigned(ceil_div(P.seq, kTokens));
  const bool table_in_dtype = P.has_rope && P.rope.mode == RopeMode::kTable && P.rope_table_dtype != DType::kFloat;
  const cudaError_t err =
      table_in_dtype ? launch_kernel(attention_prologue_kernel<T, T, D, false>, blocks, kRowThreads, 0, stream, P, s)
                     : launch_kernel(attention_prologue_kernel<T, float, D, false>, blocks, kRowThreads, 0, stream, P, s);
  if (err != cudaSuccess) return err;
  return flash::run_flash_fwd<T, D>(flash::flash_args(P, s), stream);
}

template <typename T, int D>
cudaError_t backward_typed(const AttentionParams& P, const AttentionScratch& s, bool deterministic,
                           cudaStream_t stream) {
  if (!rows_aligned(P.grad_v.ptr, P.grad_v.stride_b, P.grad_v.stride_s, P.grad_v.stride_h, sizeof(T), 4))
    return cudaErrorMisalignedAddress;
  const int64_t n_blocks = ceil_div(P.seq, kTokens);
  const bool table_in_dtype = P.has_rope && P.rope.mode == RopeMode::kTable && P.rope_table_dtype != DType::kFloat;
  const unsigned blocks = unsigned(n_blocks);
  cudaError_t err =
      table_in_dtype ? launch_kernel(attention_prologue_kernel<T, T, D, true>, blocks, kRowThreads, 0, stream, P, s)
                     : launch_kernel(attention_prologue_kernel<T, float, D, true>, blocks, kRowThreads, 0, stream, P, s);
  if (err != cudaSuccess) return err;

  // [mut:atomic-dq-fits]
  if (!deterministic && !flash::atomic_dq_fits<T, D>()) deterministic = true;  // sm_86 / sm_89 at D = 128
  if (!deterministic) {
    err = cudaMemsetAsync(s.dq_hat, 0, size_t(P.batch * P.heads * P.seq * D) * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  err = flash::run_flash_bwd<T, D>(flash::flash_args(P, s), deterministic, stream);
  if (err != cudaSuccess) return err;

  err = table_in_dtype ? launch_kernel(attention_epilogue_kernel<T, T, D>, blocks, kRowThreads, 0, stream, P, s)
                       : launch_kernel(attention_epilogue_kernel<T, float, D>, blocks, kRowThreads, 0, stream, P, s);
  if (err != cudaSuccess || P.norm == NormKind::kNone) return err;
  return launch_kernel(norm_grad_reduce_kernel<D>, 4 * D, 256, 0, stream, P, s.norm_partials, n_blocks);
}

bool empty_problem(const AttentionParams& P) { return P.batch <= 0 || P.seq <= 0 || P.heads <= 0; }

}  // namespace

int64_t attention_norm_partial_blocks(const AttentionParams& P) { return ceil_div(P.seq, kTokens); }

bool attention_rows_loadable(const BshdTensor& t, const AttentionParams& P) {
  // TMA tensor maps (the warp-specialized Hopper kernels) step along every
  // dimension by its stride: an expanded dimension (stride 0) is not one they take.
  const bool expanded = (P.batch > 1 && t.stride_b == 0) || (P.seq > 1 && t.stride_s == 0) ||
                        (P.heads > 1 && t.stride_h == 0);
  return !expanded && rows_aligned(t.ptr, t.stride_b, t.stride_s, t.stride_h, /*fp16 or bf16*/ 2, 16);
}

cudaError_t attention_kernel_modes(DType dtype, int64_t head_dim, int* forward, int* backward) {
  return switch_attention_config(dtype, head_dim, cudaErrorInvalidValue, [&]<typename T, int D>() {
    *forward = flash::sm90_forward_mode<T, D>();
    *backward = flash::sm90_backward_mode<T, D>();
    return cudaSuccess;
  });
}

cudaError_t retire_attention_kernel_mode(DType dtype, int64_t head_dim, bool backward, int mode) {
  return switch_attention_config(dtype, head_dim, cudaErrorInvalidValue, [&]<typename T, int D>() {
    if (backward) {
      flash::retire_sm90_backward_mode<T, D>(mode);
    } else {
      flash::retire_sm90_forward_mode<T, D>(mode);
    }
    return cudaSuccess;
  });
}

cudaError_t launch_attention_forward(const AttentionParams& P, const AttentionScratch& scratch, cudaStream_t stream) {
  if (!attention_cuda_supported(P.dtype, P.head_dim)) return cudaErrorInvalidValue;
  if (empty_problem(P)) return cudaSuccess;
  if (!attention_rows_loadable(P.v, P)) return cudaErrorMisalignedAddress;
  return switch_attention_config(P.dtype, P.head_dim, cudaErrorInvalidValue,
                                 [&]<typename T, int D>() { return forward_typed<T, D>(P, scratch, stream); });
}

cudaError_t launch_attention_backward(const AttentionParams& P, const AttentionScratch& scratch, bool deterministic,
                                      cudaStream_t stream) {
  if (!attention_cuda_supported(P.dtype, P.head_dim)) return cudaErrorInvalidValue;
  if (empty_problem(P)) return cudaSuccess;
  if (!attention_rows_loadable(P.v, P) || !attention_rows_loadable(P.grad_out, P)) return cudaErrorMisalignedAddress;
  if (P.norm != NormKind::kNone && scratch.norm_partials == nullptr) return cudaErrorInvalidValue;
  return switch_attention_config(P.dtype, P.head_dim, cudaErrorInvalidValue, [&]<typename T, int D>() {
    return backward_typed<T, D>(P, scratch, deterministic, stream);
  });
}

}  // namespace cogkern
