// Host-side argument checks shared by every native op (CPU and CUDA).
//
// Written in the manner of FlashAttention's flash_api.cpp: each check names the op and the argument and
// says what would be accepted, because these errors are caused by callers, not by bugs in the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/ops/empty.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

namespace rubric_fast {

// RUBRIC_FAST_POISON=1 (the tests set it) fills every fresh output buffer with NaN before a kernel
// writes it, so an element a kernel forgets to write shows up as NaN instead of stale memory.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("RUBRIC_FAST_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace rubric_fast

// RF_CHECK_1D(op, x, n): x is a 1-D tensor of n elements.
#define RF_CHECK_1D(op, x, n)                                                                           \
  TORCH_CHECK((x).dim() == 1 && (x).size(0) == (n), op, ": argument '" #x "' must have shape [", (n),    \
              "], got ", (x).sizes())

#define RF_CHECK_FLOAT(op, x)                                                                           \
  TORCH_CHECK(::rubric_fast::is_float_dtype((x).scalar_type()), op, ": argument '" #x                    \
              "' must be float32, float64, float16 or bfloat16, got ", (x).scalar_type())

#define RF_CHECK_DTYPE(op, x, dt)                                                                       \
  TORCH_CHECK((x).scalar_type() == (dt), op, ": argument '" #x "' must be ", (dt), ", got ",             \
              (x).scalar_type())

#define RF_CHECK_SAME_DEVICE(op, x, ref)                                                                \
  TORCH_CHECK((x).device() == (ref).device(), op, ": argument '" #x "' must be on ", (ref).device(),     \
              " like '" #ref "', got ", (x).device())

#define RF_CHECK_DEVICE_TYPE(op, x, dev)                                                                \
  TORCH_CHECK((x).device().type() == (dev), op, ": argument '" #x "' must be a ", (dev),                 \
              " tensor, got ", (x).device())

namespace rubric_fast {

// A 1-D floating `values` on `device` with a same-length companion of dtype `companion_dtype` on the
// same device (rewards + group ids, entropy + valid mask); returns the length. Shared by CPU and CUDA.
inline int64_t check_values_with_companion(const char* op, const at::Tensor& values, const char* values_name,
                                           const at::Tensor& companion, const char* companion_name,
                                           at::ScalarType companion_dtype, at::DeviceType device) {
  TORCH_CHECK(values.device().type() == device, op, ": argument '", values_name, "' must be a ", device,
              " tensor, got ", values.device());
  TORCH_CHECK(is_float_dtype(values.scalar_type()), op, ": argument '", values_name,
              "' must be float32, float64, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1, op, ": argument '", values_name, "' must be 1-D, got ", values.sizes());
  const int64_t n = values.size(0);
  TORCH_CHECK(companion.dim() == 1 && companion.size(0) == n, op, ": argument '", companion_name,
              "' must have shape [", n, "], got ", companion.sizes());
  TORCH_CHECK(companion.scalar_type() == companion_dtype, op, ": argument '", companion_name, "' must be ",
              companion_dtype, ", got ", companion.scalar_type());
  TORCH_CHECK(companion.device() == values.device(), op, ": argument '", companion_name, "' must be on ",
              values.device(), " like '", values_name, "', got ", companion.device());
  return n;
}

}  // namespace rubric_fast
