// Per-token value and gradient of the policy losses (docs/ops-math.md, "policy_loss"), shared by the CPU
// (double) and CUDA (float, or double for float64 inputs) kernels so that the two cannot drift apart.
//
// Forward and backward are computed together: the token loss l_t and dl_t/dlogp_t, dl_t/dentropy_t.
// The aggregation weight (w_t / D, or w_t / (W_s D)) is applied by the caller once D is known.
#pragma once

#include "rubric_fast/policy_params.h"  // PolicyLossParams and the integer codes
#include "rubric_fast/radix_key.h"      // RF_HOST_DEVICE

#include <cmath>

namespace rubric_fast {

template <typename acc_t>
struct TokenResult {
  acc_t loss;       // l_t (before the aggregation weight)
  acc_t dlogp;      // d l_t / d logp_t
  acc_t dentropy;   // d l_t / d entropy_t
  acc_t kl;         // KL_t estimate (0 without ref_logp), for the stats
  acc_t ratio;      // rho_t (the sequence ratio for gspo), for the stats
  bool clip_low;    // rho < 1 - eps_low and A < 0
  bool clip_high;   // rho > 1 + eps_high and A > 0
};

template <typename acc_t>
RF_HOST_DEVICE acc_t rf_exp(acc_t x) { return exp(x); }
template <>
RF_HOST_DEVICE float rf_exp<float>(float x) { return expf(x); }

// logp, old_logp: this token's log-probs; seq_log_ratio: mean log-ratio of its sequence (gspo only).
// ref/is_weight/entropy/mask are only read when the matching has_* flag is set.
// The config floats arrive in double and are cast to acc_t here, once (fp32 math on the GPU for fp32
// inputs, as before the config was packed; the casts are loop invariant and hoisted by the compiler).
template <typename acc_t>
RF_HOST_DEVICE TokenResult<acc_t> policy_loss_token(const PolicyLossParams& p, acc_t logp, acc_t old_logp,
                                                    acc_t adv, acc_t seq_log_ratio, bool has_ref, acc_t ref,
                                                    bool has_is_weight, acc_t is_weight, bool has_entropy,
                                                    acc_t entropy, bool has_mask, acc_t mask) {
  const acc_t one = acc_t(1);
  const acc_t eps_low = acc_t(p.eps_low), eps_high = acc_t(p.eps_high), delta = acc_t(p.delta),
              dual_clip = acc_t(p.dual_clip), beta = acc_t(p.beta), entropy_coef = acc_t(p.entropy_coef),
              sapo_tau_pos = acc_t(p.sapo_tau_pos), sapo_tau_neg = acc_t(p.sapo_tau_neg);
  TokenResult<acc_t> r;
  // GSPO-token (Zheng et al. 2025): rho_t = sg(exp(lr_s)) * exp(logp_t - sg(logp_t)); its value is the
  // sequence ratio and d rho_t / d logp_t = rho_t, so the PPO gradient logic below applies unchanged.
  const acc_t log_ratio = (p.loss == kGspo) ? seq_log_ratio : (logp - old_logp);
  const acc_t rho = rf_exp(log_ratio);
  const acc_t lo = one - eps_low, hi = one + eps_high;
  r.ratio = rho;
  r.clip_low = rho < lo && adv < acc_t(0);
  r.clip_high = rho > hi && adv > acc_t(0);

  acc_t l, g;  // policy term and its derivative w.r.t. logp
  if (p.loss == kPpoClip || p.loss == kGspo) {
    // PPO (Schulman et al. 2017): l = -min(rho1 A, clip(rho, lo, hi) A), rho1 = min(rho, delta)
    // (two-sided clipping, INTELLECT-2 / TRL delta). The derivative of each branch: d(rho)/dlogp = rho,
    // zero where min() / clip() / the delta cap select a constant.
    const bool delta_caps = delta > acc_t(0) && rho > delta;
    const acc_t rho1 = delta_caps ? delta : rho;
    const acc_t clipped = rho < lo ? lo : (rho > hi ? hi : rho);
    const acc_t unclipped_obj = rho1 * adv, clipped_obj = clipped * adv;
    if (unclipped_obj <= clipped_obj) {
      l = -unclipped_obj;
      g = delta_caps ? acc_t(0) : -adv * rho;
    } else {
      l = -clipped_obj;
      g = (rho < lo || rho > hi) ? acc_t(0) : -adv * rho;
    }
    // Dual-clip PPO (Ye et al. 2020): for A < 0 the loss is at most -c A (a constant: no gradient).
    if (dual_clip > acc_t(0) && adv < acc_t(0)) {
      const acc_t cap = -dual_clip * adv;
      if (cap < l) {
        l = cap;
        g = acc_t(0);
      }
    }
  } else if (p.loss == kCispo) {
    // CISPO (MiniMax-M1 2025): l = -sg(min(rho, 1 + eps_high)) A logp.
    const acc_t wgt = rho < hi ? rho : hi;
    l = -wgt * adv * logp;
    g = -wgt * adv;
  } else {
    // SAPO (Gao et al. 2025): l = -(4 / tau) sigmoid(tau (rho - 1)) A, tau by the sign of A;
    // dl/dlogp = -(4/tau) A sig (1 - sig) tau rho = -4 A sig (1 - sig) rho.
    const acc_t tau = adv > acc_t(0) ? sapo_tau_pos : sapo_tau_neg;
    const acc_t sig = one / (one + rf_exp(-tau * (rho - one)));
    l = -(acc_t(4) / tau) * sig * adv;
    g = -acc_t(4) * adv * sig * (one - sig) * rho;
  }
  if (has_is_weight) {  // truncated IS weight (detached), policy term only
    l *= is_weight;
    g *= is_weight;
  }
  r.kl = acc_t(0);
  if (has_ref) {
    // KL estimators of Schulman (2020), d = ref - logp: k1 = -d, k2 = d^2/2, k3 = exp(d) - d - 1.
    const acc_t d = ref - logp;
    acc_t kl, gkl;
    if (p.kl == kK1) {
      kl = -d;
      gkl = one;
    } else if (p.kl == kK2) {
      kl = d * d / acc_t(2);
      gkl = -d;
    } else {
      const acc_t ed = rf_exp(d);
      kl = ed - d - one;
      gkl = one - ed;
    }
    r.kl = kl;
    l += beta * kl;
    g += beta * gkl;
  }
  acc_t gh = acc_t(0);
  if (has_entropy) {
    l -= entropy_coef * entropy;
    gh = -entropy_coef;
  }
  if (has_mask) {
    l *= mask;
    g *= mask;
    gh *= mask;
  }
  r.loss = l;
  r.dlogp = g;
  r.dentropy = gh;
  return r;
}

}  // namespace rubric_fast
