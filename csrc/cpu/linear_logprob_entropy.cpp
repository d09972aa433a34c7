// linear_logprob_entropy forward and backward (docs/ops-math.md, "linear_logprob_entropy").
//
// Written with ATen ops on bounded chunks of rows and of the vocabulary, so the same code is the CPU
// kernel and (in a CUDA build) the CUDA kernel: on CUDA each chunk's matmul is a cuBLAS GEMM and the row
// reductions are ATen's CUDA reductions. It never materialises the N x V logits: the forward keeps an
// online max / sum-exp / sum(exp * (z - max)) per row (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax"), and the backward recomputes each chunk's logits from lse and the entropy.
//
// Precision: each chunk is computed in fp32 (fp64 for fp64 inputs): hidden and weight chunks are cast
// before the matmul, so bf16/fp16 inputs still get fp32 logits. dW is accumulated in fp32 and cast to the
// weight dtype at the end; dX and db likewise end in the dtype of hidden and bias.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "rubric_fast/checks.h"

namespace rubric_fast {
namespace {

constexpr const char* kFwd = "linear_logprob_entropy_fwd_native";
constexpr const char* kBwd = "linear_logprob_entropy_bwd_native";

struct Chunks {
  int64_t rows, vocab;
};

// Bounded workspace: rows x vocab logits of the compute dtype per chunk (16 MiB fp32 on CPU, 256 MiB on
// a GPU, where larger GEMMs pay off).
Chunks chunk_sizes(const at::Tensor& like) {
  return like.is_cuda() ? Chunks{4096, 16384} : Chunks{512, 8192};
}

// fp64 only when every floating input is fp64 (the oracle mode of the reference), else fp32.
at::ScalarType compute_dtype(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  const bool all64 = hidden.scalar_type() == at::kDouble && weight.scalar_type() == at::kDouble &&
                     (!bias.has_value() || bias->scalar_type() == at::kDouble);
  return all64 ? at::kDouble : at::kFloat;
}

void check_common(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const std::optional<at::Tensor>& bias_opt, double temperature) {
  TORCH_CHECK(hidden.device().type() == at::kCPU || hidden.device().type() == at::kCUDA, op,
              ": argument 'hidden' must be a CPU or CUDA tensor, got ", hidden.device());
  RF_CHECK_FLOAT(op, hidden);
  RF_CHECK_FLOAT(op, weight);
  TORCH_CHECK(hidden.dim() == 2, op, ": argument 'hidden' must be 2-D [N, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op,
              ": argument 'weight' must be 2-D [V, H] with H = hidden.size(1) = ", hidden.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": argument 'weight' must have a non-empty vocabulary (V > 0)");
  RF_CHECK_SAME_DEVICE(op, weight, hidden);
  RF_CHECK_1D(op, targets, hidden.size(0));
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
              ": argument 'targets' must be int64 or int32, got ", targets.scalar_type());
  RF_CHECK_SAME_DEVICE(op, targets, hidden);
  if (bias_opt) {
    const at::Tensor& bias = *bias_opt;  // named like the argument: the check messages print it
    RF_CHECK_1D(op, bias, weight.size(0));
    RF_CHECK_FLOAT(op, bias);
    RF_CHECK_SAME_DEVICE(op, bias, hidden);
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": argument 'temperature' must be > 0, got ",
              temperature);
}

// Targets outside [0, V) that are not ignore_index are an error (one device sync on CUDA).
void check_targets(const char* op, const at::Tensor& targets, int64_t V, int64_t ignore_index) {
  if (targets.numel() == 0) return;
  const bool bad = ((targets.ne(ignore_index)) & ((targets < 0) | (targets >= V))).any().item<bool>();
  TORCH_CHECK(!bad, op, ": argument 'targets' has values outside [0, ", V, ") that are not ignore_index (",
              ignore_index, ")");
}

// Logits of rows [r0, r1) and vocabulary [v0, v1) in the compute dtype: (x W^T + b) / T.
at::Tensor chunk_logits(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t v0, int64_t v1, double temperature, at::ScalarType ct) {
  at::Tensor w = weight.slice(0, v0, v1).to(ct);
  at::Tensor z = at::matmul(x, w.t());
  if (bias) z.add_(bias->slice(0, v0, v1).to(ct).unsqueeze(0));
  // Divided, not multiplied by a rounded 1 / T: that reciprocal's rounding scales every logit alike, a
  // systematic error of ~eps |z| in logp (6e-4 at 1e4 in fp32) that a division does not have.
  if (temperature != 1.0) z.div_(temperature);
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lle_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& targets,
                                                       const std::optional<at::Tensor>& bias, double temperature,
                                                       int64_t ignore_index) {
  check_common(kFwd, hidden, weight, targets, bias, temperature);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_targets(kFwd, targets, V, ignore_index);
  const auto ct = compute_dtype(hidden, weight, bias);
  const auto opts = hidden.options().dtype(ct);
  at::Tensor logp = at::zeros({N}, opts), entropy = at::zeros({N}, opts), lse = at::zeros({N}, opts);
  if (N == 0) return {logp, entropy, lse};
  const Chunks ch = chunk_sizes(hidden);
  const at::Tensor ignored_all = targets.eq(ignore_index);  // before any int32 -> int64 cast
  const at::Tensor safe_targets_all = targets.to(at::kLong).masked_fill(ignored_all, 0);

  for (int64_t r0 = 0; r0 < N; r0 += ch.rows) {
    const int64_t r1 = std::min(N, r0 + ch.rows);
    const at::Tensor x = hidden.slice(0, r0, r1).to(ct);
    const at::Tensor ignored = ignored_all.slice(0, r0, r1);
    const at::Tensor tgt = safe_targets_all.slice(0, r0, r1);
    // Online softmax state per row (Milakov & Gimelshein 2018), all of it from the same chunk logits z:
    // running max m, s = sum exp(z - m), u = sum exp(z - m) (z - m) <= 0, and the target logit z_t.
    // Keeping u relative to m (rescaled as m grows: sum e' (z - m') = r (u + (m - m') s), r = exp(m - m'))
    // avoids the cancellation of H = lse - sum p z between two numbers of the size of the logits.
    at::Tensor m, s, u;
    at::Tensor z_t = at::zeros({r1 - r0}, opts);
    for (int64_t v0 = 0; v0 < V; v0 += ch.vocab) {
      const int64_t v1 = std::min(V, v0 + ch.vocab);
      at::Tensor z = chunk_logits(x, weight, bias, v0, v1, temperature, ct);
      // The target logit is gathered from these logits, not recomputed from the target's weight row: a
      // dot product in another summation order differs by rounding (~ulp of the logits, 1e-3 at 1e4)
      // and gave logp > 0 for a near-certain target.
      const at::Tensor in_chunk = (tgt >= v0) & (tgt < v1);
      const at::Tensor col = (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(1);
      z_t = at::where(in_chunk, z.gather(1, col).squeeze(1), z_t);
      const at::Tensor z_max = std::get<0>(z.max(1));
      if (!m.defined()) {  // first chunk
        m = z_max;
        s = at::zeros_like(m);
        u = at::zeros_like(m);
      }
      const at::Tensor m_new = at::maximum(m, z_max);
      const at::Tensor shift = m - m_new;  // <= 0
      const at::Tensor rescale = shift.exp();
      const at::Tensor d = z.sub_(m_new.unsqueeze(1));  // z - m_new <= 0, in place: z is not needed again
      at::Tensor e = d.exp();
      u = (u + shift * s) * rescale + (e * d).sum(1);
      s = s * rescale + e.sum(1);
      m = m_new;
    }
    // s >= 1 (the max term is exp(0) = 1) and z_t <= m, so logp = (z_t - m) - log s <= 0 and
    // H = log s - u / s >= 0 hold by construction, and neither subtracts two numbers of the size of the
    // logits. The clamps make the signs unconditional (they do not rely on the accuracy of the vectorised
    // exp / log); they only ever move a value that rounding pushed past 0.
    const at::Tensor log_s = s.log();
    at::Tensor lse_c = m + log_s;
    at::Tensor ent_c = (log_s - u / s).clamp_min_(0);
    at::Tensor logp_c = ((z_t - m) - log_s).clamp_max_(0);
    logp.slice(0, r0, r1).copy_(logp_c.masked_fill(ignored, 0));
    entropy.slice(0, r0, r1).copy_(ent_c.masked_fill(ignored, 0));
    lse.slice(0, r0, r1).copy_(lse_c.masked_fill(ignored, 0));
  }
  return {logp, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lle_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
    double temperature, int64_t ignore_index, bool needs_dhidden, bool needs_dweight, bool needs_dbias) {
  check_common(kBwd, hidden, weight, targets, bias, temperature);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  for (const auto& pr : {std::make_pair(&lse, "lse"), std::make_pair(&entropy, "entropy"),
                         std::make_pair(&grad_logp, "grad_logp"), std::make_pair(&grad_entropy, "grad_entropy")}) {
    const at::Tensor& t = *pr.first;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N, kBwd, ": argument '", pr.second, "' must have shape [", N,
                "], got ", t.sizes());
    TORCH_CHECK(is_float_dtype(t.scalar_type()), kBwd, ": argument '", pr.second, "' must be floating point, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == hidden.device(), kBwd, ": argument '", pr.second, "' must be on ", hidden.device());
  }
  check_targets(kBwd, targets, V, ignore_index);
  needs_dbias = needs_dbias && bias.has_value();
  const auto ct = compute_dtype(hidden, weight, bias);
  const auto opts = hidden.options().dtype(ct);
  const double inv_t = 1.0 / temperature;

  // Gradients not asked for are empty [0] tensors (the schema returns Tensor, not Tensor?).
  at::Tensor dhidden_acc = needs_dhidden ? at::zeros({N, H}, opts) : at::Tensor();
  at::Tensor dweight_acc = needs_dweight ? at::zeros({V, H}, opts) : at::Tensor();  // fp32 accumulation
  at::Tensor dbias_acc = needs_dbias ? at::zeros({V}, opts) : at::Tensor();

  if (N > 0 && (needs_dhidden || needs_dweight || needs_dbias)) {
    const Chunks ch = chunk_sizes(hidden);
    const at::Tensor ignored_all = targets.eq(ignore_index);  // before any int32 -> int64 cast
    const at::Tensor safe_targets_all = targets.to(at::kLong).masked_fill(ignored_all, 0);
    // Ignored rows receive no gradient: zero their upstream gradients.
    const at::Tensor g_lp_all = grad_logp.to(ct).masked_fill(ignored_all, 0);
    const at::Tensor g_h_all = grad_entropy.to(ct).masked_fill(ignored_all, 0);
    const at::Tensor lse_all = lse.to(ct);
    const at::Tensor mu_all = lse_all - entropy.to(ct);  // mu = sum_v p_v z_v = lse - H
    for (int64_t r0 = 0; r0 < N; r0 += ch.rows) {
      const int64_t r1 = std::min(N, r0 + ch.rows);
      const at::Tensor x = hidden.slice(0, r0, r1).to(ct);
      const at::Tensor tgt = safe_targets_all.slice(0, r0, r1);
      const at::Tensor g_lp = g_lp_all.slice(0, r0, r1).unsqueeze(1), g_h = g_h_all.slice(0, r0, r1).unsqueeze(1);
      const at::Tensor lse_c = lse_all.slice(0, r0, r1).unsqueeze(1), mu_c = mu_all.slice(0, r0, r1).unsqueeze(1);
      at::Tensor dx = needs_dhidden ? dhidden_acc.slice(0, r0, r1) : at::Tensor();
      for (int64_t v0 = 0; v0 < V; v0 += ch.vocab) {
        const int64_t v1 = std::min(V, v0 + ch.vocab);
        at::Tensor z = chunk_logits(x, weight, bias, v0, v1, temperature, ct);
        at::Tensor p = (z - lse_c).exp_();
        // dz = g_logp (1[v = y] - p) - g_H p (z - mu), then / T for the logits before the temperature.
        at::Tensor dz = z.sub_(mu_c).mul_(g_h).add_(g_lp).mul_(p).neg_();
        // + g_logp at the target column when it falls in this chunk (scatter_add: no host sync).
        const at::Tensor in_chunk = (tgt >= v0) & (tgt < v1);
        const at::Tensor col = (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(1);
        dz.scatter_add_(1, col, g_lp.mul(in_chunk.unsqueeze(1).to(ct)));
        if (inv_t != 1.0) dz.mul_(inv_t);
        if (needs_dhidden) dx.add_(at::matmul(dz, weight.slice(0, v0, v1).to(ct)));
        if (needs_dweight) dweight_acc.slice(0, v0, v1).add_(at::matmul(dz.t(), x));
        if (needs_dbias) dbias_acc.slice(0, v0, v1).add_(dz.sum(0));
      }
    }
  }
  auto finish = [](bool needed, const at::Tensor& acc, const at::Tensor& like) {
    return needed ? acc.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(needs_dhidden, dhidden_acc, hidden), finish(needs_dweight, dweight_acc, weight),
          needs_dbias ? dbias_acc.to(bias->scalar_type()) : at::empty({0}, bias ? bias->options() : weight.options())};
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CPU, m) {
  m.impl("linear_logprob_entropy_fwd_native", &rubric_fast::lle_fwd);
  m.impl("linear_logprob_entropy_bwd_native", &rubric_fast::lle_bwd);
}

#ifdef RUBRIC_FAST_WITH_CUDA
// The chunked ATen code above is device generic: on CUDA the matmuls run on cuBLAS and the row
// reductions on ATen's CUDA reduction kernels, all on the current stream. A fused Triton kernel is the
// fast path for this op; this one is the C++ fallback.
TORCH_LIBRARY_IMPL(rubric_fast, CUDA, m) {
  m.impl("linear_logprob_entropy_fwd_native", &rubric_fast::lle_fwd);
  m.impl("linear_logprob_entropy_bwd_native", &rubric_fast::lle_bwd);
}
#endif
