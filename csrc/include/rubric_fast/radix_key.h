// Order-preserving unsigned keys of floating-point values, shared by the CPU and CUDA entropy_mask.
//
// The classic radix-sort trick (e.g. CUB's RadixSort "twiddling"): flip every bit of a negative number
// and only the sign bit of a non-negative one; the unsigned order of the keys is then the numeric order
// of the values, and it is a total order (NaNs with the sign bit clear sort above +inf). -0.0 is mapped
// to +0.0 first so that the two zeros tie, as they do under a numeric comparison.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace rubric_fast {

RF_HOST_DEVICE uint32_t ordered_key_f32(float x) {
  if (x == 0.0f) x = 0.0f;  // -0.0 -> +0.0
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

RF_HOST_DEVICE uint64_t ordered_key_f64(double x) {
  if (x == 0.0) x = 0.0;
  uint64_t bits;
#if defined(__CUDA_ARCH__)
  bits = static_cast<uint64_t>(__double_as_longlong(x));
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}

}  // namespace rubric_fast
