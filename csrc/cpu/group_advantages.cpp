// group_advantages on CPU (docs/ops-math.md, "group_advantages"): segmented statistics over ragged
// groups given by arbitrary int64 ids. Everything is computed in double; B is a batch of rollouts
// (thousands at most), so a serial O(B log B) pass (the sort that compacts the ids) is plenty.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "rubric_fast/checks.h"

namespace rubric_fast {
namespace {

constexpr const char* kOp = "group_advantages_native";

enum class Estimator { kGrpo, kDrGrpo, kRloo, kWReinforce, kCanon };
enum class Scale { kGroup, kBatch, kNone };

Estimator parse_estimator(c10::string_view s) {
  if (s == "grpo") return Estimator::kGrpo;
  if (s == "dr_grpo") return Estimator::kDrGrpo;
  if (s == "rloo") return Estimator::kRloo;
  if (s == "w_reinforce") return Estimator::kWReinforce;
  if (s == "canon") return Estimator::kCanon;
  TORCH_CHECK(false, kOp, ": argument 'estimator' must be one of grpo, dr_grpo, rloo, w_reinforce, canon; got '",
              std::string(s), "'");
}

Scale parse_scale(c10::string_view s) {
  if (s == "group") return Scale::kGroup;
  if (s == "batch") return Scale::kBatch;
  if (s == "none") return Scale::kNone;
  TORCH_CHECK(false, kOp, ": argument 'scale' must be one of group, batch, none (resolved by the caller); got '",
              std::string(s), "'");
}

// Unbiased (Bessel) standard deviation from n and the sum of squared deviations; 0 when n < 2.
double unbiased_std(int64_t n, double sq_dev) { return n < 2 ? 0.0 : std::sqrt(sq_dev / double(n - 1)); }

std::tuple<at::Tensor, at::Tensor> group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_index,
                                                        c10::string_view estimator_name, c10::string_view scale_name,
                                                        double eps, double positive_weight,
                                                        const std::optional<at::Tensor>& metric_opt) {
  const Estimator est = parse_estimator(estimator_name);
  const Scale scale = parse_scale(scale_name);
  const int64_t B = check_values_with_companion(kOp, rewards, "rewards", group_index, "group_index", at::kLong,
                                                at::kCPU);
  TORCH_CHECK(est != Estimator::kDrGrpo || scale == Scale::kNone, kOp,
              ": estimator 'dr_grpo' accepts only scale='none' (Dr. GRPO removes the std normalisation); got '",
              std::string(scale_name), "'");
  at::Tensor metric_d;
  if (est == Estimator::kCanon) {
    TORCH_CHECK(metric_opt.has_value(), kOp, ": argument 'metric' is required for estimator 'canon'");
    const at::Tensor& metric = *metric_opt;  // named like the argument: the check messages print it
    RF_CHECK_1D(kOp, metric, B);
    RF_CHECK_FLOAT(kOp, metric);
    RF_CHECK_SAME_DEVICE(kOp, metric, rewards);
    metric_d = metric.to(at::kDouble).contiguous();
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": argument 'eps' must be finite and >= 0, got ", eps);

  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor r_d = rewards.to(at::kDouble).contiguous();
  at::Tensor g_c = group_index.contiguous();
  const double* r = r_d.data_ptr<double>();
  const int64_t* gid = g_c.data_ptr<int64_t>();
  std::vector<double> adv(B, 0.0);
  std::vector<uint8_t> valid(B, 0);

  // Compact the arbitrary ids to 0..G-1: a stable sort of the positions by id.
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return gid[a] < gid[b]; });
  std::vector<int64_t> cid(B);
  std::vector<int64_t> group_begin;  // start of each group in `order`
  for (int64_t j = 0; j < B; ++j) {
    if (j == 0 || gid[order[j]] != gid[order[j - 1]]) group_begin.push_back(j);
    cid[order[j]] = int64_t(group_begin.size()) - 1;
  }
  const int64_t G = int64_t(group_begin.size());
  group_begin.push_back(B);

  // Per-group count and mean of the valid rewards, then the squared deviations (two passes: stable).
  std::vector<int64_t> n(G, 0);
  std::vector<double> mean(G, 0.0), sq(G, 0.0);
  std::vector<double> gmin(G, std::numeric_limits<double>::infinity()), gmax(G, -std::numeric_limits<double>::infinity());
  int64_t n_batch = 0;
  double sum_batch = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    valid[i] = !std::isnan(r[i]);
    if (!valid[i]) continue;
    n[cid[i]] += 1;
    mean[cid[i]] += r[i];
    gmin[cid[i]] = std::min(gmin[cid[i]], r[i]);
    gmax[cid[i]] = std::max(gmax[cid[i]], r[i]);
    n_batch += 1;
    sum_batch += r[i];
  }
  for (int64_t g = 0; g < G; ++g) mean[g] = n[g] > 0 ? mean[g] / double(n[g]) : 0.0;
  const double mean_batch = n_batch > 0 ? sum_batch / double(n_batch) : 0.0;
  double sq_batch = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    if (!valid[i]) continue;
    const double d = r[i] - mean[cid[i]];
    sq[cid[i]] += d * d;
    sq_batch += (r[i] - mean_batch) * (r[i] - mean_batch);
  }
  const double std_batch = unbiased_std(n_batch, sq_batch);

  // CANON (Chen et al. 2025): split each group at the median of the metric over its valid members
  // (metric > median vs. <= median). The lower median of the sorted values gives the same split as the
  // midpoint median for an even count, so no averaging is needed.
  std::vector<double> hi_mean, lo_mean;
  std::vector<int64_t> hi_n, lo_n;
  std::vector<double> median;
  if (est == Estimator::kCanon) {
    const double* m = metric_d.data_ptr<double>();
    median.assign(G, 0.0);
    hi_mean.assign(G, 0.0);
    lo_mean.assign(G, 0.0);
    hi_n.assign(G, 0);
    lo_n.assign(G, 0);
    std::vector<double> vals;
    for (int64_t g = 0; g < G; ++g) {
      vals.clear();
      for (int64_t j = group_begin[g]; j < group_begin[g + 1]; ++j)
        if (valid[order[j]]) vals.push_back(m[order[j]]);
      if (vals.empty()) continue;
      const size_t mid = (vals.size() - 1) / 2;
      std::nth_element(vals.begin(), vals.begin() + mid, vals.end());
      median[g] = vals[mid];
    }
    for (int64_t i = 0; i < B; ++i) {
      if (!valid[i]) continue;
      const int64_t g = cid[i];
      if (m[i] > median[g]) {
        hi_n[g] += 1;
        hi_mean[g] += r[i];
      } else {
        lo_n[g] += 1;
        lo_mean[g] += r[i];
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      hi_mean[g] = hi_n[g] > 0 ? hi_mean[g] / double(hi_n[g]) : 0.0;
      lo_mean[g] = lo_n[g] > 0 ? lo_mean[g] / double(lo_n[g]) : 0.0;
    }
  }

  const double* m = est == Estimator::kCanon ? metric_d.data_ptr<double>() : nullptr;
  for (int64_t i = 0; i < B; ++i) {
    if (!valid[i]) continue;  // missing reward: advantage 0, excluded from every statistic
    const int64_t g = cid[i];
    double c = 0.0;
    switch (est) {
      case Estimator::kGrpo:  // DeepSeekMath (Shao et al. 2024)
      case Estimator::kDrGrpo:  // Dr. GRPO (Liu et al. 2025)
        c = r[i] - mean[g];
        break;
      case Estimator::kRloo:  // leave-one-out baseline (Ahmadian et al. 2024): (r - mean) n / (n - 1)
        c = n[g] > 1 ? (r[i] - mean[g]) * double(n[g]) / double(n[g] - 1) : 0.0;
        break;
      case Estimator::kWReinforce:  // weighted REINFORCE (Zhu et al. 2025): lambda PSR + NSR, no centring
        c = positive_weight * r[i] - (1.0 - r[i]);
        break;
      case Estimator::kCanon: {
        const bool is_hi = m[i] > median[g];
        const int64_t other_n = is_hi ? lo_n[g] : hi_n[g];
        c = other_n > 0 ? r[i] - (is_hi ? lo_mean[g] : hi_mean[g]) : r[i] - mean[g];
        break;
      }
    }
    // A group of equal rewards carries no signal for the centred estimators: exactly 0 (its fp64 mean
    // may differ from the rewards by an ulp). W-REINFORCE is not centred and keeps +lambda / -1.
    if (est != Estimator::kWReinforce && gmin[g] == gmax[g]) c = 0.0;
    // Where the std is 0 (a group of one, equal rewards) c is left unscaled: dividing by eps would blow
    // W-REINFORCE up, and eps = 0 would give NaN (docs/ops-math.md).
    const double std_used = scale == Scale::kGroup ? unbiased_std(n[g], sq[g])
                            : scale == Scale::kBatch ? std_batch  // TRL's scale_rewards="batch"
                                                     : 0.0;
    adv[i] = std_used > 0 ? c / (std_used + eps) : c;
  }

  at::Tensor adv_t = rubric_fast::new_output({B}, rewards.options().dtype(out_dtype));
  at::Tensor valid_t = at::empty({B}, rewards.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(adv_t.scalar_type(), "group_advantages_cpu_out", [&] {
    scalar_t* a = adv_t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) a[i] = static_cast<scalar_t>(adv[i]);
  });
  bool* v = valid_t.data_ptr<bool>();
  for (int64_t i = 0; i < B; ++i) v[i] = valid[i] != 0;
  return {adv_t, valid_t};
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CPU, m) { m.impl("group_advantages_native", &rubric_fast::group_advantages_cpu); }
