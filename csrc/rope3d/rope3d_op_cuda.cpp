// CUDA registration of the 3D RoPE ops (kernel: csrc/rope3d/rope3d_launch.cu).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rope3d/rope3d_launch.h"
#include "rope3d/rope3d_op.h"

namespace cogkern::ops {
namespace {

struct CudaBackend {
  static void run(const RopeParams& P, const at::Tensor& x, at::ScalarType table_dtype) {
    TORCH_CHECK_VALUE(P.head_dim <= kRopeCudaMaxHeadDim, "rope3d: x's head_dim must be at most ", kRopeCudaMaxHeadDim,
                      " on CUDA, got ", P.head_dim);
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err =
        launch_rope3d(P, to_dtype(x.scalar_type()), to_dtype(table_dtype), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "cogkern rope3d CUDA launch failed: ", cudaGetErrorString(err));
  }
};
using CudaRope = RopeOps<CudaBackend>;

}  // namespace

TORCH_LIBRARY_IMPL(cogkern, CUDA, m) {
  m.impl("rope3d", &CudaRope::rope3d);
  m.impl("rope3d_", &CudaRope::rope3d_);
  m.impl("rope_table", &CudaRope::rope_table);
  m.impl("rope_table_", &CudaRope::rope_table_);
}

}  // namespace cogkern::ops
