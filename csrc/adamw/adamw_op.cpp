// Schemas of the optimizer ops and their CPU registration (kernels: csrc/adamw/adamw_cpu.cpp).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "adamw/adamw_cpu.h"
#include "adamw/adamw_op.h"

namespace cogkern::ops {
namespace {

struct CpuBackend {
  static void adamw(const AdamWLaunch& L, DType dtype, AdamWMode mode, MomentStore moments, const at::Tensor&) {
    cpu::adamw(L, dtype, mode, moments);
  }
  static void grad_check(const GradCheckLaunch& L, DType dtype, const at::Tensor&) { cpu::grad_check(L, dtype); }
  static void grad_check_finalize(const GradCheckFinalize& F, const at::Tensor&) { cpu::grad_check_finalize(F); }
  static void loss_scale_update(float* scale, int32_t* growth, int32_t* hysteresis, const float* found_inf,
                                const LossScaleConfig& c, const at::Tensor&) {
    cpu::loss_scale_update(scale, growth, hysteresis, found_inf, c);
  }
};
using CpuAdamW = AdamWOps<CpuBackend>;

}  // namespace

TORCH_LIBRARY_FRAGMENT(cogkern, m) {
  // One call per (dtype, precision mode, moment storage); tensor_groups[i] indexes the per-group lists.
  m.def("fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] masters, Tensor(e!)[] steps, int[] tensor_groups, int[] tensor_ids, float[] lrs, "
        "Tensor?[] lr_tensors, float[] beta1s, float[] beta2s, float[] epss, float[] weight_decays, "
        "Tensor? step_scalars, int seed, bool stochastic_rounding, Tensor(f!)[] exp_avg_scales, "
        "Tensor(g!)[] exp_avg_sq_scales) -> ()");
  // out = [found_inf, inv_scale, clip_coef, grad_norm]; max_norm 0: no clipping. tensor_flags: int32,
  // grads[i]'s inf (1) / NaN (2) bits at flag_indices[i] (default i), the summary last (adamw_op.h).
  m.def("amp_grad_check_(Tensor(a!)[] grads, Tensor? scale, Tensor? found_inf, float max_norm, bool scan, "
        "bool unscale_inplace, Tensor(b!) out, Tensor(c!)? tensor_flags=None, int[]? flag_indices=None) -> ()");
  m.def("loss_scale_update_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) hysteresis_tracker, "
        "Tensor found_inf, float growth_factor, float backoff_factor, int growth_interval, int hysteresis, "
        "float min_scale, float max_scale) -> ()");
}

TORCH_LIBRARY_IMPL(cogkern, CPU, m) {
  m.impl("fused_adamw_", &CpuAdamW::fused_adamw_);
  m.impl("amp_grad_check_", &CpuAdamW::amp_grad_check_);
  m.impl("loss_scale_update_", &CpuAdamW::loss_scale_update_);
}

}  // namespace cogkern::ops
