// group_advantages on CUDA (docs/ops-math.md, "group_advantages"): segmented statistics over ragged
// groups with arbitrary int64 ids, in fp64 (B is a batch of rollouts: small, and fp64 atomics are
// native on sm_60+).
//
// The ids are compacted with ATen's sort-based unique (the number of groups is the one host sync).
// Then: per-group count and sum (atomics), per-group squared deviations from the group mean and the
// batch statistics (second pass: the two-pass variance is stable), and for CANON the per-group median
// of the metric from a segmented sort (two stable ATen sorts: by metric, then by group) followed by the
// per-subgroup sums. A last elementwise kernel writes the advantages.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "rubric_fast/checks.h"
#include "rubric_fast/cuda_utils.cuh"
#include "rubric_fast/radix_key.h"

namespace rubric_fast {
namespace {

constexpr const char* kOp = "group_advantages_native";

enum Estimator : int { kGrpo = 0, kDrGrpo, kRloo, kWReinforce, kCanon };
enum Scale : int { kScaleGroup = 0, kScaleBatch, kScaleNone };

#define RF_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// group[2 g] = count of valid members, group[2 g + 1] = their sum; batch[0], batch[1] likewise.
// key_min / key_max: the smallest / largest valid reward of each group as an order-preserving key
// (radix_key.h), so that integer atomicMin / atomicMax find them; equal keys = a group of equal rewards.
__global__ void group_sum_kernel(const double* __restrict__ r, const int64_t* __restrict__ gid, int64_t b,
                                 double* __restrict__ group, double* __restrict__ batch,
                                 unsigned long long* __restrict__ key_min, unsigned long long* __restrict__ key_max) {
  __shared__ double shared[32];
  double n_local = 0.0, s_local = 0.0;
  RF_GRID_STRIDE(i, b) {
    if (isnan(r[i])) continue;
    atomicAdd(group + 2 * gid[i], 1.0);
    atomicAdd(group + 2 * gid[i] + 1, r[i]);
    const unsigned long long key = ordered_key_f64(r[i]);
    atomicMin(key_min + gid[i], key);
    atomicMax(key_max + gid[i], key);
    n_local += 1.0;
    s_local += r[i];
  }
  n_local = block_sum(n_local, shared);
  s_local = block_sum(s_local, shared);
  if (threadIdx.x == 0) {
    atomicAdd(batch + 0, n_local);
    atomicAdd(batch + 1, s_local);
  }
}

// sq[g] = sum of squared deviations from the group mean; batch[2] = the same over the batch.
__global__ void group_sqdev_kernel(const double* __restrict__ r, const int64_t* __restrict__ gid, int64_t b,
                                   const double* __restrict__ group, double* __restrict__ sq,
                                   double* __restrict__ batch) {
  __shared__ double shared[32];
  const double batch_mean = batch[0] > 0 ? batch[1] / batch[0] : 0.0;
  double local = 0.0;
  RF_GRID_STRIDE(i, b) {
    if (isnan(r[i])) continue;
    const int64_t g = gid[i];
    const double d = r[i] - group[2 * g + 1] / group[2 * g];
    atomicAdd(sq + g, d * d);
    local += (r[i] - batch_mean) * (r[i] - batch_mean);
  }
  local = block_sum(local, shared);
  if (threadIdx.x == 0) atomicAdd(batch + 2, local);
}

// CANON: the (lower) median of the metric over a group's valid members. `sorted_metric` holds each
// group's members contiguously from `start[g]`, valid ones first in ascending metric order. The lower
// median splits the group exactly like the midpoint median (see the CPU op).
__global__ void group_median_kernel(const double* __restrict__ sorted_metric, const int64_t* __restrict__ start,
                                    const double* __restrict__ group, int64_t n_groups,
                                    double* __restrict__ median) {
  RF_GRID_STRIDE(g, n_groups) {
    const int64_t n = int64_t(group[2 * g]);
    median[g] = n > 0 ? sorted_metric[start[g] + (n - 1) / 2] : 0.0;
  }
}

// split[4 g + {0, 1, 2, 3}] = count and sum of the high (metric > median) and low subgroups.
__global__ void canon_split_kernel(const double* __restrict__ r, const double* __restrict__ metric,
                                   const int64_t* __restrict__ gid, int64_t b, const double* __restrict__ median,
                                   double* __restrict__ split) {
  RF_GRID_STRIDE(i, b) {
    if (isnan(r[i])) continue;
    const int64_t g = gid[i];
    const int off = metric[i] > median[g] ? 0 : 2;
    atomicAdd(split + 4 * g + off, 1.0);
    atomicAdd(split + 4 * g + off + 1, r[i]);
  }
}

__device__ __forceinline__ double unbiased_std(double n, double sq) { return n < 2 ? 0.0 : sqrt(sq / (n - 1)); }

template <typename out_t>
__global__ void advantages_kernel(const double* __restrict__ r, const double* __restrict__ metric,
                                  const int64_t* __restrict__ gid, int64_t b, const double* __restrict__ group,
                                  const double* __restrict__ sq, const double* __restrict__ batch,
                                  const double* __restrict__ median, const double* __restrict__ split,
                                  const unsigned long long* __restrict__ key_min,
                                  const unsigned long long* __restrict__ key_max, int estimator,
                                  int scale, double eps, double positive_weight, out_t* __restrict__ adv,
                                  bool* __restrict__ valid) {
  RF_GRID_STRIDE(i, b) {
    const bool v = !isnan(r[i]);
    valid[i] = v;
    if (!v) {  // missing reward: advantage 0, excluded from every statistic
      adv[i] = out_t(0);
      continue;
    }
    const int64_t g = gid[i];
    const double n = group[2 * g], mean = group[2 * g + 1] / n;
    double c = 0.0;
    if (estimator == kGrpo || estimator == kDrGrpo) {  // Shao et al. 2024; Liu et al. 2025
      c = r[i] - mean;
    } else if (estimator == kRloo) {  // Ahmadian et al. 2024
      c = n > 1 ? (r[i] - mean) * n / (n - 1) : 0.0;
    } else if (estimator == kWReinforce) {  // Zhu et al. 2025: lambda PSR + NSR
      c = positive_weight * r[i] - (1.0 - r[i]);
    } else {  // CANON (Chen et al. 2025): against the mean of the other subgroup
      const bool hi = metric[i] > median[g];
      const double other_n = hi ? split[4 * g + 2] : split[4 * g];
      const double other_s = hi ? split[4 * g + 3] : split[4 * g + 1];
      c = other_n > 0 ? r[i] - other_s / other_n : r[i] - mean;
    }
    // Equal rewards: exactly 0 for the centred estimators; a zero std leaves c unscaled (as on CPU).
    if (estimator != kWReinforce && key_min[g] == key_max[g]) c = 0.0;
    const double std_used = scale == kScaleGroup ? unbiased_std(n, sq[g])
                            : scale == kScaleBatch ? unbiased_std(batch[0], batch[2]) : 0.0;
    adv[i] = out_t(std_used > 0 ? c / (std_used + eps) : c);
  }
}

int parse_estimator(c10::string_view s) {
  if (s == "grpo") return kGrpo;
  if (s == "dr_grpo") return kDrGrpo;
  if (s == "rloo") return kRloo;
  if (s == "w_reinforce") return kWReinforce;
  if (s == "canon") return kCanon;
  TORCH_CHECK(false, kOp, ": argument 'estimator' must be one of grpo, dr_grpo, rloo, w_reinforce, canon; got '",
              std::string(s), "'");
}

int parse_scale(c10::string_view s) {
  if (s == "group") return kScaleGroup;
  if (s == "batch") return kScaleBatch;
  if (s == "none") return kScaleNone;
  TORCH_CHECK(false, kOp, ": argument 'scale' must be one of group, batch, none (resolved by the caller); got '",
              std::string(s), "'");
}

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& group_index,
                                                         c10::string_view estimator_name,
                                                         c10::string_view scale_name, double eps,
                                                         double positive_weight,
                                                         const std::optional<at::Tensor>& metric_opt) {
  const int estimator = parse_estimator(estimator_name);
  const int scale = parse_scale(scale_name);
  const int64_t b = check_values_with_companion(kOp, rewards, "rewards", group_index, "group_index", at::kLong,
                                                at::kCUDA);
  TORCH_CHECK(estimator != kDrGrpo || scale == kScaleNone, kOp,
              ": estimator 'dr_grpo' accepts only scale='none' (Dr. GRPO removes the std normalisation); got '",
              std::string(scale_name), "'");
  at::Tensor metric_d;
  if (estimator == kCanon) {
    TORCH_CHECK(metric_opt.has_value(), kOp, ": argument 'metric' is required for estimator 'canon'");
    const at::Tensor& metric = *metric_opt;
    RF_CHECK_1D(kOp, metric, b);
    RF_CHECK_FLOAT(kOp, metric);
    RF_CHECK_SAME_DEVICE(kOp, metric, rewards);
    metric_d = metric.to(at::kDouble).contiguous();
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": argument 'eps' must be finite and >= 0, got ", eps);
  RF_CUDA_DEVICE_GUARD(rewards);

  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = rubric_fast::new_output({b}, rewards.options().dtype(out_dtype));
  at::Tensor valid = at::empty({b}, rewards.options().dtype(at::kBool));
  if (b == 0) return {adv, valid};

  const at::Tensor r = rewards.to(at::kDouble).contiguous();
  auto uniq = at::_unique2(group_index, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/true);
  const int64_t n_groups = std::get<0>(uniq).size(0);
  const at::Tensor gid = std::get<1>(uniq).reshape({b}).contiguous();
  const auto dopts = rewards.options().dtype(at::kDouble);
  at::Tensor group = at::zeros({2 * n_groups}, dopts), sq = at::zeros({n_groups}, dopts);
  at::Tensor batch = at::zeros({3}, dopts);
  const cudaStream_t stream = current_stream();
  const int blocks = blocks_for(b, kThreads, 1024);

  at::Tensor key_min = at::full({n_groups}, -1, gid.options());  // all bits set: the largest key
  at::Tensor key_max = at::zeros({n_groups}, gid.options());
  auto* key_min_p = reinterpret_cast<unsigned long long*>(key_min.data_ptr<int64_t>());
  auto* key_max_p = reinterpret_cast<unsigned long long*>(key_max.data_ptr<int64_t>());
  group_sum_kernel<<<blocks, kThreads, 0, stream>>>(r.data_ptr<double>(), gid.data_ptr<int64_t>(), b,
                                                    group.data_ptr<double>(), batch.data_ptr<double>(), key_min_p,
                                                    key_max_p);
  RF_CUDA_LAUNCH_CHECK();
  group_sqdev_kernel<<<blocks, kThreads, 0, stream>>>(r.data_ptr<double>(), gid.data_ptr<int64_t>(), b,
                                                      group.data_ptr<double>(), sq.data_ptr<double>(),
                                                      batch.data_ptr<double>());
  RF_CUDA_LAUNCH_CHECK();

  at::Tensor median, split;
  if (estimator == kCanon) {
    // Segmented sort: stable by metric (missing rewards as NaN sort last), then stable by group.
    const at::Tensor m_valid = metric_d.masked_fill(r.isnan(), std::numeric_limits<double>::quiet_NaN());
    const at::Tensor by_metric = std::get<1>(m_valid.sort(/*stable=*/true, 0, /*descending=*/false));
    const at::Tensor by_group = std::get<1>(gid.index_select(0, by_metric).sort(/*stable=*/true, 0, false));
    const at::Tensor sorted_metric = m_valid.index_select(0, by_metric.index_select(0, by_group)).contiguous();
    const at::Tensor counts = std::get<2>(uniq);
    const at::Tensor start = counts.cumsum(0).sub(counts).contiguous();
    median = at::zeros({n_groups}, dopts);
    split = at::zeros({4 * n_groups}, dopts);
    group_median_kernel<<<blocks_for(n_groups), kThreads, 0, stream>>>(
        sorted_metric.data_ptr<double>(), start.data_ptr<int64_t>(), group.data_ptr<double>(), n_groups,
        median.data_ptr<double>());
    RF_CUDA_LAUNCH_CHECK();
    canon_split_kernel<<<blocks, kThreads, 0, stream>>>(r.data_ptr<double>(), metric_d.data_ptr<double>(),
                                                        gid.data_ptr<int64_t>(), b, median.data_ptr<double>(),
                                                        split.data_ptr<double>());
    RF_CUDA_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "group_advantages_cuda", [&] {
    advantages_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        r.data_ptr<double>(), estimator == kCanon ? metric_d.data_ptr<double>() : nullptr, gid.data_ptr<int64_t>(),
        b, group.data_ptr<double>(), sq.data_ptr<double>(), batch.data_ptr<double>(),
        estimator == kCanon ? median.data_ptr<double>() : nullptr,
        estimator == kCanon ? split.data_ptr<double>() : nullptr, key_min_p, key_max_p, estimator, scale, eps,
        positive_weight,
        adv.data_ptr<scalar_t>(), valid.data_ptr<bool>());
    RF_CUDA_LAUNCH_CHECK();
  });
  return {adv, valid};
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CUDA, m) { m.impl("group_advantages_native", &rubric_fast::group_advantages_cuda); }
