// The Python extension module cogkern._C. Loading it registers every cogkern
// op with the torch dispatcher (TORCH_LIBRARY below; each op's file adds its
// schemas as a TORCH_LIBRARY_FRAGMENT); Python then calls them as
// torch.ops.cogkern.<name>. The module itself only exposes build facts.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef COGKERN_CUDA_ARCHS
#define COGKERN_CUDA_ARCHS ""
#endif
#ifndef COGKERN_CUDA_VERSION
#define COGKERN_CUDA_VERSION ""
#endif

// The namespace itself; the ops are defined next to their kernels' glue.
TORCH_LIBRARY(cogkern, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "cogkern compiled core: registers torch.ops.cogkern.*";
  m.def("torch_version", []() { return std::string(COGKERN_TORCH_VERSION); });
  m.def("cuda_version", []() { return std::string(COGKERN_CUDA_VERSION); });
  m.def("cuda_archs", []() { return std::string(COGKERN_CUDA_ARCHS); });
#ifdef COGKERN_WITH_CUDA
  m.def("with_cuda", []() { return true; });
#else
  m.def("with_cuda", []() { return false; });
#endif
}
