// Shared pieces of the CUDA ops: the current stream, launch checks, block reductions.
//
// The current stream and device guard come from c10/cuda. The CPU-only torch wheel ships the c10/cuda
// headers but not the generated c10/cuda/impl/cuda_cmake_macros.h, so the compile-only check of these
// sources on a CPU machine (tests/test_cuda_compile.py, which defines RUBRIC_FAST_CUDA_COMPILE_ONLY)
// uses the legacy default stream instead. A real build against a CUDA torch always has the header and
// always launches on torch's current stream.
#pragma once

#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace rubric_fast {
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
}  // namespace rubric_fast
#define RF_CUDA_DEVICE_GUARD(t) const c10::cuda::CUDAGuard rf_device_guard_((t).device())
#define RF_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#elif defined(RUBRIC_FAST_CUDA_COMPILE_ONLY)
namespace rubric_fast {
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace rubric_fast
#define RF_CUDA_DEVICE_GUARD(t) ((void)0)
#define RF_CUDA_LAUNCH_CHECK()                                                                \
  do {                                                                                        \
    const cudaError_t rf_err_ = cudaGetLastError();                                           \
    TORCH_CHECK(rf_err_ == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(rf_err_)); \
  } while (0)
#else
#error "c10/cuda/impl/cuda_cmake_macros.h is missing: build the CUDA ops against a CUDA build of torch"
#endif

namespace rubric_fast {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n, int threads = kThreads, int64_t max_blocks = 65535) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); the result is valid in thread 0.
// `shared` needs 32 elements. Safe to call repeatedly (it synchronises before reusing `shared`).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < n_warps) ? shared[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace rubric_fast
