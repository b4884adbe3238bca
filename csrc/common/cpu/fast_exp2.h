// A float exp2 that the compiler can vectorize (std::exp2 is a library call per
// element without -ffast-math). Accurate to ~2 ulp over the range the softmax
// uses (arguments <= 0); NaN propagates.
#pragma once

#include <cmath>
#include <cstdint>

namespace cogkern::cpu {

__attribute__((always_inline)) inline float exp2_vectorizable(float x) {
  // Below 2^-126 a softmax term is negligible next to the row max term (1);
  // clamping keeps the result a normal float and the exponent arithmetic valid.
  x = x < -126.0f ? -126.0f : x;
  x = x > 127.0f ? 127.0f : x;
  // Round to nearest integer n with the 1.5 * 2^23 trick; n sits in the low
  // mantissa bits of t, so it is read without a float -> int conversion.
  constexpr float kRound = 12582912.0f;
  const float t = x + kRound;
  const int32_t n = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, kRound);
  const float f = x - (t - kRound);  // in [-0.5, 0.5]
  // 2^f = e^(f ln 2), Taylor to degree 7: truncation error < 1e-8 relative.
  float p = 1.525273380405984e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const float two_n = __builtin_bit_cast(float, (n + 127) << 23);
  return p * two_n;
}

inline double exp2_vectorizable(double x) { return std::exp2(x); }

}  // namespace cogkern::cpu
