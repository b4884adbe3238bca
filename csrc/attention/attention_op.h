// The fused attention ops (cogkern::fused_attention_fwd / _bwd): argument
// checks, parameter packing and the op bodies, templated over the backend so
// that the CPU registration (attention_op.cpp) and a CUDA one
// (attention_op_cuda.cpp) share one definition. Checks raise ValueError
// naming the argument, before any kernel runs.
#pragma once

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

#include "attention/attention_math.h"
#include "common/torch/glue.h"
#include "rope3d/rope3d_op.h"

namespace cogkern::ops {

// The arguments both ops share, as the schema passes them.
struct AttentionArgs {
  std::string_view qk_norm;
  const std::optional<at::Tensor>& q_norm_weight;
  const std::optional<at::Tensor>& q_norm_bias;
  const std::optional<at::Tensor>& k_norm_weight;
  const std::optional<at::Tensor>& k_norm_bias;
  double norm_eps;
  const std::optional<at::Tensor>& rope_positions;
  at::IntArrayRef rope_grid;  // empty: no angle-mode RoPE
  at::IntArrayRef rope_axes_dims;
  double rope_theta;
  bool rope_interleaved;
  const std::optional<at::Tensor>& rope_cos;  // with rope_sin: table-mode RoPE
  const std::optional<at::Tensor>& rope_sin;
  int64_t text_len;
  double scale;
  bool causal;
};

// Keeps alive what AttentionParams points into: the norm parameters in the math type.
struct AttentionInputs {
  AttentionParams params;
  at::Tensor q_weight, q_bias, k_weight, k_bias;  // undefined when absent
};

inline NormKind parse_norm(const char* op, std::string_view name) {
  if (name == "none") return NormKind::kNone;
  if (name == "layer_norm") return NormKind::kLayerNorm;
  if (name == "rms_norm") return NormKind::kRMSNorm;
  TORCH_CHECK_VALUE(false, op, ": qk_norm must be None ('none'), 'layer_norm' or 'rms_norm', got '", std::string(name),
                    "'");
}

inline void check_qkv(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D (batch, seq, heads, head_dim), got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), op, ": ", name,
                    " must be float16, bfloat16, float32 or float64, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                    dtype_name(q.scalar_type()), ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
                    "'s last dimension must have stride 1, got strides ", t.strides());
}

inline BshdTensor bshd(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }
inline BshdTensorMut bshd_mut(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The norm parameter `name` as a contiguous [head_dim] tensor in the math type
// (undefined when absent).
inline at::Tensor norm_param(const char* op, const std::optional<at::Tensor>& t, const char* name, NormKind kind,
                             const at::Tensor& q) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK_VALUE(kind != NormKind::kNone, op, ": ", name, " was given but qk_norm is None ('none')");
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == q.size(3), op, ": ", name, " must have shape (head_dim,) = (",
                    q.size(3), ",), got ", t->sizes());
  TORCH_CHECK_VALUE(is_supported_float(t->scalar_type()), op, ": ", name,
                    " must be float16, bfloat16, float32 or float64, got ", dtype_name(t->scalar_type()));
  TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ", q.device());
  return t->to(acc_dtype(q.scalar_type())).contiguous();
}

inline void check_rope(const char* op, const at::Tensor& q, const AttentionArgs& a, bool table) {
  TORCH_CHECK_VALUE(q.size(3) % 2 == 0, op, ": q's head_dim must be even for RoPE, got ", q.size(3));
  const int64_t n_video = q.size(1) - a.text_len;
  if (table) {
    for (const auto* t : {&*a.rope_cos, &*a.rope_sin}) {
      const char* name = t == &*a.rope_cos ? "cos" : "sin";
      TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == n_video && t->size(1) == q.size(3), op, ": rope table ",
                        name, " must have shape (seq - text_len, head_dim) = (", n_video, ", ", q.size(3),
                        "), got ", t->sizes());
    }
    return;
  }
  TORCH_CHECK_VALUE(a.rope_grid.size() == 3, op, ": rope_grid must have 3 entries (T, H, W), got ", a.rope_grid);
  int64_t grid_tokens = 1;
  for (int64_t g : a.rope_grid) grid_tokens *= g;
  TORCH_CHECK_VALUE(grid_tokens == n_video, op, ": rope grid ", a.rope_grid, " has ", grid_tokens,
                    " video tokens but q has seq - text_len = ", q.size(1), " - ", a.text_len, " = ", n_video);
}

// Checks everything and packs the parameters shared by forward and backward
// (the tensors that only one of them has are filled by the caller).
inline AttentionInputs attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const AttentionArgs& a) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (batch, seq, heads, head_dim), got shape ", q.sizes());
  check_qkv(op, q, "q", q);
  check_qkv(op, k, "k", q);
  check_qkv(op, v, "v", q);
  TORCH_CHECK_VALUE(q.size(3) >= 1, op, ": q's head_dim must be at least 1");
  TORCH_CHECK_VALUE(!(q.is_cuda() && q.scalar_type() == at::kDouble), op,
                    ": q of dtype float64 is supported on the CPU only");
  const NormKind kind = parse_norm(op, a.qk_norm);
  TORCH_CHECK_VALUE(std::isfinite(a.norm_eps) && a.norm_eps >= 0, op, ": norm_eps must be a finite number >= 0, got ",
                    a.norm_eps);
  TORCH_CHECK_VALUE(std::isfinite(a.scale) && a.scale > 0, op, ": scale must be a positive finite number, got ",
                    a.scale);
  TORCH_CHECK_VALUE(a.text_len >= 0 && a.text_len <= q.size(1), op, ": text_len must be an int in [0, seq=", q.size(1),
                    "], got ", a.text_len);

  AttentionInputs in;
  in.q_weight = norm_param(op, a.q_norm_weight, "q_norm_weight", kind, q);
  in.q_bias = norm_param(op, a.q_norm_bias, "q_norm_bias", kind, q);
  in.k_weight = norm_param(op, a.k_norm_weight, "k_norm_weight", kind, q);
  in.k_bias = norm_param(op, a.k_norm_bias, "k_norm_bias", kind, q);

  AttentionParams& P = in.params;
  const bool has_cos = a.rope_cos.has_value() && a.rope_cos->defined();
  const bool has_sin = a.rope_sin.has_value() && a.rope_sin->defined();
  TORCH_CHECK_VALUE(has_cos == has_sin, op, ": rope tables cos and sin must be given together");
  TORCH_CHECK_VALUE(!(has_cos && !a.rope_grid.empty()), op,
                    ": give RoPE either as rope_grid (angles) or as (cos, sin) tables, not both");
  if (has_cos) {
    check_rope(op, q, a, /*table=*/true);
    P.rope = rope_table_params(op, q, q, *a.rope_cos, *a.rope_sin, a.text_len, /*transpose=*/false,
                               /*inplace=*/false, "q");
    P.rope_table_dtype = to_dtype(a.rope_cos->scalar_type());
    P.has_rope = true;
  } else if (!a.rope_grid.empty()) {
    check_rope(op, q, a, /*table=*/false);
    P.rope = rope3d_params(op, q, q, a.rope_positions, a.rope_grid, a.rope_axes_dims, a.rope_theta,
                           a.rope_interleaved, a.text_len, /*inverse=*/false, /*inplace=*/false, "q");
    P.has_rope = true;
  } else {
    TORCH_CHECK_VALUE(!(a.rope_positions.has_value() && a.rope_positions->defined()), op,
                      ": rope_positions was given without rope_grid");
  }
  // Only the rotation fields of the RoPE parameters are used.
  P.rope.x = nullptr;
  P.rope.out = nullptr;

  P.batch = q.size(0);
  P.seq = q.size(1);
  P.heads = q.size(2);
  P.head_dim = q.size(3);
  P.dtype = to_dtype(q.scalar_type());
  P.q = bshd(q);
  P.k = bshd(k);
  P.v = bshd(v);
  P.norm = kind;
  P.norm_eps = a.norm_eps;
  P.q_norm.weight = in.q_weight.defined() ? in.q_weight.data_ptr() : nullptr;
  P.q_norm.bias = in.q_bias.defined() ? in.q_bias.data_ptr() : nullptr;
  P.k_norm.weight = in.k_weight.defined() ? in.k_weight.data_ptr() : nullptr;
  P.k_norm.bias = in.k_bias.defined() ? in.k_bias.data_ptr() : nullptr;
  P.text_len = a.text_len;
  P.scale = a.scale;
  P.causal = a.causal;
  P.deterministic = at::globalContext().deterministicAlgorithms();
  return in;
}

// A [batch, heads, seq] tensor in the math type (lse and its grad).
inline void check_lse(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(2) && t.size(2) == q.size(1), op,
                    ": ", name, " must have shape (batch, heads, seq) = (", q.size(0), ", ", q.size(2), ", ",
                    q.size(1), "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == acc_dtype(q.scalar_type()), op, ": ", name, " must be ",
                    dtype_name(acc_dtype(q.scalar_type())), ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

// The grad of one norm parameter: [head_dim] in the parameter's dtype, or an
// empty tensor of q's dtype when the parameter is absent.
inline at::Tensor norm_grad_output(const std::optional<at::Tensor>& param, const at::Tensor& acc_grad,
                                   const at::Tensor& q) {
  if (!param.has_value() || !param->defined()) return at::empty({0}, q.options());
  return acc_grad.to(param->scalar_type());
}

// Backend: a type with
//   static void check_supported(const char* op, const AttentionParams&)  (device limits, e.g. head_dim;
//                                                                          TORCH_CHECK_VALUE on failure)
//   static void forward(const AttentionParams&, const at::Tensor& q)
//   static void backward(const AttentionParams&, const at::Tensor& q)
template <typename Backend>
struct AttentionOps {
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                std::string_view qk_norm,
                                                const std::optional<at::Tensor>& q_norm_weight,
                                                const std::optional<at::Tensor>& q_norm_bias,
                                                const std::optional<at::Tensor>& k_norm_weight,
                                                const std::optional<at::Tensor>& k_norm_bias, double norm_eps,
                                                const std::optional<at::Tensor>& rope_positions,
                                                at::IntArrayRef rope_grid, at::IntArrayRef rope_axes_dims,
                                                double rope_theta, bool rope_interleaved,
                                                const std::optional<at::Tensor>& rope_cos,
                                                const std::optional<at::Tensor>& rope_sin, int64_t text_len,
                                                double scale, bool causal) {
    const char* op = "fused_attention";
    const AttentionArgs a{qk_norm,        q_norm_weight,  q_norm_bias, k_norm_weight,    k_norm_bias,
                          norm_eps,       rope_positions, rope_grid,   rope_axes_dims,   rope_theta,
                          rope_interleaved, rope_cos,     rope_sin,    text_len,         scale,
                          causal};
    AttentionInputs in = attention_inputs(op, q, k, v, a);
    Backend::check_supported(op, in.params);
    at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
    at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(acc_dtype(q.scalar_type())));
    if (q.numel() == 0) return {out, lse};
    in.params.out = bshd_mut(out);
    in.params.lse = lse.data_ptr();
    Backend::forward(in.params, q);
    return {out, lse};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      std::string_view qk_norm, const std::optional<at::Tensor>& q_norm_weight,
      const std::optional<at::Tensor>& q_norm_bias, const std::optional<at::Tensor>& k_norm_weight,
      const std::optional<at::Tensor>& k_norm_bias, double norm_eps, const std::optional<at::Tensor>& rope_positions,
      at::IntArrayRef rope_grid, at::IntArrayRef rope_axes_dims, double rope_theta, bool rope_interleaved,
      const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin, int64_t text_len,
      double scale, bool causal) {
    const char* op = "fused_attention_bwd";
    const AttentionArgs a{qk_norm,        q_norm_weight,  q_norm_bias, k_norm_weight,    k_norm_bias,
                          norm_eps,       rope_positions, rope_grid,   rope_axes_dims,   rope_theta,
                          rope_interleaved, rope_cos,     rope_sin,    text_len,         scale,
                          causal};
    AttentionInputs in = attention_inputs(op, q, k, v, a);
    Backend::check_supported(op, in.params);
    TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                          grad_out.device() == q.device(),
                      op, ": grad_out must match q's shape, dtype and device");
    TORCH_CHECK_VALUE(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
                      op, ": out must match q's shape, dtype and device");
    check_lse(op, lse, "lse", q);
    const at::Tensor lse_c = lse.contiguous();
    at::Tensor grad_lse_c;
    if (grad_lse.has_value() && grad_lse->defined()) {
      check_lse(op, *grad_lse, "grad_lse", q);
      grad_lse_c = grad_lse->contiguous();
    }
    const at::Tensor grad_out_c = last_dim_contiguous(grad_out);
    const at::Tensor out_c = last_dim_contiguous(out);

    const auto shape = q.sizes();
    at::Tensor dq = at::empty(shape, q.options()), dk = at::empty(shape, q.options()), dv = at::empty(shape, q.options());
    const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
    // Zero-initialized: with an empty q the kernel does not run and the grads are 0.
    at::Tensor dqw = at::zeros({q.size(3)}, acc_opts), dqb = at::zeros({q.size(3)}, acc_opts);
    at::Tensor dkw = at::zeros({q.size(3)}, acc_opts), dkb = at::zeros({q.size(3)}, acc_opts);
    if (q.numel() > 0) {
      AttentionParams& P = in.params;
      P.out_saved = bshd(out_c);
      P.grad_out = bshd(grad_out_c);
      P.lse = lse_c.data_ptr();
      P.grad_lse = grad_lse_c.defined() ? grad_lse_c.data_ptr() : nullptr;
      P.grad_q = bshd_mut(dq);
      P.grad_k = bshd_mut(dk);
      P.grad_v = bshd_mut(dv);
      P.q_norm.grad_weight = dqw.data_ptr();
      P.q_norm.grad_bias = dqb.data_ptr();
      P.k_norm.grad_weight = dkw.data_ptr();
      P.k_norm.grad_bias = dkb.data_ptr();
      Backend::backward(P, q);
    }
    return {dq,
            dk,
            dv,
            norm_grad_output(q_norm_weight, dqw, q),
            norm_grad_output(q_norm_bias, dqb, q),
            norm_grad_output(k_norm_weight, dkw, q),
            norm_grad_output(k_norm_bias, dkb, q)};
  }
};

}  // namespace cogkern::ops
