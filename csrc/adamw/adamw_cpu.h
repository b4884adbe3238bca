// CPU backend of the optimizer ops: the same per-chunk bodies as the CUDA
// kernels (adamw/adamw_math.h), run by host threads with one lane per chunk.
#pragma once

#include "adamw/adamw_math.h"

namespace cogkern::cpu {

// param_dtype / mode / moments: the combinations of COGKERN_ADAMW_VARIANTS (adamw/adamw_math.h).
void adamw(const AdamWLaunch& L, DType param_dtype, AdamWMode mode, MomentStore moments);
void grad_check(const GradCheckLaunch& L, DType grad_dtype);
void grad_check_finalize(const GradCheckFinalize& F);
void loss_scale_update(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker, const float* found_inf,
                       const LossScaleConfig& config);

}  // namespace cogkern::cpu
