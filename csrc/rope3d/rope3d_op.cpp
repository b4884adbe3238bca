// Schemas of the 3D RoPE ops and their CPU registration.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "rope3d/rope3d_cpu.h"
#include "rope3d/rope3d_op.h"

namespace cogkern::ops {
namespace {

struct CpuBackend {
  static void run(const RopeParams& P, const at::Tensor& x, at::ScalarType table_dtype) {
    cpu::rope3d(P, to_dtype(x.scalar_type()), to_dtype(table_dtype));
  }
};
using CpuRope = RopeOps<CpuBackend>;

}  // namespace

TORCH_LIBRARY_FRAGMENT(cogkern, m) {
  // inverse=True applies the transpose (= inverse) rotation: the backward.
  m.def("rope3d(Tensor x, Tensor? positions, int[] grid, int[] axes_dims, float theta, bool interleaved, "
        "int text_len, bool inverse) -> Tensor");
  m.def("rope3d_(Tensor(a!) x, Tensor? positions, int[] grid, int[] axes_dims, float theta, bool interleaved, "
        "int text_len, bool inverse) -> ()");
  // diffusers-style (cos, sin) tables of shape (T*H*W, head_dim), interleaved pairs.
  m.def("rope_table(Tensor x, Tensor cos, Tensor sin, int text_len, bool transpose) -> Tensor");
  m.def("rope_table_(Tensor(a!) x, Tensor cos, Tensor sin, int text_len, bool transpose) -> ()");
}

TORCH_LIBRARY_IMPL(cogkern, CPU, m) {
  m.impl("rope3d", &CpuRope::rope3d);
  m.impl("rope3d_", &CpuRope::rope3d_);
  m.impl("rope_table", &CpuRope::rope_table);
  m.impl("rope_table_", &CpuRope::rope_table_);
}

}  // namespace cogkern::ops
