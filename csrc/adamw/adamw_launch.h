// Host entry points of the optimizer CUDA kernels (defined in adamw_launch.cu). Torch-free.
// All of them only enqueue work on `stream`: none synchronizes with the host,
// so a whole optimizer step can be captured into a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include "adamw/adamw_math.h"

namespace cogkern {

// The update of every (tensor, chunk) of L, then the step-count advance.
// (param_dtype, mode, moments): one of COGKERN_ADAMW_VARIANTS (adamw_math.h); else cudaErrorInvalidValue.
cudaError_t launch_adamw(const AdamWLaunch& L, DType param_dtype, AdamWMode mode, MomentStore moments,
                         cudaStream_t stream);

// Per-chunk (sum of squares, inf/NaN bits, flag index) partials of L's gradients.
cudaError_t launch_grad_check(const GradCheckLaunch& L, DType grad_dtype, cudaStream_t stream);

// Reduces F.num_chunks partials (in a fixed order) into the step scalars F.out and, when
// F.tensor_flags is set, the per-tensor inf/NaN bits and their summary. One block.
cudaError_t launch_grad_check_finalize(const GradCheckFinalize& F, cudaStream_t stream);

cudaError_t launch_loss_scale_update(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                     const float* found_inf, const LossScaleConfig& config, cudaStream_t stream);

}  // namespace cogkern
