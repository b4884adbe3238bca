// COGKERN_SIMD_CLONES: compile a CPU hot loop for AVX-512, AVX2 and the x86-64
// baseline, picked once at load time (GCC/Clang function multi-versioning).
// The build itself targets the baseline so that the wheel runs anywhere; the
// few loops that matter get their wide versions this way. Put it on plain
// (non-template) functions that call the inline math, which is then inlined
// into, and compiled for, each clone.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define COGKERN_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define COGKERN_SIMD_CLONES
#endif
