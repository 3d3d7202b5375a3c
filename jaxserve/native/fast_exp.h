// exp(x) for x <= 0 in a form compilers vectorize (Cephes expf: range reduction by ln 2, a degree-6
// polynomial, the exponent written into the float's bits). Relative error below 2e-7 on [-87, 0];
// inputs below -87 give ~1e-38 (the softmax weight of a key that far below the maximum is 0 anyway).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}
