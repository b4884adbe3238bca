// Fp16Bits: an IEEE half stored as its 16 bits, with conversions that are
// always inlined and branch-free, so that a CPU loop over many of them
// vectorizes inside a SIMD clone (common/cpu/simd_clones.h). c10::Half's own
// conversions are software routines when the build targets the x86-64
// baseline, and are not inlined into the clones: per element calls, about 10x
// slower in the optimizer step. Same layout and the same values as c10::Half
// (round to nearest even, overflow to inf); checked over every half and a
// sweep of floats by tests/test_build.py (cogkern._C.fp16_conversion_mismatches).
#pragma once

#include <cstdint>
#include <cstring>

namespace cogkern::cpu {

#if defined(__GNUC__) || defined(__clang__)
#define COGKERN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define COGKERN_ALWAYS_INLINE inline
#endif

// c ? a : b as bit masks: straight-line code, which the compiler's
// basic-block (SLP) vectorizer handles where it would not if-convert branches.
COGKERN_ALWAYS_INLINE uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

COGKERN_ALWAYS_INLINE uint32_t fp32_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}
COGKERN_ALWAYS_INLINE float fp32_from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// Exact. Each case is computed and one picked, so the loop has no branches.
COGKERN_ALWAYS_INLINE float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa
  // normal: rebias the exponent (15 -> 127)
  const uint32_t normal = (em << 13) + (uint32_t(127 - 15) << 23);
  // inf / NaN: all-ones exponent, payload kept, NaN made quiet (as the x86
  // conversion instructions and c10's arithmetic do)
  const uint32_t special = (em << 13) | 0x7F800000u | (uint32_t(em > 0x7C00u) << 22);
  // zero / subnormal: em * 2^-24, exact in fp32
  const uint32_t small = fp32_bits(float(int32_t(em)) * 5.9604644775390625e-08f);
  const uint32_t mag = select_bits(em >= 0x7C00u, special, select_bits(em >= 0x0400u, normal, small));
  return fp32_from_bits(sign | mag);
}

// Round to nearest, ties to even; overflow gives inf, NaN a quiet NaN (0x7E00).
COGKERN_ALWAYS_INLINE uint16_t float_to_fp16_bits(float x) {
  const uint32_t f = fp32_bits(x);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7FFFFFFFu;
  // normal range: drop 13 mantissa bits with round-to-nearest-even, rebias
  const uint32_t lsb = (a >> 13) & 1u;
  const uint32_t normal = (a + 0x0FFFu + lsb - (uint32_t(127 - 15) << 23)) >> 13;
  // below 2^-14: let an fp32 add align the mantissa at 2^-24 (it rounds to
  // nearest even), then read the bits back
  const float magic = 0.5f;  // 2^-1: its ulp is 2^-24, the fp16 subnormal step
  const uint32_t subnormal = fp32_bits(fp32_from_bits(a) + magic) - fp32_bits(magic);
  const uint32_t overflow = 0x7C00u | (uint32_t(a > 0x7F800000u) << 9);  // inf (or too large), NaN: 0x7E00
  const uint32_t mag = select_bits(a >= 0x477FF000u, overflow, select_bits(a < 0x38800000u, subnormal, normal));
  return uint16_t(sign | mag);
}

struct Fp16Bits {
  uint16_t bits;
  Fp16Bits() = default;
  COGKERN_ALWAYS_INLINE explicit Fp16Bits(float x) : bits(float_to_fp16_bits(x)) {}
  COGKERN_ALWAYS_INLINE explicit operator float() const { return fp16_bits_to_float(bits); }
};
static_assert(sizeof(Fp16Bits) == 2, "Fp16Bits must have c10::Half's layout");

}  // namespace cogkern::cpu
