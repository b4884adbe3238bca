// Mixed-precision AdamW and dynamic loss scaling: the math, shared by the CUDA
// kernels (adamw_launch.cu) and the CPU backend (csrc/adamw/adamw_cpu.cpp). Torch-free.
//
// One optimizer step reads the gradients at most twice (check, update), plus
// two tiny kernels:
//   1. grad check (read-only): per chunk, which of inf / NaN it holds (GradFlag
//      bits) and the sum of squares of the unscaled gradients, written to one
//      slot per chunk (no atomics, so the norm is reproducible run to run);
//   2. finalize (one block): found_inf, inv_scale, clip coefficient, grad norm
//      into a 4-float device buffer, the "step scalars"; optionally, per tensor,
//      the OR of its chunks' bits (which gradients overflowed), from the same
//      partials, so naming the culprits costs no extra pass over the gradients;
//   3. update: each chunk reads the step scalars; on found_inf it returns
//      before touching anything, so params, master weights, moments and step
//      counts stay bit-for-bit unchanged without the host ever looking.
// The step count of every tensor is then advanced by a tiny kernel, again only
// when found_inf is clear. Without a loss scale or clipping, step 1 is skipped.
#pragma once

#include "common/multi_tensor.h"


namespace cogkern {

// ---------------------------------------------------------------------------
// Launch descriptions (they travel in the kernel parameter block: < 32 KB)
// ---------------------------------------------------------------------------

constexpr int kAdamWMaxTensors = 224;
constexpr int kAdamWMaxGroups = 24;
constexpr int kGradCheckMaxTensors = 768;
// The grad check's CUDA kernel loads 16 bytes per lane (GradCheckChunk's N = 16 / sizeof(T)): a
// tensor takes the vector path when its start is 16-byte aligned (chunks and lane offsets are
// multiples of N elements), else element loads.
constexpr size_t kGradCheckVectorBytes = 16;

// Slots of the step-scalar buffer (float32 on the params' device).
enum StepScalar : int { kFoundInf = 0, kInvScale = 1, kClipCoef = 2, kGradNorm = 3, kNumStepScalars = 4 };

enum class AdamWMode : int {
  kPlain = 0,       // update the params in their own dtype (round to nearest)
  kMaster = 1,      // fp32 master weights; params := round_to_nearest(master)
  kStochastic = 2,  // bf16 params, no master: stochastic rounding of the fp32 result
  kRemainder = 3,   // bf16 params + int16 remainders: together exactly the fp32 master
};

// How exp_avg / exp_avg_sq are stored.
enum class MomentStore : int {
  kF32 = 0,   // fp32
  kBF16 = 1,  // bf16, written back with stochastic rounding
  kInt8 = 2,  // 8-bit codes, kMomentBlock per fp32 scale (adamw_int8 below)
};

// Elements per int8 moment block (one fp32 scale each). Chunks hold whole blocks.
constexpr int kMomentBlock = 256;
static_assert(kMultiTensorChunk % kMomentBlock == 0, "a chunk must hold whole moment blocks");

// Every (param dtype, mode, moment storage) the backends compile: X(name, DType, T, mode, moments), with
// the backend's 16-bit types as F16 / BF16. Compressed moments come with every param precision but
// 16-bit params without masters (few instantiations; FusedAdamW refuses that combination).
#define COGKERN_ADAMW_VARIANTS(X, F16, BF16)                                               \
  X(f32_plain_f32, kFloat, float, kPlain, kF32)                                            \
  X(f16_plain_f32, kHalf, F16, kPlain, kF32)                                               \
  X(f16_master_f32, kHalf, F16, kMaster, kF32)                                             \
  X(bf16_plain_f32, kBFloat16, BF16, kPlain, kF32)                                         \
  X(bf16_master_f32, kBFloat16, BF16, kMaster, kF32)                                       \
  X(bf16_stochastic_f32, kBFloat16, BF16, kStochastic, kF32)                               \
  X(bf16_remainder_f32, kBFloat16, BF16, kRemainder, kF32)                                 \
  X(f32_plain_bf16, kFloat, float, kPlain, kBF16)                                          \
  X(f16_master_bf16, kHalf, F16, kMaster, kBF16)                                           \
  X(bf16_master_bf16, kBFloat16, BF16, kMaster, kBF16)                                     \
  X(bf16_stochastic_bf16, kBFloat16, BF16, kStochastic, kBF16)                             \
  X(bf16_remainder_bf16, kBFloat16, BF16, kRemainder, kBF16)                             \
  X(f32_plain_int8, kFloat, float, kPlain, kInt8)                                          \
  X(f16_master_int8, kHalf, F16, kMaster, kInt8)                                           \
  X(bf16_master_int8, kBFloat16, BF16, kMaster, kInt8)                                     \
  X(bf16_stochastic_int8, kBFloat16, BF16, kStochastic, kInt8)                             \
  X(bf16_remainder_int8, kBFloat16, BF16, kRemainder, kInt8)

CK_HD bool adamw_variant_compiled(DType dtype, AdamWMode mode, MomentStore moments) {
#define COGKERN_ADAMW_MATCH(NAME, DT, T, MODE, MS) \
  if (dtype == DType::DT && mode == AdamWMode::MODE && moments == MomentStore::MS) return true;
  COGKERN_ADAMW_VARIANTS(COGKERN_ADAMW_MATCH, void, void)
#undef COGKERN_ADAMW_MATCH
  return false;
}

struct AdamWGroup {
  double lr = 0;
  const float* lr_ptr = nullptr;  // when set, lr is read from the device (a tensor lr)
  double beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
};

struct AdamWTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  void* exp_avg = nullptr;      // float, bf16 bits or int8 codes (MomentStore)
  void* exp_avg_sq = nullptr;   // float, bf16 bits or uint8 codes
  float* exp_avg_scale = nullptr;     // kInt8: one per block of kMomentBlock elements
  float* exp_avg_sq_scale = nullptr;  // kInt8
  void* master = nullptr;  // kMaster: float; kRemainder: int16 remainders
  float* step = nullptr;    // the tensor's step count (float32, like torch's state['step'])
  int64_t numel = 0;
  int64_t chunk_begin = 0;  // first global chunk of this tensor in its launch
  int32_t group = 0;        // index into AdamWLaunch::groups
  uint32_t rng_id = 0;      // stable id of the param, for stochastic rounding
  int32_t vector_ok = 0;    // every pointer aligned for kMultiTensorILP-wide vector access
};

struct AdamWLaunch {
  AdamWGroup groups[kAdamWMaxGroups];
  AdamWTensor tensors[kAdamWMaxTensors];
  int num_tensors = 0;
  int64_t num_chunks = 0;
  const float* step_scalars = nullptr;  // null: no loss scaling, no clipping, never skip
  uint64_t seed = 0;                    // stochastic rounding
};

struct GradCheckTensor {
  void* grad = nullptr;
  int64_t numel = 0;
  int64_t chunk_begin = 0;
  int32_t vector_ok = 0;
  int32_t flag_index = 0;  // this tensor's entry of the finalize's tensor_flags
};

struct GradCheckLaunch {
  GradCheckTensor tensors[kGradCheckMaxTensors];
  int num_tensors = 0;
  int64_t num_chunks = 0;
  float* partials = nullptr;    // kGradCheckPartialWords per chunk, this launch's part
  const float* scale = nullptr; // loss scale; null means 1
  bool unscale_inplace = false; // also write grad * (1 / scale) back (GradScaler.unscale_)
};

// Packing, shared by the op glue (adamw_op.h) and the emulator's harness
// (scripts/cuda_emu/emu_optim.cpp): appends a tensor to a launch that has room
// for it (the caller flushes full launches), at the launch's next chunk, with
// vector access where every pointer allows it. elem_bytes: the size of one
// param / grad element; moment_bytes: of one exp_avg / exp_avg_sq element (4, 2
// or 1); master_bytes: of one master (4) or remainder (2) element.
// A tensor starts a chunk, and a chunk is a whole number of int8 moment blocks,
// so a block never straddles two tensors: block b of a tensor is its elements
// [b * kMomentBlock, (b + 1) * kMomentBlock), the last one cut short.
inline bool vector_aligned(const void* p, size_t elem_bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (size_t(kMultiTensorILP) * elem_bytes) == 0;
}
inline void append_tensor(AdamWLaunch& L, AdamWTensor t, size_t elem_bytes, size_t moment_bytes = 4,
                          size_t master_bytes = 4) {
  t.chunk_begin = L.num_chunks;
  t.vector_ok = vector_aligned(t.param, elem_bytes) && vector_aligned(t.grad, elem_bytes) &&
                vector_aligned(t.exp_avg, moment_bytes) && vector_aligned(t.exp_avg_sq, moment_bytes) &&
                vector_aligned(t.master, master_bytes);
  L.tensors[L.num_tensors++] = t;
  L.num_chunks += chunks_of(t.numel);
}
inline void append_tensor(GradCheckLaunch& L, void* grad, int64_t numel, size_t /*elem_bytes: 16-byte rule for all*/,
                          int32_t flag_index = 0) {
  GradCheckTensor& d = L.tensors[L.num_tensors++];
  d.grad = grad;
  d.numel = numel;
  d.chunk_begin = L.num_chunks;
  d.flag_index = flag_index;
  // Chunks start at multiples of kMultiTensorChunk elements: aligned when the tensor is.
  d.vector_ok = reinterpret_cast<uintptr_t>(grad) % kGradCheckVectorBytes == 0;
  L.num_chunks += chunks_of(numel);
}

// ---------------------------------------------------------------------------
// AdamW, exactly as torch.optim.AdamW's single-tensor path computes it:
//   p  = p * (1 - lr * wd)
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   p  = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The per-step scalars are formed in double (as torch does in Python), the
// element math in fp32, in torch's operation order.
// ---------------------------------------------------------------------------

struct AdamWCoeffs {
  float decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps;
};

CK_HD AdamWCoeffs adamw_coeffs(const AdamWGroup& g, float step) {
  const double lr = g.lr_ptr != nullptr ? double(*g.lr_ptr) : g.lr;
  const double bias_correction1 = 1.0 - pow(g.beta1, double(step));
  const double bias_correction2 = 1.0 - pow(g.beta2, double(step));
  AdamWCoeffs c;
  c.decay = float(1.0 - lr * g.weight_decay);
  c.lerp_weight = float(1.0 - g.beta1);
  c.beta2 = float(g.beta2);
  c.one_minus_beta2 = float(1.0 - g.beta2);
  c.neg_step_size = float(-(lr / bias_correction1));
  c.bias_correction2_sqrt = float(sqrt(bias_correction2));
  c.eps = float(g.eps);
  return c;
}

// Single-rounding float ops. On the device they stop nvcc from contracting
// a * b + c into an FMA, so the CUDA kernel rounds exactly where the CPU
// backend (x86-64, no FMA contraction) and torch's formulas do.
CK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
CK_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
CK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
CK_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  // IEEE sqrt. The CPU backend (adamw_cpu.cpp, its only host caller) is built
  // with -fno-math-errno, so this vectorizes there instead of branching to errno.
  return std::sqrt(a);
#endif
}

// torch's lerp: the form that is exact at its end point. Both forms are
// computed and one picked with a bit mask (no branch), so the host compiler
// can vectorize the element loop; the result is exactly the chosen form.
CK_HD float lerp_acc(float start, float end, float w) {
  const float diff = sub_rn(end, start);
  const float from_start = add_rn(start, mul_rn(w, diff));
  const float from_end = sub_rn(end, mul_rn(diff, sub_rn(1.0f, w)));
  const uint32_t pick_start = 0u - uint32_t(fabsf(w) < 0.5f);
  return bits_float((float_bits(from_start) & pick_start) | (float_bits(from_end) & ~pick_start));
}

CK_HD void adamw_element(float& p, float& m, float& v, float g, const AdamWCoeffs& c) {
  p = mul_rn(p, c.decay);
  m = lerp_acc(m, g, c.lerp_weight);
  v = mul_rn(v, c.beta2);
  v = add_rn(v, mul_rn(mul_rn(c.one_minus_beta2, g), g));
  const float denom = add_rn(div_rn(sqrt_rn(v), c.bias_correction2_sqrt), c.eps);
  p = add_rn(p, div_rn(mul_rn(c.neg_step_size, m), denom));
}

// ---------------------------------------------------------------------------
// Stochastic rounding fp32 -> bf16. Random bits come from a counter-based hash
// of (seed, param id, step, element index): reproducible, identical on CPU and
// CUDA, independent of how chunks are scheduled.
// ---------------------------------------------------------------------------

CK_HD uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

CK_HD uint64_t sr_stream_key(uint64_t seed, uint32_t rng_id, uint32_t step) {
  return mix64(seed ^ mix64((uint64_t(rng_id) << 32) | step));
}

// 16 random bits for element i; one hash feeds four consecutive elements.
CK_HD uint32_t sr_bits(uint64_t key, int64_t i) {
  const uint64_t h = mix64(key ^ (uint64_t(i >> 2) * 0xD6E8FEB86659FD93ull));
  return uint32_t(h >> (16 * (i & 3))) & 0xFFFFu;
}

// Straight-line (mask selects, no branches), so the CPU loop vectorizes.
CK_HD uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(c);
  return (a & mask) | (b & ~mask);
}

// Round-to-nearest-even fp32 -> bf16 bits (NaN stays a quiet NaN).
CK_HD uint16_t bf16_bits_rn(float x) {
  const uint32_t b = float_bits(x);
  return uint16_t(select_u32((b & 0x7FFFFFFFu) > 0x7F800000u, (b >> 16) | 0x0040u, (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16));
}

// Unbiased: rounds up with probability (distance to the lower bf16 neighbour) / ulp.
CK_HD uint16_t bf16_bits_stochastic(float x, uint32_t random16) {
  const uint32_t b = float_bits(x);
  // inf / NaN stay as they are (selected, not branched: the CPU loop vectorizes)
  return uint16_t(select_u32((b & 0x7F800000u) == 0x7F800000u, bf16_bits_rn(x), (b + random16) >> 16));
}

CK_HD float bf16_bits_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// ---------------------------------------------------------------------------
// The per-chunk bodies (multi_tensor.h): one (tensor, chunk), lanes striding.
// T is the param/grad storage type (float, or a 16-bit type of the backend).
// N: elements per lane and iteration; the CUDA kernels use kMultiTensorILP
// (one 16-byte load), the CPU backend a SIMD register's worth. Every element's
// arithmetic is the same whatever N is.
// ---------------------------------------------------------------------------

// bf16 param + int16 remainder == the fp32 master (TransformerEngine's
// store_param_remainders): 2 bytes per param less than a fp32 master, with the
// same master values bit for bit. The param is the master rounded to nearest,
// ties away from zero (the magnitude bits are rounded up when the dropped half
// is >= 0x8000; ties-to-even could not be undone from 16 bits, as both
// neighbours of a tie then have an even top half), and the remainder is the
// master's low 16 bits, as an int16 that is negative exactly when the param was
// rounded up. NaN keeps its top half (quiet) and a non-negative remainder.
CK_HD float master_from_remainder(uint16_t param_bits, int16_t remainder) {
  const uint32_t top = uint32_t(param_bits) - uint32_t(remainder < 0);
  return bits_float((top << 16) | uint32_t(uint16_t(remainder)));
}
CK_HD void split_master(float master, uint16_t& param_bits, int16_t& remainder) {
  const uint32_t b = float_bits(master);
  const uint32_t low = b & 0xFFFFu;
  const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
  param_bits = uint16_t(select_u32(nan, (b >> 16) | 0x0040u, (b >> 16) + (low >> 15)));
  remainder = int16_t(uint16_t(select_u32(nan, low & 0x7FFFu, low)));
}

// int8 moments. Per block, the fp32 scale is the block's absmax A (exact: a
// max is the same in any order, so CPU and CUDA agree), and r = |x| / A in
// [0, 1] is coded as a small float of R binades and 3 mantissa bits: code 0
// is 0, code q >= 1 is 2^-R * (1 + (q - 1) / 8), i.e. the fp32 bit pattern
// base + ((q - 1) << 20); below 2^-R the code is 0 or 1 (linear). Coding
// rounds stochastically (16 random bits, counter-based as above), so the EMAs
// stay unbiased and never stall on a code (round to nearest would freeze v,
// whose relative step per update, 1 - beta2, is far below the code spacing).
// exp_avg: int8, sign and magnitude code, R = 15 (4.5 decades below the block
// max); exp_avg_sq: uint8, R = 31 (9 decades, v spans twice m's), and a v > 0
// never codes to 0 (that would make the update m / eps).
template <bool SIGNED>
struct MomentCode {
  static constexpr int kRange = SIGNED ? 15 : 31;
  static constexpr uint32_t kBase = uint32_t(127 - kRange) << 23;  // bits of 2^-R
  static constexpr uint32_t kMaxCode = uint32_t(kRange) * 8u + 1u;  // codes 1.0 exactly
  static constexpr float kLinear = SIGNED ? 2147483648.0f : 140737488355328.0f;  // 2^(R + 16)
};

template <bool SIGNED>
CK_HD float decode_moment_magnitude(uint32_t q) {
  return bits_float(select_u32(q != 0, MomentCode<SIGNED>::kBase + ((q - 1u) << 20), 0u));
}

// q for r = |x| / A in [0, 1] (a NaN r saturates; the block is NaN through A anyway).
template <bool SIGNED>
CK_HD uint32_t encode_moment_magnitude(float r, uint32_t random16) {
  using C = MomentCode<SIGNED>;
  const uint32_t b = float_bits(r);
  const uint32_t normal = ((b - C::kBase + (random16 << 4)) >> 20) + 1u;
  const uint32_t linear = uint32_t(uint32_t(r * C::kLinear) > random16);
  const uint32_t q = select_u32(b >= C::kBase, normal, linear);
  return select_u32(q < C::kMaxCode, q, C::kMaxCode);
}

// The int8 exp_avg code: sign and magnitude (two's complement of the magnitude code).
CK_HD float decode_exp_avg(int32_t c, float scale) {
  const int32_t sign = c >> 31;
  const float mag = mul_rn(decode_moment_magnitude<true>(uint32_t((c ^ sign) - sign)), scale);
  return bits_float(float_bits(mag) | (uint32_t(sign) << 31));
}
CK_HD int32_t encode_exp_avg(float m, float inv_scale, uint32_t random16) {
  const int32_t mag = int32_t(encode_moment_magnitude<true>(mul_rn(bits_float(float_bits(m) & 0x7FFFFFFFu), inv_scale),
                                                            random16));
  const int32_t sign = -int32_t(float_bits(m) >> 31);
  return (mag ^ sign) - sign;  // in [-121, 121]
}
// The uint8 exp_avg_sq code; a v > 0 never codes to 0.
CK_HD float decode_exp_avg_sq(uint32_t code, float scale) {
  return mul_rn(decode_moment_magnitude<false>(code), scale);
}
CK_HD uint32_t encode_exp_avg_sq(float v, float inv_scale, uint32_t random16) {
  const uint32_t q = encode_moment_magnitude<false>(mul_rn(v, inv_scale), random16);
  return q | (uint32_t(q == 0) & uint32_t(v > 0.0f));  // in [0, 249]
}

// Absolute value's bits: unsigned compare orders them as the values (NaN above inf).
CK_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

// One lane per int8 block (the CPU backend); the CUDA kernels let a warp share a block.
struct OneLanePerBlock {
  static constexpr int kLanes = 1;
  CK_HD static uint32_t max(uint32_t x) { return x; }
};

// The moments' random bits (bf16 and int8 storage): one 32-bit hash per element,
// 16 bits for exp_avg and 16 for exp_avg_sq, from a stream of its own (not the
// params'). 32-bit multiplies only (two rounds of Wellons' lowbias32), so the
// CPU loop stays vectorized where 64-bit multiplies are not (AVX-512F, AVX2).
constexpr uint64_t kMomentStream = 0xA5A5F00DC0FFEE01ull;

CK_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

CK_HD uint32_t moment_bits(uint64_t key, int64_t i) {
  const uint32_t x = (uint32_t(i) * 0x9E3779B9u) ^ (uint32_t(uint64_t(i) >> 32) * 0x85EBCA6Bu) ^ uint32_t(key);
  return lowbias32(lowbias32(x) ^ uint32_t(key >> 32));
}

// ---------------------------------------------------------------------------
// The per-chunk body (multi_tensor.h): one (tensor, chunk), lanes striding.
// T is the param/grad storage type (float, or a 16-bit type of the backend);
// MODE how the fp32 value of the param is kept, MS how the moments are.
// N: elements per lane and iteration; the CUDA kernels use kMultiTensorILP
// (one 16-byte load), the CPU backend a SIMD register's worth. Every element's
// arithmetic is the same whatever N is.
// ---------------------------------------------------------------------------

// LANES (int8 moments only): how many lanes share a block and the max over them.
template <typename T, AdamWMode MODE, MomentStore MS, int N = kMultiTensorILP, typename LANES = OneLanePerBlock>
struct AdamWChunk {
  static_assert(MODE != AdamWMode::kStochastic || sizeof(T) == 2, "stochastic rounding writes bf16 bits");
  static_assert(MODE != AdamWMode::kRemainder || sizeof(T) == 2, "remainders complete bf16 params");

  CK_HD void operator()(const AdamWLaunch& L, int t, int64_t chunk, int lane, int nlanes) const {
    const float* scalars = L.step_scalars;
    if (scalars != nullptr && scalars[kFoundInf] != 0.0f) return;  // skipped step: touch nothing
    const AdamWTensor& d = L.tensors[t];
    const float step = *d.step + 1.0f;
    const AdamWCoeffs c = adamw_coeffs(L.groups[d.group], step);
    const float inv_scale = scalars != nullptr ? scalars[kInvScale] : 1.0f;
    const float clip = scalars != nullptr ? scalars[kClipCoef] : 1.0f;
    uint64_t key = 0, key_mv = 0;
    if constexpr (MODE == AdamWMode::kStochastic) key = sr_stream_key(L.seed, d.rng_id, uint32_t(step));
    if constexpr (MS != MomentStore::kF32) key_mv = sr_stream_key(L.seed ^ kMomentStream, d.rng_id, uint32_t(step));

    const int64_t begin = chunk * kMultiTensorChunk;
    const int64_t end = begin + kMultiTensorChunk < d.numel ? begin + kMultiTensorChunk : d.numel;
    if constexpr (MS == MomentStore::kInt8) {
      int8_chunk(d, c, inv_scale, clip, key, key_mv, begin, end, lane, nlanes);
    } else {
      T* param = static_cast<T*>(d.param);
      const T* grad = static_cast<const T*>(d.grad);
      const bool vec = d.vector_ok != 0;
      const T zero = from_acc<T>(0.0f);
      for (int64_t i = begin + int64_t(lane) * N; i < end; i += int64_t(nlanes) * N) {
        const int64_t n = end - i < N ? end - i : N;
        T g_raw[N], p_raw[N];
        float m[N], v[N], p[N];
        int16_t rem[N];
        mt_load<T, N>(grad + i, n, vec, g_raw, zero);
        load_moments(d.exp_avg, i, n, vec, m);
        load_moments(d.exp_avg_sq, i, n, vec, v);
        load_param(d, param, i, n, vec, p, p_raw, rem);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          // Unscale, then clip: two roundings, as GradScaler.unscale_ + clip_grad_norm_ would.
          const float g = mul_rn(mul_rn(to_acc<float>(g_raw[k]), inv_scale), clip);
          adamw_element(p[k], m[k], v[k], g, c);
          round_param(p[k], p_raw[k], rem[k], key, i + k);
        }
        store_moments(d.exp_avg, d.exp_avg_sq, i, n, vec, m, v, key_mv);
        store_param(d, param, i, n, vec, p, p_raw, rem);
      }
    }
  }

 private:
  // int8 moments: LANES::kLanes lanes share each block of kMomentBlock elements,
  // each holding kPerLane of them (in N-wide groups, the group's lanes side by
  // side: coalesced) from the update to the requantize. Pass 1 dequantizes,
  // updates and writes the param; the block's absmax of the new moments is
  // reduced over the lanes; pass 2 codes them. The codes and scales of a block
  // are only read before the reduction and written after it.
  static constexpr int kPerLane = kMomentBlock / LANES::kLanes;
  static constexpr int kGroups = kPerLane / N;
  static_assert(kPerLane % N == 0, "a lane's share of a block must be whole N-groups");

  CK_HD static void int8_chunk(const AdamWTensor& d, const AdamWCoeffs& c, float inv_scale, float clip, uint64_t key,
                               uint64_t key_mv, int64_t begin, int64_t end, int lane, int nlanes) {
    T* param = static_cast<T*>(d.param);
    const T* grad = static_cast<const T*>(d.grad);
    int8_t* m_codes = static_cast<int8_t*>(d.exp_avg);
    uint8_t* v_codes = static_cast<uint8_t*>(d.exp_avg_sq);
    const bool vec = d.vector_ok != 0;
    const T zero = from_acc<T>(0.0f);
    const int sub = lane % LANES::kLanes;
    const int block_lanes = nlanes / LANES::kLanes;
    const int64_t first_block = begin / kMomentBlock;
    const int64_t num_blocks = ceil_div(end - begin, kMomentBlock);
    // Every lane of a group runs the same blocks (the lane reduction needs all of them).
    for (int64_t b = first_block + lane / LANES::kLanes; b < first_block + num_blocks; b += block_lanes) {
      const int64_t block_begin = b * kMomentBlock;
      const int64_t block_end = block_begin + kMomentBlock < end ? block_begin + kMomentBlock : end;
      const float m_scale = d.exp_avg_scale[b], v_scale = d.exp_avg_sq_scale[b];
      float m[kGroups][N], v[kGroups][N];
      uint32_t m_max = 0, v_max = 0;
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
        const int64_t i = block_begin + int64_t(j) * LANES::kLanes * N + int64_t(sub) * N;
        const int64_t n = block_end - i < N ? block_end - i : N;  // <= 0: this lane has nothing here
        T g_raw[N], p_raw[N];
        float p[N];
        int16_t rem[N];
        int8_t mq[N];
        uint8_t vq[N];
        mt_load<T, N>(grad + i, n, vec, g_raw, zero);
        mt_load<int8_t, N>(m_codes + i, n, vec, mq, int8_t(0));
        mt_load<uint8_t, N>(v_codes + i, n, vec, vq, uint8_t(0));
        load_param(d, param, i, n, vec, p, p_raw, rem);
        // Decode, update and code in separate loops of one element width each: they vectorize.
#pragma unroll
        for (int k = 0; k < N; ++k) {
          m[j][k] = decode_exp_avg(mq[k], m_scale);
          v[j][k] = decode_exp_avg_sq(vq[k], v_scale);
        }
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float g = mul_rn(mul_rn(to_acc<float>(g_raw[k]), inv_scale), clip);
          adamw_element(p[k], m[j][k], v[j][k], g, c);
          round_param(p[k], p_raw[k], rem[k], key, i + k);
          // Padding (k >= n) is 0 in and 0 out, so it never raises the max.
          m_max = m_max > abs_bits(m[j][k]) ? m_max : abs_bits(m[j][k]);
          v_max = v_max > abs_bits(v[j][k]) ? v_max : abs_bits(v[j][k]);
        }
        store_param(d, param, i, n, vec, p, p_raw, rem);
      }
      m_max = LANES::max(m_max);
      v_max = LANES::max(v_max);
      const float m_abs = bits_float(m_max), v_abs = bits_float(v_max);
      // Zero blocks keep zero codes; 1 / A is exact enough: r may exceed 1 by an ulp, which saturates.
      const float m_inv = m_max == 0 ? 0.0f : div_rn(1.0f, m_abs);
      const float v_inv = v_max == 0 ? 0.0f : div_rn(1.0f, v_abs);
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
        const int64_t i = block_begin + int64_t(j) * LANES::kLanes * N + int64_t(sub) * N;
        const int64_t n = block_end - i < N ? block_end - i : N;
        int32_t m_code[N];
        uint32_t v_code[N];
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const uint32_t random = moment_bits(key_mv, i + k);
          m_code[k] = encode_exp_avg(m[j][k], m_inv, random & 0xFFFFu);
          v_code[k] = encode_exp_avg_sq(v[j][k], v_inv, random >> 16);
        }
        int8_t mq[N];
        uint8_t vq[N];
#pragma unroll
        for (int k = 0; k < N; ++k) {
          mq[k] = int8_t(m_code[k]);
          vq[k] = uint8_t(v_code[k]);
        }
        mt_store<int8_t, N>(m_codes + i, n, vec, mq);
        mt_store<uint8_t, N>(v_codes + i, n, vec, vq);
      }
      if (sub == 0) {
        d.exp_avg_scale[b] = m_abs;
        d.exp_avg_sq_scale[b] = v_abs;
      }
    }
  }

  // The fp32 value of N params at i (and their stored form), as MODE keeps it.
  CK_HD static void load_param(const AdamWTensor& d, const T* param, int64_t i, int64_t n, bool vec, float (&p)[N],
                               T (&p_raw)[N], int16_t (&rem)[N]) {
    const T zero = from_acc<T>(0.0f);
    if constexpr (MODE == AdamWMode::kMaster) {
      mt_load<float, N>(static_cast<const float*>(d.master) + i, n, vec, p, 0.0f);
    } else {
      mt_load<T, N>(param + i, n, vec, p_raw, zero);
      if constexpr (MODE == AdamWMode::kRemainder) {
        mt_load<int16_t, N>(static_cast<const int16_t*>(d.master) + i, n, vec, rem, int16_t(0));
#pragma unroll
        for (int k = 0; k < N; ++k) p[k] = master_from_remainder(bits16(p_raw[k]), rem[k]);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) p[k] = to_acc<float>(p_raw[k]);
      }
    }
  }
  CK_HD static void round_param(float p, T& p_raw, int16_t& rem, uint64_t key, int64_t i) {
    if constexpr (MODE == AdamWMode::kStochastic) {
      p_raw = from_bits16<T>(bf16_bits_stochastic(p, sr_bits(key, i)));
    } else if constexpr (MODE == AdamWMode::kRemainder) {
      uint16_t b;
      split_master(p, b, rem);
      p_raw = from_bits16<T>(b);
    } else {
      p_raw = from_acc<T>(p);
    }
  }
  CK_HD static void store_param(const AdamWTensor& d, T* param, int64_t i, int64_t n, bool vec, const float (&p)[N],
                                const T (&p_raw)[N], const int16_t (&rem)[N]) {
    if constexpr (MODE == AdamWMode::kMaster) mt_store<float, N>(static_cast<float*>(d.master) + i, n, vec, p);
    if constexpr (MODE == AdamWMode::kRemainder) mt_store<int16_t, N>(static_cast<int16_t*>(d.master) + i, n, vec, rem);
    mt_store<T, N>(param + i, n, vec, p_raw);
  }

  template <typename U>
  CK_HD static uint16_t bits16(U x) {
    uint16_t b;
    memcpy(&b, &x, sizeof(b));
    return b;
  }
  template <typename U>
  CK_HD static U from_bits16(uint16_t b) {
    U x;
    memcpy(&x, &b, sizeof(b));
    return x;
  }

  // fp32 or bf16 moments, elements [i, i + n) (the rest of the group is 0).
  CK_HD static void load_moments(const void* base, int64_t i, int64_t n, bool vec, float (&out)[N]) {
    if constexpr (MS == MomentStore::kF32) {
      mt_load<float, N>(static_cast<const float*>(base) + i, n, vec, out, 0.0f);
    } else {
      uint16_t raw[N];
      mt_load<uint16_t, N>(static_cast<const uint16_t*>(base) + i, n, vec, raw, uint16_t(0));
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = bf16_bits_to_float(raw[k]);
    }
  }
  CK_HD static void store_moments(void* m_base, void* v_base, int64_t i, int64_t n, bool vec, const float (&m)[N],
                                  const float (&v)[N], uint64_t key) {
    if constexpr (MS == MomentStore::kF32) {
      mt_store<float, N>(static_cast<float*>(m_base) + i, n, vec, m);
      mt_store<float, N>(static_cast<float*>(v_base) + i, n, vec, v);
    } else {
      uint16_t m_raw[N], v_raw[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const uint32_t random = moment_bits(key, i + k);
        m_raw[k] = bf16_bits_stochastic(m[k], random & 0xFFFFu);
        v_raw[k] = bf16_bits_stochastic(v[k], random >> 16);
      }
      mt_store<uint16_t, N>(static_cast<uint16_t*>(m_base) + i, n, vec, m_raw);
      mt_store<uint16_t, N>(static_cast<uint16_t*>(v_base) + i, n, vec, v_raw);
    }
  }
};

// After every chunk of a launch is done: advance the tensor's step unless skipped.
CK_HD void adamw_advance_step(const AdamWLaunch& L, int t) {
  const float* scalars = L.step_scalars;
  if (scalars != nullptr && scalars[kFoundInf] != 0.0f) return;
  *L.tensors[t].step += 1.0f;
}

// What the grad check found, as bits: per tensor (tensor_flags[i]) kGradInf / kGradNaN; in the
// summary entry after them also kGradScanned (the gradients were scanned at all) and
// kGradFoundInfIn (the found_inf passed in, e.g. torch.amp.GradScaler's, was set), so that a
// skipped step with no culprit here can say where its flag came from.
enum GradFlag : uint32_t { kGradInf = 1, kGradNaN = 2, kGradScanned = 4, kGradFoundInfIn = 8 };

// kGradInf if g is +-inf, kGradNaN if it is a NaN, else 0 (branch-free: the CPU loop vectorizes).
CK_HD uint32_t nonfinite_bits(float g) {
  const uint32_t magnitude = float_bits(g) & 0x7FFFFFFFu;
  return uint32_t(magnitude == 0x7F800000u) * kGradInf | uint32_t(magnitude > 0x7F800000u) * kGradNaN;
}

struct GradCheckPartial {
  float sumsq = 0.0f;
  uint32_t nonfinite = 0;  // GradFlag bits
};

// A chunk's slot in the partials buffer (float32): its sum of squares, then its bits and its
// tensor's flag index, both stored bit for bit (the finalize groups chunks by that index).
constexpr int kGradCheckPartialWords = 3;
CK_HD void store_grad_check_partial(float* partials, int64_t c, const GradCheckPartial& p, int32_t flag_index) {
  partials[kGradCheckPartialWords * c] = p.sumsq;
  partials[kGradCheckPartialWords * c + 1] = bits_float(p.nonfinite);
  partials[kGradCheckPartialWords * c + 2] = bits_float(uint32_t(flag_index));
}
CK_HD float partial_sumsq(const float* partials, int64_t c) { return partials[kGradCheckPartialWords * c]; }
CK_HD uint32_t partial_bits(const float* partials, int64_t c) {
  return float_bits(partials[kGradCheckPartialWords * c + 1]);
}
CK_HD int32_t partial_flag_index(const float* partials, int64_t c) {
  return int32_t(float_bits(partials[kGradCheckPartialWords * c + 2]));
}

CK_HD float inv_loss_scale(const float* scale) {
  return scale != nullptr ? float(1.0 / double(*scale)) : 1.0f;
}

// Read-only unless unscale_inplace: finds inf/NaN in the (scaled) gradients and
// sums the squares of the unscaled ones (N running sums, added in order at the
// end, so that the CPU loop vectorizes; deterministic for a given N, LOADS and
// lane count). N: elements per load (the CUDA kernel: 16 bytes, the CPU
// backend: a SIMD register's worth); LOADS: loads a lane issues before it uses
// any (the CUDA kernel keeps several in flight), at lane offsets nlanes * N apart
// so that every load of a warp stays coalesced. Running sum k adds its elements
// in index order. Missing elements (the chunk's tail) count as zeros, which
// leave the sums as they are.
template <typename T, int N = kMultiTensorILP, int LOADS = 1>
struct GradCheckChunk {
  CK_HD GradCheckPartial operator()(const GradCheckLaunch& L, int t, int64_t chunk, int lane, int nlanes) const {
    const GradCheckTensor& d = L.tensors[t];
    const float inv_scale = inv_loss_scale(L.scale);
    T* grad = static_cast<T*>(d.grad);
    const bool vec = d.vector_ok != 0;
    const int64_t begin = chunk * kMultiTensorChunk;
    const int64_t end = begin + kMultiTensorChunk < d.numel ? begin + kMultiTensorChunk : d.numel;
    const T zero = from_acc<T>(0.0f);
    const int64_t load_stride = int64_t(nlanes) * N;  // between a lane's loads
    float sumsq[N];
    uint32_t nonfinite = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) sumsq[k] = 0.0f;
    for (int64_t i0 = begin + int64_t(lane) * N; i0 < end; i0 += load_stride * LOADS) {
      T g_raw[LOADS][N];
      int64_t n[LOADS];
      if (vec && i0 + (LOADS - 1) * load_stride + N <= end) {  // every trip but a chunk's last: straight vector loads
#pragma unroll
        for (int j = 0; j < LOADS; ++j) {
          n[j] = N;
          mt_load<T, N>(grad + i0 + j * load_stride, N, true, g_raw[j], zero);
        }
      } else {
#pragma unroll
        for (int j = 0; j < LOADS; ++j) {
          const int64_t i = i0 + j * load_stride;
          n[j] = end - i < N ? (end > i ? end - i : 0) : N;
          mt_load<T, N>(grad + (n[j] > 0 ? i : begin), n[j], vec, g_raw[j], zero);
        }
      }
#pragma unroll
      for (int j = 0; j < LOADS; ++j) {
        float u[N];
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float g = to_acc<float>(g_raw[j][k]);
          nonfinite |= nonfinite_bits(g);
          u[k] = mul_rn(g, inv_scale);
          sumsq[k] = add_rn(sumsq[k], mul_rn(u[k], u[k]));
        }
        if (L.unscale_inplace) {  // a separate pass keeps the loop above branch-free
#pragma unroll
          for (int k = 0; k < N; ++k) g_raw[j][k] = from_acc<T>(u[k]);
          mt_store<T, N>(grad + (n[j] > 0 ? i0 + j * load_stride : begin), n[j], vec, g_raw[j]);
        }
      }
    }
    GradCheckPartial r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.sumsq = add_rn(r.sumsq, sumsq[k]);
    r.nonfinite = nonfinite;
    return r;
  }
};

// The finalize's arguments (one small kernel, one block).
struct GradCheckFinalize {
  const float* partials = nullptr;     // num_chunks slots of kGradCheckPartialWords
  int64_t num_chunks = 0;
  const float* scale = nullptr;        // loss scale; null means 1
  const float* found_inf_in = nullptr; // OR-ed in (nullable): e.g. the flag torch.amp.GradScaler computed
  double max_norm = 0;                 // 0: no clipping
  float* out = nullptr;                // the step scalars
  int32_t* tensor_flags = nullptr;     // null, or num_flags per-tensor GradFlag entries, then the summary
  int64_t num_flags = 0;
  bool scanned = false;                // the grad check ran (else there are no partials)
};

// Turns the reduced check (sum of squares, OR of the chunks' bits) into the step scalars.
CK_HD void finalize_grad_check(float sumsq, uint32_t nonfinite, const GradCheckFinalize& F) {
  const bool found_in = F.found_inf_in != nullptr && *F.found_inf_in != 0.0f;
  const float norm = sqrtf(sumsq);
  F.out[kFoundInf] = nonfinite != 0 || found_in ? 1.0f : 0.0f;
  F.out[kInvScale] = inv_loss_scale(F.scale);
  F.out[kGradNorm] = norm;
  // torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), at most 1.
  float clip = 1.0f;
  if (F.max_norm > 0) {
    clip = float(F.max_norm) / (norm + 1e-6f);
    clip = clip < 1.0f ? clip : 1.0f;
  }
  F.out[kClipCoef] = clip;
  if (F.tensor_flags != nullptr) {
    F.tensor_flags[F.num_flags] =
        int32_t(nonfinite | (F.scanned ? kGradScanned : 0u) | (found_in ? kGradFoundInfIn : 0u));
  }
}

// Per-tensor flags, step 2 of 2 (step 1 zeroes the num_flags entries: tensors without chunks keep
// 0). A tensor's chunks are consecutive in the partials, so the chunk that starts its run ORs the
// run's bits and is the one writer of the tensor's entry: no atomics, the same on every schedule.
CK_HD void tensor_flag_of_run(const GradCheckFinalize& F, int64_t c) {
  const int32_t index = partial_flag_index(F.partials, c);
  if (c > 0 && partial_flag_index(F.partials, c - 1) == index) return;  // not the run's first chunk
  uint32_t bits = 0;
  for (int64_t k = c; k < F.num_chunks && partial_flag_index(F.partials, k) == index; ++k)
    bits |= partial_bits(F.partials, k);
  F.tensor_flags[index] = int32_t(bits);
}

// ---------------------------------------------------------------------------
// Dynamic loss scaling with hysteresis (Megatron-LM's semantics, with a
// floor and a ceiling):
//   overflow: growth := 0; hysteresis_left -= 1; if hysteresis_left <= 0:
//             scale := max(scale * backoff, min_scale)
//   clean:    growth += 1; if growth == interval: growth := 0,
//             hysteresis_left := hysteresis, scale := min(scale * growth_factor, max_scale)
// ---------------------------------------------------------------------------

struct LossScaleConfig {
  double growth_factor = 2.0, backoff_factor = 0.5, min_scale = 1.0, max_scale = 16777216.0;
  int32_t growth_interval = 1000, hysteresis = 2;
};

CK_HD void update_loss_scale(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker, bool found_inf,
                             const LossScaleConfig& c) {
  if (found_inf) {
    *growth_tracker = 0;
    *hysteresis_tracker -= 1;
    if (*hysteresis_tracker <= 0) {
      const double s = double(*scale) * c.backoff_factor;
      *scale = float(s > c.min_scale ? s : c.min_scale);
    }
    return;
  }
  *growth_tracker += 1;
  if (*growth_tracker >= c.growth_interval) {
    *growth_tracker = 0;
    *hysteresis_tracker = c.hysteresis;
    const double s = double(*scale) * c.growth_factor;
    *scale = float(s < c.max_scale ? s : c.max_scale);
  }
}

}  // namespace cogkern
