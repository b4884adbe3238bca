// Schemas of the fused attention ops and their CPU registration. A CUDA
// backend registers the same schemas in attention_op_cuda.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "attention/attention_cpu.h"
#include "attention/attention_op.h"

namespace cogkern::ops {
namespace {

struct CpuBackend {
  static void check_supported(const char*, const AttentionParams&) {}  // any head_dim, any dtype
  static void forward(const AttentionParams& P, const at::Tensor&) { cpu::attention_forward(P); }
  static void backward(const AttentionParams& P, const at::Tensor&) { cpu::attention_backward(P); }
};
using CpuAttention = AttentionOps<CpuBackend>;

}  // namespace

// The arguments after v, shared by both ops:
//   qk_norm: 'none' | 'layer_norm' | 'rms_norm', per head over head_dim, on q and k;
//   the four norm parameters are optional (absent = weight 1 / bias 0);
//   RoPE on the tokens after text_len, either by angles (rope_grid = [T, H, W],
//   rope_axes_dims, rope_theta, rope_interleaved, optional rope_positions; an
//   empty rope_grid means none) or by diffusers' (rope_cos, rope_sin) tables.
// fused_attention_fwd returns out (batch, seq, heads, head_dim) in q's dtype
// and lse (batch, heads, seq) in the math type (float32; float64 for float64).
// fused_attention_bwd returns grads of q, k, v and of the four norm
// parameters (an empty tensor for an absent parameter).
#define COGKERN_ATTENTION_ARGS                                                                                 \
  "str qk_norm, Tensor? q_norm_weight, Tensor? q_norm_bias, Tensor? k_norm_weight, Tensor? k_norm_bias, "     \
  "float norm_eps, Tensor? rope_positions, int[] rope_grid, int[] rope_axes_dims, float rope_theta, "         \
  "bool rope_interleaved, Tensor? rope_cos, Tensor? rope_sin, int text_len, float scale, bool causal"

TORCH_LIBRARY_FRAGMENT(cogkern, m) {
  m.def("fused_attention_fwd(Tensor q, Tensor k, Tensor v, " COGKERN_ATTENTION_ARGS ") -> (Tensor out, Tensor lse)");
  m.def("fused_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, " COGKERN_ATTENTION_ARGS
        ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_norm_weight, Tensor grad_q_norm_bias, "
        "Tensor grad_k_norm_weight, Tensor grad_k_norm_bias)");
}

#undef COGKERN_ATTENTION_ARGS

TORCH_LIBRARY_IMPL(cogkern, CPU, m) {
  m.impl("fused_attention_fwd", &CpuAttention::fwd);
  m.impl("fused_attention_bwd", &CpuAttention::bwd);
}

}  // namespace cogkern::ops
