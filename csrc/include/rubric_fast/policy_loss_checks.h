// Host-side argument checks of policy_loss_native shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "rubric_fast/checks.h"
#include "rubric_fast/policy_params.h"

namespace rubric_fast {

// One per-token tensor argument: shape [n], a floating dtype (or bool where allowed), on logp's device.
inline void check_token_tensor(const char* kOp, const at::Tensor& t, const char* name, const at::Tensor& logp,
                               int64_t n, bool allow_bool) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kOp, ": argument '", name, "' must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()) || (allow_bool && t.scalar_type() == at::kBool), kOp, ": argument '",
              name, allow_bool ? "' must be bool or floating point, got " : "' must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logp.device(), kOp, ": argument '", name, "' must be on ", logp.device(), ", got ",
              t.device());
}

// Every tensor argument of policy_loss_native but logp itself, checked the same way on CPU and CUDA, against
// the already validated config (policy_loss_params() in policy_params.h checks the config itself).
inline void check_policy_loss_args(const char* kOp, const at::Tensor& logp, int64_t n, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& loss_weight,
                                   const std::optional<at::Tensor>& ref_logp,
                                   const std::optional<at::Tensor>& is_weight,
                                   const std::optional<at::Tensor>& seq_index,
                                   const std::optional<at::Tensor>& entropy,
                                   const std::optional<at::Tensor>& entropy_mask, const PolicyLossParams& p) {
  check_token_tensor(kOp, old_logp, "old_logp", logp, n, false);
  check_token_tensor(kOp, advantages, "advantages", logp, n, false);
  check_token_tensor(kOp, loss_weight, "loss_weight", logp, n, false);
  if (ref_logp) check_token_tensor(kOp, *ref_logp, "ref_logp", logp, n, false);
  if (is_weight) check_token_tensor(kOp, *is_weight, "is_weight", logp, n, false);
  if (entropy) check_token_tensor(kOp, *entropy, "entropy", logp, n, false);
  if (entropy_mask) check_token_tensor(kOp, *entropy_mask, "entropy_mask", logp, n, true);
  TORCH_CHECK(!p.needs_seq_index() || seq_index.has_value(), kOp,
              ": argument 'seq_index' is required for loss=gspo and for the seq_mean_token_mean / "
              "seq_mean_token_sum aggregations");
  if (seq_index) {
    const at::Tensor& si = *seq_index;
    TORCH_CHECK(si.dim() == 1 && si.size(0) == n, kOp, ": argument 'seq_index' must have shape [", n, "], got ",
                si.sizes());
    TORCH_CHECK(si.scalar_type() == at::kLong, kOp, ": argument 'seq_index' must be int64, got ", si.scalar_type());
    TORCH_CHECK(si.device() == logp.device(), kOp, ": argument 'seq_index' must be on ", logp.device());
  }
}

}  // namespace rubric_fast
