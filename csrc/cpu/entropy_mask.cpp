// entropy_mask on CPU (docs/ops-math.md, "entropy_mask"; "Beyond the 80/20 rule", Wang et al. 2025):
// exactly k of the valid tokens with the highest entropy, ties broken by lower index.
//
// O(N): std::nth_element on (ordered key, index) pairs finds the k-th token of the strict total order
// "higher value first, then lower index"; one pass then keeps every valid token ahead of it. The keys
// are the order-preserving integer images of the values (radix_key.h), the same order the CUDA radix
// select uses, so NaNs cannot break the comparator.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "rubric_fast/checks.h"
#include "rubric_fast/radix_key.h"

namespace rubric_fast {
namespace {

constexpr const char* kOp = "entropy_mask_native";

at::Tensor entropy_mask_cpu(const at::Tensor& entropy, const at::Tensor& valid, int64_t k) {
  const int64_t N = check_values_with_companion(kOp, entropy, "entropy", valid, "valid", at::kBool, at::kCPU);

  // Entropies are compared as fp32 values whatever their dtype (docs/ops-math.md), like the CUDA op
  // and the cross-rank radix select.
  at::Tensor e = entropy.to(at::kDouble).contiguous();
  at::Tensor v = valid.contiguous();
  const double* ep = e.data_ptr<double>();
  const bool* vp = v.data_ptr<bool>();

  std::vector<std::pair<uint32_t, int64_t>> keys;  // (ordered key, index) of the valid tokens
  keys.reserve(N);
  for (int64_t i = 0; i < N; ++i) {
    if (!vp[i]) continue;
    TORCH_CHECK(!std::isnan(ep[i]), kOp, ": argument 'entropy' has a NaN at valid position ", i);
    keys.emplace_back(ordered_key_f32(static_cast<float>(ep[i])), i);
  }
  const int64_t n_valid = int64_t(keys.size());
  TORCH_CHECK(k >= 0 && k <= n_valid, kOp, ": argument 'k' must be in [0, n_valid = ", n_valid, "], got ", k);

  at::Tensor out = at::zeros({N}, entropy.options().dtype(at::kBool));
  if (k == 0) return out;
  auto before = [](const std::pair<uint32_t, int64_t>& a, const std::pair<uint32_t, int64_t>& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), before);
  const auto kth = keys[k - 1];
  bool* op = out.data_ptr<bool>();
  for (int64_t i = 0; i < N; ++i) {
    if (!vp[i]) continue;
    const uint32_t key = ordered_key_f32(static_cast<float>(ep[i]));
    op[i] = key > kth.first || (key == kth.first && i <= kth.second);
  }
  return out;
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CPU, m) { m.impl("entropy_mask_native", &rubric_fast::entropy_mask_cpu); }
