// 3D RoPE CUDA kernel: one pass over memory. Launched by rope3d_launch.cu; also runs
// on the CPU under scripts/cuda_emu (emu_rope.cpp).
//
// A block owns a few consecutive tokens. Phase 1: its threads compute the
// 2x2 mixing coefficients of every (token, channel pair) into shared memory
// (the math in rope3d_math.h, shared with the CPU backend). Phase 2: threadIdx.x
// walks the units of one row (a unit is VEC contiguous elements, i.e. VEC/2
// interleaved pairs loaded as one 16-byte vector; or one half-split pair),
// threadIdx.y walks the (batch, token, head) rows, so the trigonometry is paid
// once per token and amortized over batch * heads rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/device_seam.h"  // COGKERN_DYNAMIC_SMEM
#include "rope3d/rope3d_math.h"

namespace cogkern {
namespace {

constexpr int kThreads = 256;
constexpr int kCoeffSmemBytes = 16 * 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// LAYOUT: kVector (VEC-element 16-byte units, interleaved), kPairScalar (one
// interleaved pair, element loads: for unaligned views), kHalfSplit (one pair
// (c, c + d/2), element loads).
enum Layout { kVector = 0, kPairScalar = 1, kHalfSplit = 2 };

template <typename scalar_t, typename table_t, Layout LAYOUT, int VEC>
__global__ void __launch_bounds__(kThreads) rope3d_kernel(const RopeParams P, int tokens_per_block) {
  using A = float;
  COGKERN_DYNAMIC_SMEM(smem_raw);
  PairCoeffs<A>* coeffs = reinterpret_cast<PairCoeffs<A>*>(smem_raw);

  const int half_d = int(P.head_dim / 2);
  const int64_t tok0 = P.token_begin + int64_t(blockIdx.x) * tokens_per_block;
  const int64_t left = P.seq - tok0;
  const int ntok = left < tokens_per_block ? int(left) : tokens_per_block;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;

  for (int i = tid; i < ntok * half_d; i += nthreads) {
    coeffs[i] = rope_coeffs<A, table_t>(P, tok0 + i / half_d, i % half_d);
  }
  __syncthreads();  // [mut:rope-coeff-barrier]

  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x);
  scalar_t* out = static_cast<scalar_t*>(P.out);
  const int units = LAYOUT == kVector ? int(P.head_dim / VEC) : half_d;
  const int64_t rows = int64_t(ntok) * P.heads * P.batch;

  for (int64_t row = threadIdx.y; row < rows; row += blockDim.y) {
    const int h = int(row % P.heads);
    const int64_t r = row / P.heads;
    const int t = int(r % ntok);
    const int64_t b = r / ntok;
    const int64_t s = tok0 + t;
    const scalar_t* xr = x + b * P.x_stride_b + s * P.x_stride_s + h * P.x_stride_h;
    scalar_t* yr = out + b * P.out_stride_b + s * P.out_stride_s + h * P.out_stride_h;
    const PairCoeffs<A>* kr = coeffs + t * half_d;

    for (int u = threadIdx.x; u < units; u += blockDim.x) {
      if constexpr (LAYOUT == kVector) {
        Vec<scalar_t, VEC> in = *reinterpret_cast<const Vec<scalar_t, VEC>*>(xr + u * VEC);
        Vec<scalar_t, VEC> res;
#pragma unroll
        for (int k = 0; k < VEC / 2; ++k) {
          A y0, y1;
          rope_mix<A>(to_acc<A>(in.v[2 * k]), to_acc<A>(in.v[2 * k + 1]), kr[u * (VEC / 2) + k], &y0, &y1);
          res.v[2 * k] = from_acc<scalar_t>(y0);
          res.v[2 * k + 1] = from_acc<scalar_t>(y1);
        }
        *reinterpret_cast<Vec<scalar_t, VEC>*>(yr + u * VEC) = res;
      } else {
        int c0 = 2 * u, c1 = 2 * u + 1;
        if constexpr (LAYOUT == kHalfSplit) {
          const RopePair pr = rope_pair(u, P.axes, false);
          c0 = pr.c0;
          c1 = pr.c1;
        }
        A y0, y1;
        rope_mix<A>(to_acc<A>(xr[c0]), to_acc<A>(xr[c1]), kr[u], &y0, &y1);
        yr[c0] = from_acc<scalar_t>(y0);
        yr[c1] = from_acc<scalar_t>(y1);
      }
    }
  }
}

inline bool aligned_for(const RopeParams& P, int vec, int elem_bytes) {
  const auto ok = [&](int64_t v) { return v % vec == 0; };
  const uintptr_t align = uintptr_t(vec) * elem_bytes;
  return ok(P.head_dim) && ok(P.x_stride_b) && ok(P.x_stride_s) && ok(P.x_stride_h) && ok(P.out_stride_b) &&
         ok(P.out_stride_s) && ok(P.out_stride_h) && reinterpret_cast<uintptr_t>(P.x) % align == 0 &&
         reinterpret_cast<uintptr_t>(P.out) % align == 0;
}

// Block shape, tokens per block and layout of one launch (host side; shared
// with the CPU emulator's harness, scripts/cuda_emu/emu_rope.cpp).
struct RopeLaunchPlan {
  Layout layout = kHalfSplit;
  int bx = 1, by = 1;            // threadIdx.x: units of a row; threadIdx.y: rows
  int tokens_per_block = 1;
  int64_t blocks = 0;            // 0: nothing to do
  size_t smem = 0;               // the blocks' mixing coefficients
};

inline RopeLaunchPlan rope_launch_plan(const RopeParams& P, int elem_bytes) {
  RopeLaunchPlan plan;
  const int vec = 16 / elem_bytes;
  const int64_t ntokens = P.seq - P.token_begin;
  if (ntokens <= 0 || P.batch == 0 || P.heads == 0) return plan;

  const int half_d = int(P.head_dim / 2);
  if (P.mode == RopeMode::kTable || P.interleaved) {
    plan.layout = aligned_for(P, vec, elem_bytes) ? kVector : kPairScalar;
  }
  const int units = plan.layout == kVector ? int(P.head_dim / vec) : half_d;
  plan.bx = std::min(units, kThreads);
  plan.by = std::max(1, kThreads / plan.bx);

  // Enough tokens per block that each row-thread gets a few rows, few enough
  // that the coefficients fit in kCoeffSmemBytes.
  const int64_t rows_per_token = P.batch * P.heads;
  const int64_t max_tok = std::max<int64_t>(1, kCoeffSmemBytes / (int64_t(half_d) * sizeof(PairCoeffs<float>)));
  int64_t tok = ceil_div(4 * plan.by, rows_per_token);
  tok = std::clamp<int64_t>(tok, 1, std::min<int64_t>(max_tok, ntokens));
  plan.tokens_per_block = int(tok);
  plan.blocks = ceil_div(ntokens, tok);
  plan.smem = size_t(tok) * half_d * sizeof(PairCoeffs<float>);
  return plan;
}

}  // namespace
}  // namespace cogkern
