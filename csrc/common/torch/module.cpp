// The Python extension module cogkern._C. Loading it registers every cogkern
// op with the torch dispatcher (TORCH_LIBRARY below; each op's file adds its
// schemas as a TORCH_LIBRARY_FRAGMENT); Python then calls them as
// torch.ops.cogkern.<name>. The module itself only exposes build facts.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <set>

#include "common/cpu/fp16_bits.h"
#include "common/dispatch.h"

#ifndef COGKERN_CUDA_ARCHS
#define COGKERN_CUDA_ARCHS ""
#endif
#ifndef COGKERN_CUDA_VERSION
#define COGKERN_CUDA_VERSION ""
#endif

// The namespace itself; the ops are defined next to their kernels' glue.
TORCH_LIBRARY(cogkern, m) {}

namespace {
// How many threads actually run the tasks of one at::parallel_for in this
// extension. at::parallel_for is a header template, so this checks how the
// extension was compiled (without OpenMP it is silently serial), not torch.
int cpu_parallel_threads() {
  std::mutex mutex;
  std::set<int> threads;
  at::parallel_for(0, 4096, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  return static_cast<int>(threads.size());
}

// Values where cpu::Fp16Bits (the optimizer's vectorizable fp16 conversions)
// and c10::Half disagree, bit for bit: every half -> float, and float -> half
// over a sweep of float bit patterns (every exponent, both signs, the
// rounding boundaries' neighbourhoods included by the stride).
int64_t fp16_conversion_mismatches() {
  int64_t bad = 0;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    c10::Half ref;
    ref.x = uint16_t(h);
    const float a = static_cast<float>(ref);
    cogkern::cpu::Fp16Bits mine;
    mine.bits = uint16_t(h);
    const float b = static_cast<float>(mine);
    bad += std::memcmp(&a, &b, sizeof(a)) != 0;
  }
  for (uint64_t f = 0; f <= 0xFFFFFFFFull; f += 257) {
    float x;
    const uint32_t bits = uint32_t(f);
    std::memcpy(&x, &bits, sizeof(x));
    bad += c10::Half(x).x != cogkern::cpu::Fp16Bits(x).bits;
  }
  return bad;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cogkern compiled core: registers torch.ops.cogkern.*";
  m.def("torch_version", []() { return std::string(COGKERN_TORCH_VERSION); });
  m.def("cuda_version", []() { return std::string(COGKERN_CUDA_VERSION); });
  m.def("cuda_archs", []() { return std::string(COGKERN_CUDA_ARCHS); });
  m.def("fp16_conversion_mismatches", &fp16_conversion_mismatches,
        "Self-check of the CPU optimizer's fp16 conversions against c10::Half (0 when right).");
  m.def("cpu_parallel_threads", &cpu_parallel_threads,
        "Threads that run one at::parallel_for in this extension (torch.get_num_threads() when built right).");
  m.def(
      "cuda_attention_head_dims",
      []() {
        pybind11::list dims;
        for (int d : cogkern::kAttentionHeadDims) dims.append(d);
        return dims;
      },
      "The head dims the CUDA attention kernels are built for (csrc/common/dispatch.h).");
  m.def(
      "cuda_dtypes",
      []() {
        pybind11::list names;
        for (const char* name : cogkern::kCudaDTypeNames) names.append(name);
        return names;
      },
      "The dtypes (torch names) the CUDA attention kernels are built for (csrc/common/dispatch.h).");
#ifdef COGKERN_WITH_CUDA
  m.def("with_cuda", []() { return true; });
#else
  m.def("with_cuda", []() { return false; });
#endif
}
