// entropy_mask on CUDA (docs/ops-math.md, "entropy_mask"; "Beyond the 80/20 rule", Wang et al. 2025):
// exactly k of the valid tokens with the highest entropy, ties broken by lower index.
//
// Radix select of the k-th largest order-preserving 32-bit key (radix_key.h) of the fp32 entropies:
// 4 passes, most significant byte first, each a 256-bin histogram of the next byte over the keys that
// match the prefix found so far (per-block shared-memory histograms, merged with global atomics), and a
// one-thread pick of the byte in which the k-th largest falls. No host round trip between passes.
// Then every valid token with a key above the threshold T is selected, and of the tokens whose key
// equals T the first k_rem in index order: an inclusive scan (ATen cumsum, CUB underneath) of the
// tie flags gives each tie its rank.
//
// Entropies of every dtype are compared as fp32 values (docs/ops-math.md), as in the CPU op.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "rubric_fast/checks.h"
#include "rubric_fast/cuda_utils.cuh"
#include "rubric_fast/radix_key.h"

namespace rubric_fast {
namespace {

constexpr const char* kOp = "entropy_mask_native";
constexpr int kBins = 256;

// state = {prefix, mask, k_rem}: the key bytes fixed so far, which bits they cover, and how many of the
// tokens that match the prefix are still to be selected.
__global__ void radix_histogram_kernel(const float* __restrict__ entropy, const bool* __restrict__ valid, int64_t n,
                                       const uint32_t* __restrict__ state, int shift,
                                       unsigned int* __restrict__ hist) {
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const uint32_t prefix = state[0], mask = state[1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!valid[i]) continue;
    const uint32_t key = ordered_key_f32(entropy[i]);
    if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & 0xFFu], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (local[b] != 0) atomicAdd(&hist[b], local[b]);
}

// One thread: walk the bins from the largest byte down to the one holding the k_rem-th largest key, fix
// that byte, and clear the histogram for the next pass.
__global__ void radix_pick_kernel(unsigned int* __restrict__ hist, uint32_t* __restrict__ state, int shift) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const uint32_t k = state[2];
  uint32_t above = 0;
  for (int d = kBins - 1; d >= 0; --d) {
    const uint32_t c = hist[d];
    if (above + c >= k) {
      state[0] |= uint32_t(d) << shift;
      state[2] = k - above;
      break;
    }
    above += c;
  }
  state[1] |= 0xFFu << shift;
  for (int d = 0; d < kBins; ++d) hist[d] = 0;
}

__global__ void select_above_kernel(const float* __restrict__ entropy, const bool* __restrict__ valid, int64_t n,
                                    const uint32_t* __restrict__ state, bool* __restrict__ out,
                                    int32_t* __restrict__ tie) {
  const uint32_t threshold = state[0];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t key = ordered_key_f32(entropy[i]);
    const bool v = valid[i];
    out[i] = v && key > threshold;
    tie[i] = (v && key == threshold) ? 1 : 0;
  }
}

__global__ void select_ties_kernel(const int32_t* __restrict__ tie, const int32_t* __restrict__ tie_rank, int64_t n,
                                   const uint32_t* __restrict__ state, bool* __restrict__ out) {
  const uint32_t k_rem = state[2];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (tie[i] && uint32_t(tie_rank[i]) <= k_rem) out[i] = true;  // inclusive rank: 1 for the first tie
}

at::Tensor entropy_mask_cuda(const at::Tensor& entropy, const at::Tensor& valid, int64_t k) {
  const int64_t n = check_values_with_companion(kOp, entropy, "entropy", valid, "valid", at::kBool, at::kCUDA);
  TORCH_CHECK(n < (int64_t(1) << 31), kOp, ": argument 'entropy' has more than 2^31 - 1 tokens");
  RF_CUDA_DEVICE_GUARD(entropy);
  const int64_t n_valid = valid.sum().item<int64_t>();  // one sync: the bound check needs it
  TORCH_CHECK(k >= 0 && k <= n_valid, kOp, ": argument 'k' must be in [0, n_valid = ", n_valid, "], got ", k);

  at::Tensor out = at::zeros({n}, entropy.options().dtype(at::kBool));
  if (k == 0) return out;
  const at::Tensor e = entropy.to(at::kFloat).contiguous();
  const at::Tensor v = valid.contiguous();
  const auto int_opts = entropy.options().dtype(at::kInt);
  at::Tensor state = at::zeros({3}, int_opts);
  state.select(0, 2).fill_(k);
  at::Tensor hist = at::zeros({kBins}, int_opts);
  at::Tensor tie = at::empty({n}, int_opts);
  auto* state_p = reinterpret_cast<uint32_t*>(state.data_ptr<int32_t>());
  auto* hist_p = reinterpret_cast<unsigned int*>(hist.data_ptr<int32_t>());
  const cudaStream_t stream = current_stream();
  const int blocks = blocks_for(n, kThreads, 1024);

  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    radix_histogram_kernel<<<blocks, kThreads, 0, stream>>>(e.data_ptr<float>(), v.data_ptr<bool>(), n, state_p,
                                                            shift, hist_p);
    RF_CUDA_LAUNCH_CHECK();
    radix_pick_kernel<<<1, 1, 0, stream>>>(hist_p, state_p, shift);
    RF_CUDA_LAUNCH_CHECK();
  }
  select_above_kernel<<<blocks, kThreads, 0, stream>>>(e.data_ptr<float>(), v.data_ptr<bool>(), n, state_p,
                                                       out.data_ptr<bool>(), tie.data_ptr<int32_t>());
  RF_CUDA_LAUNCH_CHECK();
  const at::Tensor tie_rank = at::cumsum(tie, 0, at::kInt);
  select_ties_kernel<<<blocks, kThreads, 0, stream>>>(tie.data_ptr<int32_t>(), tie_rank.data_ptr<int32_t>(), n,
                                                      state_p, out.data_ptr<bool>());
  RF_CUDA_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace rubric_fast

TORCH_LIBRARY_IMPL(rubric_fast, CUDA, m) { m.impl("entropy_mask_native", &rubric_fast::entropy_mask_cuda); }
