// policy_loss on CUDA (docs/ops-math.md, "policy_loss"): loss, stats and dL/dlogp, dL/dentropy.
//
// Kernels, all on the current stream, no host sync except the compaction of seq_index:
//   1. (gspo / seq_* aggregations) per-sequence count, weight sum and log-ratio sum: global atomics.
//   0. the packed config (fparams, iparams) -> PolicyLossParams, validated on the host (policy_params.h).
//   2. one fused pass over the tokens: per-token loss and gradient (policy_loss_math.h, shared with the
//      CPU op), the unscaled weighted gradients written out, the sums for the loss and the stats
//      reduced per block and added to a double accumulator (one atomicAdd per block and quantity);
//      per-sequence weighted loss sums by atomics for the seq_* aggregations.
//   3. a one-block finalize: the normalizer D, the loss and the stats.
//   4. the gradients scaled by 1/D (or 1/(W_s D) for seq_mean_token_mean).
// The per-token math runs in fp32 (fp64 for fp64 logp); every accumulator is fp64, so the result does
// not depend on the block count beyond fp64 rounding. Inputs are cast to the compute dtype first
// (a no-op for the usual fp32 log-probs).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "rubric_fast/checks.h"
#include "rubric_fast/cuda_utils.cuh"
#include "rubric_fast/policy_loss_checks.h"
#include "rubric_fast/policy_loss_math.h"
#include "rubric_fast/policy_params.h"

namespace rubric_fast {
namespace {

constexpr const char* kOp = "policy_loss_native";

// Accumulator slots of the token pass.
enum : int { kSumW = 0, kSumWL, kNTok, kNLow, kNHigh, kSumKl, kSumRatio, kNAcc };

template <typename acc_t>
struct TokenInputs {
  const acc_t *logp, *old_logp, *adv, *w, *ref, *is_weight, *entropy, *mask;  // ref..mask may be null
  const int64_t* seq;                                                       // compact ids, or null
};

template <typename acc_t>
__global__ void seq_stats_kernel(TokenInputs<acc_t> in, int64_t n, double* __restrict__ seq_stats) {
  // seq_stats[3 s + {0, 1, 2}] = count of tokens with w != 0, sum of w, sum of log-ratios.
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    const acc_t w = in.w[t];
    if (w == acc_t(0)) continue;
    double* s = seq_stats + 3 * in.seq[t];
    atomicAdd(s + 0, 1.0);
    atomicAdd(s + 1, double(w));
    atomicAdd(s + 2, double(in.logp[t] - in.old_logp[t]));
  }
}

template <typename acc_t>
__global__ void token_kernel(TokenInputs<acc_t> in, int64_t n, PolicyLossParams p,
                             const double* __restrict__ seq_stats, acc_t* __restrict__ grad_logp,
                             acc_t* __restrict__ grad_entropy, double* __restrict__ seq_wl,
                             double* __restrict__ acc) {
  __shared__ double shared[32];
  double local[kNAcc] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    const acc_t w = in.w[t];
    if (w == acc_t(0)) {  // a token with weight 0 does not count anywhere
      grad_logp[t] = acc_t(0);
      grad_entropy[t] = acc_t(0);
      continue;
    }
    acc_t seq_lr = acc_t(0);
    if (p.loss == kGspo) {
      const double* s = seq_stats + 3 * in.seq[t];
      seq_lr = acc_t(s[2] / s[0]);
    }
    const TokenResult<acc_t> r = policy_loss_token<acc_t>(
        p, in.logp[t], in.old_logp[t], in.adv[t], seq_lr, in.ref != nullptr, in.ref ? in.ref[t] : acc_t(0),
        in.is_weight != nullptr, in.is_weight ? in.is_weight[t] : acc_t(0), in.entropy != nullptr,
        in.entropy ? in.entropy[t] : acc_t(0), in.mask != nullptr, in.mask ? in.mask[t] : acc_t(0));
    grad_logp[t] = w * r.dlogp;
    grad_entropy[t] = w * r.dentropy;
    const double wl = double(w) * double(r.loss);
    if (seq_wl != nullptr) atomicAdd(seq_wl + in.seq[t], wl);
    local[kSumW] += double(w);
    local[kSumWL] += wl;
    local[kNTok] += 1.0;
    local[kNLow] += r.clip_low ? 1.0 : 0.0;
    local[kNHigh] += r.clip_high ? 1.0 : 0.0;
    local[kSumKl] += double(r.kl);
    local[kSumRatio] += double(r.ratio);
  }
#pragma unroll
  for (int i = 0; i < kNAcc; ++i) {
    const double v = block_sum(local[i], shared);
    if (threadIdx.x == 0 && v != 0.0) atomicAdd(acc + i, v);
  }
}

// One block. scalars[0] = the gradient factor 1/D (0 when D = 0).
template <typename acc_t>
__global__ void finalize_kernel(const double* __restrict__ acc, const double* __restrict__ seq_stats,
                                const double* __restrict__ seq_wl, int64_t n_seq, PolicyLossParams p, bool has_ref,
                                acc_t* __restrict__ loss_out, float* __restrict__ stats,
                                double* __restrict__ scalars) {
  __shared__ double shared[32];
  const Aggregation aggregation = p.aggregation;
  double per_seq = 0.0, n_live = 0.0;
  if (aggregation == kSeqMeanTokenMean || aggregation == kSeqMeanTokenSum) {
    for (int64_t s = threadIdx.x; s < n_seq; s += blockDim.x) {
      const double w_s = seq_stats[3 * s + 1];
      const bool live = w_s != 0.0;  // a sequence counts when its weight sum is non-zero
      n_live += live ? 1.0 : 0.0;
      per_seq += aggregation == kSeqMeanTokenMean ? (live ? seq_wl[s] / w_s : 0.0) : seq_wl[s];
    }
  }
  per_seq = block_sum(per_seq, shared);
  n_live = block_sum(n_live, shared);
  if (threadIdx.x != 0) return;
  const bool by_token = aggregation == kTokenMean || aggregation == kConstant;
  const double d = p.normalizer > 0 ? p.normalizer : (by_token ? acc[kSumW] : n_live);
  const double inv_d = d != 0.0 ? 1.0 / d : 0.0;
  loss_out[0] = acc_t((by_token ? acc[kSumWL] : per_seq) * inv_d);
  scalars[0] = inv_d;
  const double n_tok = acc[kNTok] > 0 ? acc[kNTok] : 1.0;
  stats[0] = float(acc[kNLow] / n_tok);
  stats[1] = float(acc[kNHigh] / n_tok);
  stats[2] = has_ref ? float(acc[kSumKl] / n_tok) : 0.0f;
  stats[3] = float(acc[kSumRatio] / n_tok);
}

template <typename acc_t>
__global__ void scale_grads_kernel(const acc_t* __restrict__ w, const int64_t* __restrict__ seq,
                                   const double* __restrict__ seq_stats, const double* __restrict__ scalars,
                                   int64_t n, bool per_seq_mean, bool has_entropy, acc_t* __restrict__ grad_logp,
                                   acc_t* __restrict__ grad_entropy) {
  const double inv_d = scalars[0];
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    double f = inv_d;
    if (per_seq_mean) {
      const double w_s = seq_stats[3 * seq[t] + 1];
      f = (w[t] != acc_t(0) && w_s != 0.0) ? inv_d / w_s : 0.0;
    }
    grad_logp[t] = acc_t(double(grad_logp[t]) * f);
    grad_entropy[t] = has_entropy ? acc_t(double(grad_entropy[t]) * f) : acc_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& loss_weight,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& is_weight,
    const std::optional<at::Tensor>& seq_index, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& entropy_mask, c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams) {
  const PolicyLossParams p = policy_loss_params(fparams, iparams, kOp);
  RF_CHECK_DEVICE_TYPE(kOp, logp, at::kCUDA);
  RF_CHECK_FLOAT(kOp, logp);
  TORCH_CHECK(logp.dim() == 1, kOp, ": argument 'logp' must be 1-D [N], got ", logp.sizes());
  const int64_t n = logp.size(0);
  check_policy_loss_args(kOp, logp, n, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy,
                         entropy_mask, p);
  const bool needs_seq = p.needs_seq_index();
  RF_CUDA_DEVICE_GUARD(logp);

  const auto ct = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logp.options().dtype(ct);
  at::Tensor loss = at::zeros({}, opts);
  at::Tensor stats = at::zeros({4}, logp.options().dtype(at::kFloat));
  at::Tensor grad_logp = at::zeros({n}, opts), grad_entropy = at::zeros({n}, opts);
  if (n == 0) return {loss, stats, grad_logp, grad_entropy};

  auto cast = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  auto cast_opt = [&](const std::optional<at::Tensor>& t) { return t ? cast(*t) : at::Tensor(); };
  const at::Tensor lp = cast(logp), olp = cast(old_logp), adv = cast(advantages), w = cast(loss_weight);
  const at::Tensor ref = cast_opt(ref_logp), isw = cast_opt(is_weight), ent = cast_opt(entropy),
                   msk = cast_opt(entropy_mask);
  // Arbitrary sequence ids -> 0..S-1 (sort-based unique; its output size is the one host sync).
  at::Tensor seq;
  int64_t n_seq = 0;
  if (needs_seq) {
    auto uniq = at::_unique2(*seq_index, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
    n_seq = std::get<0>(uniq).size(0);
    seq = std::get<1>(uniq).reshape({n}).contiguous();
  }
  const auto dopts = logp.options().dtype(at::kDouble);
  at::Tensor seq_stats = at::zeros({needs_seq ? 3 * n_seq : 1}, dopts);
  at::Tensor seq_wl = at::zeros({needs_seq ? n_seq : 1}, dopts);
  at::Tensor acc = at::zeros({kNAcc}, dopts);
  at::Tensor scalars = at::zeros({1}, dopts);
  const cudaStream_t stream = current_stream();
  const int blocks = blocks_for(n, kThreads, 2048);

  AT_DISPATCH_FLOATING_TYPES(ct, "policy_loss_cuda", [&] {
    using acc_t = scalar_t;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
    TokenInputs<acc_t> in{ptr(lp), ptr(olp), ptr(adv), ptr(w), ptr(ref), ptr(isw), ptr(ent), ptr(msk),
                          needs_seq ? seq.data_ptr<int64_t>() : nullptr};
    if (needs_seq) {
      seq_stats_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(in, n, seq_stats.data_ptr<double>());
      RF_CUDA_LAUNCH_CHECK();
    }
    token_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        in, n, p, seq_stats.data_ptr<double>(), grad_logp.data_ptr<acc_t>(), grad_entropy.data_ptr<acc_t>(),
        needs_seq ? seq_wl.data_ptr<double>() : nullptr, acc.data_ptr<double>());
    RF_CUDA_LAUNCH_CHECK();
    finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(acc.data_ptr<double>(), seq_stats.data_ptr<double>(),
                                                       seq_wl.data_ptr<double>(), n_seq, p, ref.defined(),
                                                       loss.data_ptr<acc_t>(), stats.data_ptr<float>(),
                                                       scalars.data_ptr<double>());
    RF_CUDA_LAUNCH_CHECK();
    scale_grads_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        w.data_ptr<acc_t>(), needs_seq ? seq.data_ptr<int64_t>() : nullptr, seq_stats.data_ptr<double>(),
        scalars.data_ptr<double>(), n, p.aggregation == kSeqMeanTokenMean, ent.defined(),
        grad_logp.data_ptr<acc_t>(), grad_entropy.data_ptr<acc_t>());
    RF_CUDA_LAUNCH_CHECK();
  });
  return {loss, stats, grad_logp, grad_entropy};
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CUDA, m) { m.impl("policy_loss_native", &rubric_fast::policy_loss_cuda); }
