#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/cuda/*.cu) with nvcc against torch's headers.
#
# Works on a CPU-only machine with the CPU torch wheel: its include/ tree has the ATen and c10/cuda
# headers but not the generated c10/cuda/impl/cuda_cmake_macros.h, so RUBRIC_FAST_CUDA_COMPILE_ONLY
# selects the fallback in csrc/include/rubric_fast/cuda_utils.cuh (default stream; see there).
# The flags follow torch.utils.cpp_extension.CUDAExtension's, for sm_90 (override: CUDA_ARCH=80 ...).
#
# usage: tools/check_cuda_compile.sh [file.cu ...]      (default: every csrc/cuda/*.cu)
# env:   NVCC (default: nvcc), OUT_DIR (default: a temp dir), JOBS (default: nproc), CUDA_ARCH (default: 90)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
ARCH="${CUDA_ARCH:-90}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/rubric_fast_nvcc.XXXXXX)}"
PYTHON="${PYTHON:-python}"
TORCH_INCLUDE="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

if [ "$#" -gt 0 ]; then files=("$@"); else files=("$ROOT"/csrc/cuda/*.cu); fi

export NVCC ARCH OUT_DIR TORCH_INCLUDE PY_INCLUDE ABI ROOT
compile_one() {
  local src="$1" obj
  obj="$OUT_DIR/$(basename "${src%.cu}").o"
  "$NVCC" -c "$src" -o "$obj" \
    -std=c++20 -O2 --expt-relaxed-constexpr -Xcompiler -fPIC \
    -gencode "arch=compute_${ARCH},code=sm_${ARCH}" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DRUBRIC_FAST_WITH_CUDA=1 -DRUBRIC_FAST_CUDA_COMPILE_ONLY=1 \
    -I"$ROOT/csrc/include" -I"$TORCH_INCLUDE" -I"$TORCH_INCLUDE/torch/csrc/api/include" -I"$PY_INCLUDE" \
    -w \
    && echo "ok   $src -> $obj" || { echo "FAIL $src"; return 1; }
}
export -f compile_one
printf '%s\n' "${files[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}
