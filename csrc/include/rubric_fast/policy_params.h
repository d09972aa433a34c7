// The PolicyLossConfig as the native policy loss sees it: one struct, built and validated in one place.
//
// The config crosses the op schema packed as `float[] fparams, int[] iparams`, the layout of
// PolicyLossConfig.to_op_args(). The index constants and names below MIRROR FPARAMS / IPARAMS and the
// LOSSES / KL_ESTIMATORS / AGGREGATIONS codes of rubric_fast/reference/types.py: change both together.
// Unset optional floats (delta, dual_clip, normalizer, top_entropy_fraction) are packed as -1; like
// PolicyLossConfig.from_op_args, any value <= 0 reads as "not set".
//
// policy_loss_params() is the only way to get a PolicyLossParams from the lists: the CPU and CUDA
// kernels and the Meta kernel all call it, so a bad packed config fails the same way everywhere, with a
// message naming the list, the index and the field. The checks follow PolicyLossConfig.__post_init__.
//
// The struct is plain data (no pointers, no virtuals): CUDA kernels take it by value. Floats are kept in
// double as they arrive; the per-token math (policy_loss_math.h) casts them to its compute dtype once.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace rubric_fast {

// Integer codes of the string fields (LOSSES, KL_ESTIMATORS, AGGREGATIONS in types.py).
enum LossType : int { kPpoClip = 0, kCispo = 1, kSapo = 2, kGspo = 3 };
enum KlType : int { kK1 = 0, kK2 = 1, kK3 = 2 };
enum Aggregation : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kConstant = 3 };

// Positions in fparams / iparams: mirror FPARAMS / IPARAMS of rubric_fast/reference/types.py.
enum FParam : int {
  kFEpsLow = 0,
  kFEpsHigh = 1,
  kFDelta = 2,
  kFDualClip = 3,
  kFBeta = 4,
  kFEntropyCoef = 5,
  kFNormalizer = 6,
  kFSapoTauPos = 7,
  kFSapoTauNeg = 8,
  kFTopEntropyFraction = 9,
  kNumFParams = 10,
};
enum IParam : int { kILoss = 0, kIKl = 1, kIAggregation = 2, kNumIParams = 3 };

inline constexpr const char* kFParamNames[kNumFParams] = {
    "eps_low",    "eps_high",     "delta",        "dual_clip",    "beta",
    "entropy_coef", "normalizer", "sapo_tau_pos", "sapo_tau_neg", "top_entropy_fraction"};
inline constexpr const char* kIParamNames[kNumIParams] = {"loss", "kl", "aggregation"};

struct PolicyLossParams {
  LossType loss;
  KlType kl;
  Aggregation aggregation;
  double eps_low, eps_high;  // clip range [1 - eps_low, 1 + eps_high]
  double delta;              // two-sided clip cap; <= 0: not set
  double dual_clip;          // dual-clip constant; <= 0: not set
  double beta;               // KL weight
  double entropy_coef;
  double normalizer;         // <= 0: not set (the local weight sum / sequence count is used)
  double sapo_tau_pos, sapo_tau_neg;
  // Carried so that the packed form is the whole config, but not used by the native policy loss: the
  // top-entropy selection is a separate op (entropy_mask_native) whose result arrives as entropy_mask.
  double top_entropy_fraction;  // <= 0: not set

  bool needs_seq_index() const {
    return loss == kGspo || aggregation == kSeqMeanTokenMean || aggregation == kSeqMeanTokenSum;
  }
};

// Builds the struct from the packed lists and validates it; `op` prefixes every message.
inline PolicyLossParams policy_loss_params(c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams,
                                           const char* op = "policy_loss_native") {
  TORCH_CHECK(fparams.size() == kNumFParams, op, ": argument 'fparams' must have ", int(kNumFParams),
              " values (eps_low, eps_high, delta, dual_clip, beta, entropy_coef, normalizer, sapo_tau_pos, "
              "sapo_tau_neg, top_entropy_fraction: PolicyLossConfig.to_op_args()), got ",
              fparams.size());
  TORCH_CHECK(iparams.size() == kNumIParams, op, ": argument 'iparams' must have ", int(kNumIParams),
              " values (loss, kl, aggregation: PolicyLossConfig.to_op_args()), got ", iparams.size());

  const int64_t loss = iparams[kILoss], kl = iparams[kIKl], agg = iparams[kIAggregation];
  TORCH_CHECK(loss >= 0 && loss <= 3, op, ": iparams[", int(kILoss), "] (", kIParamNames[kILoss],
              ") must be 0 (ppo_clip), 1 (cispo), 2 (sapo) or 3 (gspo), got ", loss);
  TORCH_CHECK(kl >= 0 && kl <= 2, op, ": iparams[", int(kIKl), "] (", kIParamNames[kIKl],
              ") must be 0 (k1), 1 (k2) or 2 (k3), got ", kl);
  TORCH_CHECK(agg >= 0 && agg <= 3, op, ": iparams[", int(kIAggregation), "] (", kIParamNames[kIAggregation],
              ") must be 0 (token_mean), 1 (seq_mean_token_mean), 2 (seq_mean_token_sum) or 3 (constant), got ",
              agg);

  PolicyLossParams p;
  p.loss = static_cast<LossType>(loss);
  p.kl = static_cast<KlType>(kl);
  p.aggregation = static_cast<Aggregation>(agg);
  p.eps_low = fparams[kFEpsLow];
  p.eps_high = fparams[kFEpsHigh];
  p.delta = fparams[kFDelta];
  p.dual_clip = fparams[kFDualClip];
  p.beta = fparams[kFBeta];
  p.entropy_coef = fparams[kFEntropyCoef];
  p.normalizer = fparams[kFNormalizer];
  p.sapo_tau_pos = fparams[kFSapoTauPos];
  p.sapo_tau_neg = fparams[kFSapoTauNeg];
  p.top_entropy_fraction = fparams[kFTopEntropyFraction];

  // Every message reads "<op>: fparams[i] (name) must ..., got v".
#define RF_CHECK_FPARAM(idx, cond, what)                                                                    \
  TORCH_CHECK((cond), op, ": fparams[", int(idx), "] (", kFParamNames[idx], ") must ", what, ", got ", \
              fparams[idx])
  for (int i : {kFEpsLow, kFEpsHigh, kFBeta, kFEntropyCoef, kFSapoTauPos, kFSapoTauNeg}) {
    RF_CHECK_FPARAM(i, std::isfinite(fparams[i]), "be a finite number");
  }
  RF_CHECK_FPARAM(kFEpsLow, p.eps_low >= 0.0 && p.eps_low < 1.0, "be in [0, 1)");
  RF_CHECK_FPARAM(kFEpsHigh, p.eps_high >= 0.0, "be >= 0");
  RF_CHECK_FPARAM(kFBeta, p.beta >= 0.0, "be >= 0");
  RF_CHECK_FPARAM(kFSapoTauPos, p.sapo_tau_pos > 0.0, "be > 0");
  RF_CHECK_FPARAM(kFSapoTauNeg, p.sapo_tau_neg > 0.0, "be > 0");
  // Optional values: <= 0 is "not set"; a NaN is neither set nor unset and fails the range check.
  if (!(p.delta <= 0.0)) {
    TORCH_CHECK(std::isfinite(p.delta) && p.delta > 1.0 + p.eps_high, op, ": fparams[", int(kFDelta), "] (",
                kFParamNames[kFDelta], ") must be > 1 + eps_high = ", 1.0 + p.eps_high,
                ", or <= 0 for not set, got ", p.delta);
  }
  if (!(p.dual_clip <= 0.0)) {
    RF_CHECK_FPARAM(kFDualClip, std::isfinite(p.dual_clip) && p.dual_clip > 1.0, "be > 1, or <= 0 for not set");
  }
  if (!(p.normalizer <= 0.0)) {
    RF_CHECK_FPARAM(kFNormalizer, std::isfinite(p.normalizer), "be finite and > 0, or <= 0 for not set");
  }
  RF_CHECK_FPARAM(kFNormalizer, p.aggregation != kConstant || p.normalizer > 0.0,
                  "be > 0 with aggregation=constant (Dr. GRPO needs a constant normalizer, e.g. max_new_tokens * "
                  "n_seqs)");
  if (!(p.top_entropy_fraction <= 0.0)) {
    RF_CHECK_FPARAM(kFTopEntropyFraction, p.top_entropy_fraction > 0.0 && p.top_entropy_fraction <= 1.0,
                    "be in (0, 1], or <= 0 for not set");
  }
#undef RF_CHECK_FPARAM
  return p;
}

}  // namespace rubric_fast
