// policy_loss on CPU (docs/ops-math.md, "policy_loss"): loss, stats and dL/dlogp, dL/dentropy in one
// pass over the tokens (at::parallel_for, per-token math in policy_loss_math.h, in double), then serial
// sums. The sums are serial and in index order so the result does not depend on the thread count.
//
// A per-sequence pass runs first only where it is needed: GSPO's sequence log-ratio, and the
// seq_mean_* aggregations' per-sequence weight sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "rubric_fast/checks.h"
#include "rubric_fast/policy_loss_checks.h"
#include "rubric_fast/policy_loss_math.h"
#include "rubric_fast/policy_params.h"

namespace rubric_fast {
namespace {

constexpr const char* kOp = "policy_loss_native";

// Arbitrary non-negative ids -> 0..S-1 (sort-based); returns S.
int64_t compact_ids(const int64_t* ids, int64_t n, std::vector<int64_t>& out) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  out.assign(n, 0);
  int64_t s = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (j == 0 || ids[order[j]] != ids[order[j - 1]]) ++s;
    out[order[j]] = s;
  }
  return s + 1;
}

at::Tensor as_double(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kDouble).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& loss_weight,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& is_weight,
    const std::optional<at::Tensor>& seq_index, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& entropy_mask, c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams) {
  // ---- checks ----
  const PolicyLossParams p = policy_loss_params(fparams, iparams, kOp);
  RF_CHECK_DEVICE_TYPE(kOp, logp, at::kCPU);
  RF_CHECK_FLOAT(kOp, logp);
  TORCH_CHECK(logp.dim() == 1, kOp, ": argument 'logp' must be 1-D [N], got ", logp.sizes());
  const int64_t N = logp.size(0);
  check_policy_loss_args(kOp, logp, N, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy,
                         entropy_mask, p);
  const bool needs_seq = p.needs_seq_index();
  const Aggregation aggregation = p.aggregation;
  const double normalizer = p.normalizer;

  // ---- inputs in double ----
  const at::Tensor lp = logp.to(at::kDouble).contiguous(), olp = old_logp.to(at::kDouble).contiguous();
  const at::Tensor adv = advantages.to(at::kDouble).contiguous(), w = loss_weight.to(at::kDouble).contiguous();
  const at::Tensor ref = as_double(ref_logp), isw = as_double(is_weight), ent = as_double(entropy),
                   msk = as_double(entropy_mask);
  const double *lp_p = lp.data_ptr<double>(), *olp_p = olp.data_ptr<double>(), *adv_p = adv.data_ptr<double>(),
               *w_p = w.data_ptr<double>();
  const double* ref_p = ref.defined() ? ref.data_ptr<double>() : nullptr;
  const double* isw_p = isw.defined() ? isw.data_ptr<double>() : nullptr;
  const double* ent_p = ent.defined() ? ent.data_ptr<double>() : nullptr;
  const double* msk_p = msk.defined() ? msk.data_ptr<double>() : nullptr;

  // ---- per-sequence pass (only when needed) ----
  std::vector<int64_t> sid;
  int64_t S = 0;
  std::vector<double> seq_w, seq_lr, seq_wl;
  std::vector<int64_t> seq_n;
  if (needs_seq) {
    at::Tensor si = seq_index->contiguous();
    S = compact_ids(si.data_ptr<int64_t>(), N, sid);
    seq_w.assign(S, 0.0);
    seq_lr.assign(S, 0.0);
    seq_wl.assign(S, 0.0);
    seq_n.assign(S, 0);
    for (int64_t t = 0; t < N; ++t) {
      if (w_p[t] == 0.0) continue;  // a token with weight 0 does not count anywhere
      seq_n[sid[t]] += 1;
      seq_w[sid[t]] += w_p[t];
      seq_lr[sid[t]] += lp_p[t] - olp_p[t];
    }
    for (int64_t s = 0; s < S; ++s) seq_lr[s] = seq_n[s] > 0 ? seq_lr[s] / double(seq_n[s]) : 0.0;
  }

  // ---- token pass: weighted loss and unscaled weighted gradients ----
  std::vector<double> wl(N), gl(N), gh(N), kl(N), ratio(N);
  std::vector<uint8_t> clip_lo(N), clip_hi(N);
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const double wt = w_p[t];
      if (wt == 0.0) {
        wl[t] = gl[t] = gh[t] = kl[t] = ratio[t] = 0.0;
        clip_lo[t] = clip_hi[t] = 0;
        continue;
      }
      const auto r = policy_loss_token<double>(
          p, lp_p[t], olp_p[t], adv_p[t], needs_seq ? seq_lr[sid[t]] : 0.0, ref_p != nullptr,
          ref_p ? ref_p[t] : 0.0, isw_p != nullptr, isw_p ? isw_p[t] : 0.0, ent_p != nullptr, ent_p ? ent_p[t] : 0.0,
          msk_p != nullptr, msk_p ? msk_p[t] : 0.0);
      wl[t] = wt * r.loss;
      gl[t] = wt * r.dlogp;
      gh[t] = wt * r.dentropy;
      kl[t] = r.kl;
      ratio[t] = r.ratio;
      clip_lo[t] = r.clip_low;
      clip_hi[t] = r.clip_high;
    }
  });

  // ---- reductions (serial, index order: deterministic) ----
  double sum_w = 0, sum_wl = 0, sum_kl = 0, sum_ratio = 0;
  int64_t n_tok = 0, n_lo = 0, n_hi = 0;
  for (int64_t t = 0; t < N; ++t) {
    if (w_p[t] == 0.0) continue;
    n_tok += 1;
    sum_w += w_p[t];
    sum_wl += wl[t];
    sum_kl += kl[t];
    sum_ratio += ratio[t];
    n_lo += clip_lo[t];
    n_hi += clip_hi[t];
    if (needs_seq) seq_wl[sid[t]] += wl[t];
  }

  // Aggregation: L and the factor that turns w_t dl_t into dL/dlogp_t.
  double loss = 0.0, inv_d = 0.0;
  if (aggregation == kTokenMean || aggregation == kConstant) {
    const double D = normalizer > 0 ? normalizer : sum_w;
    inv_d = D != 0.0 ? 1.0 / D : 0.0;
    loss = sum_wl * inv_d;
  } else {
    // A sequence counts when its weight sum is non-zero (with non-negative weights: when it has a
    // token of w != 0).
    int64_t n_seq = 0;
    for (int64_t s = 0; s < S; ++s) n_seq += seq_w[s] != 0.0;
    const double D = normalizer > 0 ? normalizer : double(n_seq);
    inv_d = D != 0.0 ? 1.0 / D : 0.0;
    for (int64_t s = 0; s < S; ++s) {
      if (aggregation == kSeqMeanTokenMean)
        loss += seq_w[s] != 0.0 ? seq_wl[s] / seq_w[s] : 0.0;
      else
        loss += seq_wl[s];
    }
    loss *= inv_d;
  }

  const auto out_dtype = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logp.options().dtype(out_dtype);
  at::Tensor grad_logp = rubric_fast::new_output({N}, opts), grad_entropy = rubric_fast::new_output({N}, opts);
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "policy_loss_cpu_grads", [&] {
    scalar_t* gp = grad_logp.data_ptr<scalar_t>();
    scalar_t* ge = grad_entropy.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        double f = inv_d;
        if (aggregation == kSeqMeanTokenMean) f = (w_p[t] != 0.0 && seq_w[sid[t]] != 0.0) ? inv_d / seq_w[sid[t]] : 0.0;
        gp[t] = static_cast<scalar_t>(gl[t] * f);
        ge[t] = static_cast<scalar_t>(ent_p ? gh[t] * f : 0.0);
      }
    });
  });
  at::Tensor loss_t = at::scalar_tensor(loss, opts);
  const double denom = n_tok > 0 ? double(n_tok) : 1.0;
  at::Tensor stats = rubric_fast::new_output({4}, logp.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  st[0] = float(double(n_lo) / denom);
  st[1] = float(double(n_hi) / denom);
  st[2] = float(ref_p ? sum_kl / denom : 0.0);
  st[3] = float(sum_ratio / denom);
  return {loss_t, stats, grad_logp, grad_entropy};
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CPU, m) { m.impl("policy_loss_native", &rubric_fast::policy_loss_cpu); }
