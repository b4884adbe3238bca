// The optimizer ops (cogkern::fused_adamw_, amp_grad_check_, loss_scale_update_):
// argument checks, packing of tensor lists into launches, and the op bodies,
// templated over the backend so the CPU (adamw_op.cpp) and CUDA
// (adamw_op_cuda.cpp) registrations share one definition. Every check runs,
// and raises ValueError naming the argument, before any kernel is launched.
#pragma once

#include <ATen/core/List.h>
#include <ATen/ops/empty.h>
#include <c10/core/TensorOptions.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "adamw/adamw_math.h"
#include "common/torch/glue.h"

namespace cogkern::ops {

inline bool optimizer_dtype_ok(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline void check_dense(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, "[", i, "] must be a dense tensor, got layout ",
                    t.layout(), " (sparse gradients are not supported)");
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
                    "] must be non-overlapping and dense (e.g. contiguous), got strides ", t.strides());
}

// A tensor that is walked element by element together with params[i].
inline void check_like_param(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Tensor& p,
                             std::optional<at::ScalarType> dtype) {
  check_dense(op, name, i, t);
  TORCH_CHECK_VALUE(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
                    "] is on ", p.device());
  TORCH_CHECK_VALUE(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
                    "] has shape ", p.sizes());
  if (dtype.has_value()) {
    TORCH_CHECK_VALUE(t.scalar_type() == *dtype, op, ": ", name, "[", i, "] must be ", *dtype, ", got ",
                      t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.numel() <= 1 || t.strides() == p.strides(), op, ": ", name, "[", i, "] has strides ",
                    t.strides(), " but params[", i, "] has strides ", p.strides());
}

inline void check_device_scalar(const char* op, const std::string& name, const at::Tensor& t, at::ScalarType dtype,
                                const at::Device& device, int64_t numel = 1) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, op, ": ", name, " must have ", numel, " element(s), got ", t.numel());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_hyper(const char* op, const char* name, size_t g, double v, double lo, bool lo_open, double hi,
                        bool hi_open) {
  const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  TORCH_CHECK_VALUE(ok, op, ": ", name, "[", g, "] must be in ", lo_open ? "(" : "[", lo, ", ", hi,
                    hi_open ? ")" : "]", ", got ", v);
}

// Backend: a type with
//   static void adamw(const AdamWLaunch&, DType, AdamWMode, const at::Tensor& ref);
//   static void grad_check(const GradCheckLaunch&, DType, const at::Tensor& ref);
//   static void grad_check_finalize(const GradCheckFinalize&, const at::Tensor& ref);
//   static void loss_scale_update(float*, int32_t*, int32_t*, const float*, const LossScaleConfig&, const at::Tensor& ref);
template <typename Backend>
struct AdamWOps {
  // One precision mode per call: all params share a dtype; masters empty (no
  // master weights) or one per param: float32 masters, or int16 remainders of
  // bfloat16 params. The moments' dtype picks their storage: float32, bfloat16
  // (stochastic rounding), or int8 exp_avg / uint8 exp_avg_sq codes with one
  // float32 scale per kMomentBlock elements in exp_avg_scales / exp_avg_sq_scales
  // (empty for the other storages).
  static void fused_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList steps,
                           at::IntArrayRef tensor_groups, at::IntArrayRef tensor_ids, at::ArrayRef<double> lrs,
                           const c10::List<std::optional<at::Tensor>>& lr_tensors, at::ArrayRef<double> beta1s,
                           at::ArrayRef<double> beta2s, at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays,
                           const std::optional<at::Tensor>& step_scalars, int64_t seed, bool stochastic_rounding,
                           at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales) {
    const char* op = "fused_adamw_";
    const size_t n = params.size();
    const auto same_n = [&](size_t m, const char* name) {
      TORCH_CHECK_VALUE(m == n, op, ": ", name, " must have one entry per param (", n, "), got ", m);
    };
    same_n(grads.size(), "grads");
    same_n(exp_avgs.size(), "exp_avgs");
    same_n(exp_avg_sqs.size(), "exp_avg_sqs");
    same_n(steps.size(), "steps");
    same_n(tensor_groups.size(), "tensor_groups");
    same_n(tensor_ids.size(), "tensor_ids");
    TORCH_CHECK_VALUE(masters.empty() || masters.size() == n, op, ": masters must be empty or have one entry per param (",
                      n, "), got ", masters.size());
    const size_t G = lrs.size();
    TORCH_CHECK_VALUE(lr_tensors.size() == G && beta1s.size() == G && beta2s.size() == G && epss.size() == G &&
                          weight_decays.size() == G,
                      op, ": lrs, lr_tensors, beta1s, beta2s, epss and weight_decays must all have one entry per group");
    if (n == 0) return;

    const at::Tensor& p0 = params[0];
    const at::ScalarType dtype = p0.scalar_type();
    const at::Device device = p0.device();
    TORCH_CHECK_VALUE(optimizer_dtype_ok(dtype), op, ": params must be float32, float16 or bfloat16, got ", dtype);
    TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), op, ": params must be on the CPU or a CUDA device, got ",
                      device);
    AdamWMode mode = AdamWMode::kPlain;
    at::ScalarType master_dtype = at::kFloat;
    if (stochastic_rounding) {
      TORCH_CHECK_VALUE(dtype == at::kBFloat16, op, ": stochastic_rounding needs bfloat16 params, got ", dtype);
      TORCH_CHECK_VALUE(masters.empty(), op, ": stochastic_rounding replaces master weights; masters must be empty");
      mode = AdamWMode::kStochastic;
    } else if (!masters.empty()) {
      TORCH_CHECK_VALUE(dtype != at::kFloat, op, ": master weights are for float16/bfloat16 params, got float32");
      master_dtype = masters[0].scalar_type();
      TORCH_CHECK_VALUE(master_dtype == at::kFloat || master_dtype == at::kShort, op,
                        ": masters must be float32 (master weights) or int16 (param remainders), got ", master_dtype);
      TORCH_CHECK_VALUE(master_dtype == at::kFloat || dtype == at::kBFloat16, op,
                        ": int16 masters are param remainders, for bfloat16 params only; got ", dtype, " params");
      mode = master_dtype == at::kFloat ? AdamWMode::kMaster : AdamWMode::kRemainder;
    }
    const at::ScalarType moment_dtype = exp_avgs[0].scalar_type();
    TORCH_CHECK_VALUE(moment_dtype == at::kFloat || moment_dtype == at::kBFloat16 || moment_dtype == at::kChar, op,
                      ": exp_avgs must be float32, bfloat16 or int8 (codes), got ", moment_dtype);
    const MomentStore moments = moment_dtype == at::kFloat      ? MomentStore::kF32
                                : moment_dtype == at::kBFloat16 ? MomentStore::kBF16
                                                                : MomentStore::kInt8;
    const at::ScalarType moment_sq_dtype = moments == MomentStore::kInt8 ? at::kByte : moment_dtype;
    const bool quantized = moments == MomentStore::kInt8;
    TORCH_CHECK_VALUE(exp_avg_scales.size() == (quantized ? n : 0) && exp_avg_sq_scales.size() == (quantized ? n : 0),
                      op, ": exp_avg_scales and exp_avg_sq_scales must ",
                      quantized ? "have one entry per param with int8 moments" : "be empty unless the moments are int8",
                      ", got ", exp_avg_scales.size(), " and ", exp_avg_sq_scales.size());
    TORCH_CHECK_VALUE(adamw_variant_compiled(to_dtype(dtype), mode, moments), op, ": ", moment_dtype,
                      " moments are not available for ", dtype, " params",
                      mode == AdamWMode::kPlain && dtype != at::kFloat ? " without master weights" : "");

    for (size_t g = 0; g < G; ++g) {
      check_hyper(op, "lrs", g, lrs[g], 0.0, false, INFINITY, true);
      check_hyper(op, "beta1s", g, beta1s[g], 0.0, false, 1.0, true);
      check_hyper(op, "beta2s", g, beta2s[g], 0.0, false, 1.0, true);
      check_hyper(op, "epss", g, epss[g], 0.0, false, INFINITY, true);
      check_hyper(op, "weight_decays", g, weight_decays[g], 0.0, false, INFINITY, true);
      const std::optional<at::Tensor> lr_t = lr_tensors.get(g);
      if (lr_t.has_value()) {
        const std::string name = "lr_tensors[" + std::to_string(g) + "]";
        check_device_scalar(op, name, *lr_t, at::kFloat, device);
        // A CPU lr is read here for free; a CUDA one is read by the kernel only (no sync).
        TORCH_CHECK_VALUE(!lr_t->is_cpu() || *lr_t->const_data_ptr<float>() >= 0.0f, op, ": ", name,
                          " is a negative learning rate, ", *lr_t->const_data_ptr<float>());
      }
    }
    if (step_scalars.has_value()) {
      check_device_scalar(op, "step_scalars", *step_scalars, at::kFloat, device, kNumStepScalars);
    }
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params[i];
      check_dense(op, "params", i, p);
      TORCH_CHECK_VALUE(p.scalar_type() == dtype, op, ": params[", i, "] is ", p.scalar_type(),
                        " but params[0] is ", dtype, "; pass one dtype per call");
      TORCH_CHECK_VALUE(p.device() == device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
                        device);
      check_like_param(op, "grads", i, grads[i], p, dtype);
      check_like_param(op, "exp_avgs", i, exp_avgs[i], p, moment_dtype);
      check_like_param(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, moment_sq_dtype);
      if (!masters.empty()) check_like_param(op, "masters", i, masters[i], p, master_dtype);
      if (quantized) {
        const int64_t blocks = ceil_div(p.numel(), kMomentBlock);
        const std::string idx = "[" + std::to_string(i) + "]";
        check_device_scalar(op, "exp_avg_scales" + idx, exp_avg_scales[i], at::kFloat, device, blocks);
        check_device_scalar(op, "exp_avg_sq_scales" + idx, exp_avg_sq_scales[i], at::kFloat, device, blocks);
      }
      check_device_scalar(op, "steps[" + std::to_string(i) + "]", steps[i], at::kFloat, device);
      TORCH_CHECK_VALUE(tensor_groups[i] >= 0 && size_t(tensor_groups[i]) < G, op, ": tensor_groups[", i,
                        "] must be in [0, ", G, "), got ", tensor_groups[i]);
      TORCH_CHECK_VALUE(tensor_ids[i] >= 0 && tensor_ids[i] <= int64_t(UINT32_MAX), op, ": tensor_ids[", i,
                        "] must be in [0, 2^32), got ", tensor_ids[i]);
    }

    // Pack into launches of at most kAdamWMaxTensors tensors and kAdamWMaxGroups groups.
    auto L = std::make_unique<AdamWLaunch>();
    std::vector<int> slot(G, -1);
    int nslots = 0;
    const auto reset = [&] {
      *L = AdamWLaunch{};
      L->step_scalars = step_scalars.has_value() ? step_scalars->const_data_ptr<float>() : nullptr;
      L->seed = uint64_t(seed);
      std::fill(slot.begin(), slot.end(), -1);
      nslots = 0;
    };
    const auto flush = [&] {
      if (L->num_tensors > 0) Backend::adamw(*L, to_dtype(dtype), mode, moments, p0);
      reset();
    };
    reset();
    for (size_t i = 0; i < n; ++i) {
      const int g = int(tensor_groups[i]);
      if (L->num_tensors == kAdamWMaxTensors || (slot[g] < 0 && nslots == kAdamWMaxGroups)) flush();
      if (slot[g] < 0) {
        slot[g] = nslots;
        AdamWGroup& grp = L->groups[nslots++];
        grp.lr = lrs[g];
        const std::optional<at::Tensor> lr_t = lr_tensors.get(g);
        grp.lr_ptr = lr_t.has_value() ? lr_t->const_data_ptr<float>() : nullptr;
        grp.beta1 = beta1s[g];
        grp.beta2 = beta2s[g];
        grp.eps = epss[g];
        grp.weight_decay = weight_decays[g];
      }
      AdamWTensor d;
      d.param = params[i].data_ptr();
      d.grad = grads[i].const_data_ptr();
      d.exp_avg = exp_avgs[i].data_ptr();
      d.exp_avg_sq = exp_avg_sqs[i].data_ptr();
      d.exp_avg_scale = quantized ? exp_avg_scales[i].data_ptr<float>() : nullptr;
      d.exp_avg_sq_scale = quantized ? exp_avg_sq_scales[i].data_ptr<float>() : nullptr;
      d.master = masters.empty() ? nullptr : masters[i].data_ptr();
      d.step = steps[i].data_ptr<float>();
      d.numel = params[i].numel();
      d.group = slot[g];
      d.rng_id = uint32_t(tensor_ids[i]);
      append_tensor(*L, d, params[i].element_size(), exp_avgs[i].element_size(),
                    masters.empty() ? 4 : masters[i].element_size());
    }
    flush();
  }

  // Finds inf/NaN in grads (any mix of float32/float16/bfloat16, one launch per
  // dtype) and the norm of grads / scale, and writes the step scalars
  // [found_inf, inv_scale, clip_coef, grad_norm] to `out`. scan=False skips
  // the pass (only combines scale and found_inf). unscale_inplace also writes
  // grads * (1 / scale) back. tensor_flags (int32, optional): every entry is
  // rewritten; grads[i]'s inf/NaN bits (GradFlag) go to entry flag_indices[i]
  // (default i), all but the last entry, and the last one gets the summary (the
  // OR of all, kGradScanned, kGradFoundInfIn). Same pass, same partials.
  static void amp_grad_check_(at::TensorList grads, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& found_inf, double max_norm, bool scan,
                              bool unscale_inplace, const at::Tensor& out,
                              const std::optional<at::Tensor>& tensor_flags, at::OptionalIntArrayRef flag_indices) {
    const char* op = "amp_grad_check_";
    TORCH_CHECK_VALUE(out.defined(), op, ": out is undefined");
    const at::Device device = out.device();
    TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), op, ": out must be on the CPU or a CUDA device");
    check_device_scalar(op, "out", out, at::kFloat, device, kNumStepScalars);
    if (scale.has_value()) check_device_scalar(op, "scale", *scale, at::kFloat, device);
    if (found_inf.has_value()) check_device_scalar(op, "found_inf", *found_inf, at::kFloat, device);
    TORCH_CHECK_VALUE(std::isfinite(max_norm) && max_norm >= 0, op, ": max_norm must be >= 0 (0: no clipping), got ",
                      max_norm);
    TORCH_CHECK_VALUE(scan || !unscale_inplace, op, ": unscale_inplace needs scan");
    for (size_t i = 0; i < grads.size(); ++i) {
      check_dense(op, "grads", i, grads[i]);
      TORCH_CHECK_VALUE(optimizer_dtype_ok(grads[i].scalar_type()), op, ": grads[", i,
                        "] must be float32, float16 or bfloat16, got ", grads[i].scalar_type());
      TORCH_CHECK_VALUE(grads[i].device() == device, op, ": grads[", i, "] is on ", grads[i].device(),
                        " but out is on ", device);
    }
    TORCH_CHECK_VALUE(tensor_flags.has_value() || !flag_indices.has_value(), op,
                      ": flag_indices need tensor_flags");
    std::vector<int32_t> flag_of(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) flag_of[i] = int32_t(i);
    int64_t num_flags = 0;
    if (tensor_flags.has_value()) {
      const at::Tensor& f = *tensor_flags;
      TORCH_CHECK_VALUE(f.defined() && f.scalar_type() == at::kInt && f.dim() == 1 && f.is_contiguous(), op,
                        ": tensor_flags must be a contiguous 1-D int32 tensor");
      TORCH_CHECK_VALUE(f.numel() >= 1, op, ": tensor_flags needs at least its last entry, the summary");
      TORCH_CHECK_VALUE(f.device() == device, op, ": tensor_flags is on ", f.device(), " but out is on ", device);
      num_flags = f.numel() - 1;  // the last entry is the summary
      TORCH_CHECK_VALUE(num_flags < INT32_MAX, op, ": tensor_flags has too many entries, ", f.numel());
      if (flag_indices.has_value()) {
        TORCH_CHECK_VALUE(flag_indices->size() == grads.size(), op, ": flag_indices must have one entry per grad (",
                          grads.size(), "), got ", flag_indices->size());
        // Distinct, so that each entry has one writer.
        std::vector<bool> taken(size_t(std::max<int64_t>(num_flags, 0)), false);
        for (size_t i = 0; i < grads.size(); ++i) {
          const int64_t k = (*flag_indices)[i];
          TORCH_CHECK_VALUE(k >= 0 && k < num_flags, op, ": flag_indices[", i, "] must be in [0, ", num_flags,
                            ") (tensor_flags' last entry is the summary), got ", k);
          TORCH_CHECK_VALUE(!taken[size_t(k)], op, ": flag_indices[", i, "] = ", k, " appears twice");
          taken[size_t(k)] = true;
          flag_of[i] = int32_t(k);
        }
      } else {
        TORCH_CHECK_VALUE(num_flags >= int64_t(grads.size()), op, ": tensor_flags needs one entry per grad (",
                          grads.size(), ") plus the summary, got ", f.numel());
      }
    }

    const float* scale_ptr = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
    const float* found_ptr = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
    GradCheckFinalize F;
    F.scale = scale_ptr;
    F.found_inf_in = found_ptr;
    F.max_norm = max_norm;
    F.out = out.data_ptr<float>();
    F.tensor_flags = tensor_flags.has_value() ? tensor_flags->data_ptr<int32_t>() : nullptr;
    F.num_flags = num_flags;
    F.scanned = scan;
    int64_t total_chunks = 0;
    if (scan) {
      for (const at::Tensor& g : grads) total_chunks += chunks_of(g.numel());
    }
    if (total_chunks == 0) {
      Backend::grad_check_finalize(F, out);
      return;
    }
    const at::Tensor partials = at::empty({kGradCheckPartialWords * total_chunks}, out.options());
    float* partials_ptr = partials.data_ptr<float>();
    int64_t offset = 0;  // chunks already assigned a partial slot
    auto L = std::make_unique<GradCheckLaunch>();
    for (const at::ScalarType dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
      const auto reset = [&] {
        *L = GradCheckLaunch{};
        L->partials = partials_ptr + kGradCheckPartialWords * offset;
        L->scale = scale_ptr;
        L->unscale_inplace = unscale_inplace;
      };
      const auto flush = [&] {
        if (L->num_chunks > 0) Backend::grad_check(*L, to_dtype(dt), out);
        offset += L->num_chunks;
        reset();
      };
      reset();
      for (size_t i = 0; i < grads.size(); ++i) {
        const at::Tensor& g = grads[i];
        if (g.scalar_type() != dt || g.numel() == 0) continue;
        if (L->num_tensors == kGradCheckMaxTensors) flush();
        append_tensor(*L, g.data_ptr(), g.numel(), g.element_size(), flag_of[i]);
      }
      flush();
    }
    F.partials = partials_ptr;
    F.num_chunks = total_chunks;
    Backend::grad_check_finalize(F, out);
  }

  static void loss_scale_update_(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                 const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf,
                                 double growth_factor, double backoff_factor, int64_t growth_interval,
                                 int64_t hysteresis, double min_scale, double max_scale) {
    const char* op = "loss_scale_update_";
    TORCH_CHECK_VALUE(scale.defined(), op, ": scale is undefined");
    const at::Device device = scale.device();
    check_device_scalar(op, "scale", scale, at::kFloat, device);
    check_device_scalar(op, "growth_tracker", growth_tracker, at::kInt, device);
    check_device_scalar(op, "hysteresis_tracker", hysteresis_tracker, at::kInt, device);
    check_device_scalar(op, "found_inf", found_inf, at::kFloat, device);
    TORCH_CHECK_VALUE(std::isfinite(growth_factor) && growth_factor >= 1.0, op,
                      ": growth_factor must be finite and >= 1, got ", growth_factor);
    TORCH_CHECK_VALUE(backoff_factor > 0.0 && backoff_factor <= 1.0, op, ": backoff_factor must be in (0, 1], got ",
                      backoff_factor);
    TORCH_CHECK_VALUE(growth_interval >= 1 && growth_interval <= INT32_MAX, op,
                      ": growth_interval must be a positive int32, got ", growth_interval);
    TORCH_CHECK_VALUE(hysteresis >= 1 && hysteresis <= INT32_MAX, op, ": hysteresis must be a positive int32, got ",
                      hysteresis);
    TORCH_CHECK_VALUE(std::isfinite(min_scale) && min_scale > 0, op, ": min_scale must be positive, got ", min_scale);
    TORCH_CHECK_VALUE(max_scale >= min_scale, op, ": max_scale must be >= min_scale, got ", max_scale, " < ",
                      min_scale);
    LossScaleConfig c;
    c.growth_factor = growth_factor;
    c.backoff_factor = backoff_factor;
    c.growth_interval = int32_t(growth_interval);
    c.hysteresis = int32_t(hysteresis);
    c.min_scale = min_scale;
    c.max_scale = max_scale;
    Backend::loss_scale_update(scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(),
                               hysteresis_tracker.data_ptr<int32_t>(), found_inf.const_data_ptr<float>(), c, scale);
  }
};

}  // namespace cogkern::ops
