// Schemas of the native ops, their Meta (fake) kernels, and the Python module init of rubric_fast._C.
//
// Every op name ends in `_native`: the public ops of rubric_fast/ops/ are registered in the same
// `rubric_fast` namespace from Python (torch.library.custom_op, a FRAGMENT) and call these by
// torch.ops.rubric_fast.<name>. The native ops have no autograd of their own: the policy loss returns its
// gradients, and linear_logprob_entropy has an explicit backward op; the Python layer wires them up.
//
// The Meta kernels give every output's shape and dtype (none is data dependent), which is what
// FakeTensor / torch.compile / torch.library.opcheck(test_faketensor) need.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "rubric_fast/checks.h"
#include "rubric_fast/policy_params.h"

namespace rubric_fast {
namespace {

at::ScalarType out_float_dtype(const at::Tensor& like) {
  // Outputs are fp32, fp64 only in the float64 oracle mode (docs/ops-math.md).
  return like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> group_advantages_meta(const at::Tensor& rewards, const at::Tensor& group_index,
                                                         c10::string_view, c10::string_view, double, double,
                                                         const std::optional<at::Tensor>&) {
  auto n = rewards.sym_sizes();
  return {at::empty_symint(n, rewards.options().dtype(out_float_dtype(rewards))),
          at::empty_symint(n, rewards.options().dtype(at::kBool))};
}

at::Tensor entropy_mask_meta(const at::Tensor& entropy, const at::Tensor&, int64_t) {
  return at::empty_symint(entropy.sym_sizes(), entropy.options().dtype(at::kBool));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_meta(
    const at::Tensor& logp, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::ArrayRef<double> fparams,
    c10::ArrayRef<int64_t> iparams) {
  // The same config check as the CPU / CUDA kernels: a bad packed config fails at trace time too.
  (void)policy_loss_params(fparams, iparams);
  auto opts = logp.options().dtype(out_float_dtype(logp));
  return {at::empty({}, opts), at::empty({4}, logp.options().dtype(at::kFloat)),
          at::empty_symint(logp.sym_sizes(), opts), at::empty_symint(logp.sym_sizes(), opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lle_fwd_meta(const at::Tensor& hidden, const at::Tensor& weight,
                                                            const at::Tensor& targets,
                                                            const std::optional<at::Tensor>& bias, double, int64_t) {
  const bool all64 = hidden.scalar_type() == at::kDouble && weight.scalar_type() == at::kDouble &&
                     (!bias.has_value() || bias->scalar_type() == at::kDouble);
  auto opts = hidden.options().dtype(all64 ? at::kDouble : at::kFloat);
  auto n = targets.sym_sizes();
  return {at::empty_symint(n, opts), at::empty_symint(n, opts), at::empty_symint(n, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lle_bwd_meta(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor&, const std::optional<at::Tensor>& bias,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, bool needs_dhidden,
    bool needs_dweight, bool needs_dbias) {
  // Gradients that are not asked for come back as empty tensors of shape [0] (see the schema comment).
  auto none = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor dh = needs_dhidden ? at::empty_symint(hidden.sym_sizes(), hidden.options()) : none(hidden);
  at::Tensor dw = needs_dweight ? at::empty_symint(weight.sym_sizes(), weight.options()) : none(weight);
  at::Tensor db = (needs_dbias && bias.has_value()) ? at::empty_symint(bias->sym_sizes(), bias->options())
                                                    : none(bias.has_value() ? *bias : weight);
  return {dh, dw, db};
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY(rubric_fast, m) {
  // rewards[B] (NaN = missing), group_index[B] int64 ids -> advantages[B] (fp32; fp64 for fp64 rewards),
  // valid[B] bool. estimator: grpo|dr_grpo|rloo|w_reinforce|canon; scale: group|batch|none.
  m.def(
      "group_advantages_native(Tensor rewards, Tensor group_index, str estimator, str scale, float eps, "
      "float positive_weight, Tensor? metric) -> (Tensor advantages, Tensor valid)");
  // Exactly k of the valid tokens with the highest entropy, ties to the lower index.
  m.def("entropy_mask_native(Tensor entropy, Tensor valid, int k) -> Tensor");
  // fparams, iparams: the PolicyLossConfig packed by PolicyLossConfig.to_op_args(), the layout of
  // FPARAMS / IPARAMS in rubric_fast/reference/types.py; decoded and validated by policy_loss_params()
  // (rubric_fast/policy_params.h). stats = f32[clip_frac_low, clip_frac_high, kl_mean, ratio_mean];
  // grad_* for an upstream gradient of 1.
  m.def(
      "policy_loss_native(Tensor logp, Tensor old_logp, Tensor advantages, Tensor loss_weight, Tensor? ref_logp, "
      "Tensor? is_weight, Tensor? seq_index, Tensor? entropy, Tensor? entropy_mask, float[] fparams, "
      "int[] iparams) -> (Tensor loss, Tensor stats, Tensor grad_logp, Tensor grad_entropy)");
  m.def(
      "linear_logprob_entropy_fwd_native(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "float temperature, int ignore_index) -> (Tensor logp, Tensor entropy, Tensor lse)");
  // A gradient that is not needed (needs_* false, or no bias) is returned as an empty tensor of shape [0].
  m.def(
      "linear_logprob_entropy_bwd_native(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, "
      "Tensor entropy, Tensor grad_logp, Tensor grad_entropy, float temperature, int ignore_index, "
      "bool needs_dhidden, bool needs_dweight, bool needs_dbias) -> (Tensor dhidden, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(rubric_fast, Meta, m) {
  m.impl("group_advantages_native", &rubric_fast::group_advantages_meta);
  m.impl("entropy_mask_native", &rubric_fast::entropy_mask_meta);
  m.impl("policy_loss_native", &rubric_fast::policy_loss_meta);
  m.impl("linear_logprob_entropy_fwd_native", &rubric_fast::lle_fwd_meta);
  m.impl("linear_logprob_entropy_bwd_native", &rubric_fast::lle_bwd_meta);
}

// A plain CPython module (no pybind11: it keeps the build light): importing rubric_fast._C runs the
// static registrations above. WITH_CUDA says whether the CUDA kernels were compiled in.
static struct PyModuleDef rubric_fast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                                  "Native (C++/CUDA) ops of rubric_fast, in torch.ops.rubric_fast",
                                                  -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&rubric_fast_c_module);
  if (mod == nullptr) return nullptr;
#ifdef RUBRIC_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
