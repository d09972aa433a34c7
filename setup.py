"""Build only: the rubric_fast._C extension and the mapping of kernels/ to rubric_fast.kernels.

Metadata lives in pyproject.toml. What gets built is decided from the environment:

* ``rubric_fast._C`` always holds the C++ CPU ops (csrc/ops.cpp, csrc/cpu/*.cpp).
* The CUDA ops (csrc/cuda/*.cu) are added when ``RUBRIC_FAST_BUILD_CUDA`` allows it:
  ``auto`` (default): when torch is a CUDA build and nvcc is found; ``1``: required (a clear error
  otherwise); ``0``: never. Architectures come from ``TORCH_CUDA_ARCH_LIST`` (default
  ``8.0;8.6;8.9;9.0``).
* Parallel compile jobs: ``MAX_JOBS`` if set, else the CPU count capped by memory (a job of nvcc on
  these sources can take ~3 GiB).
* ``RUBRIC_FAST_BUILD_EXT=0`` skips the extension; in ``auto`` mode a failed C++ build only warns, and
  the package installs without ``_C`` (the ops then use the torch / Triton backends).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# kernels/ installs as rubric_fast.kernels; examples/ (the embedded default config and rubric datasets) as
# rubric_fast.examples, so `rubric-fast train` with no config also works from a wheel
packages = find_packages(include=["rubric_fast", "rubric_fast.*"]) + [
    "rubric_fast.kernels", "rubric_fast.examples", "rubric_fast.examples.rubrics"]
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _warn(msg: str) -> None:
    print(f"rubric_fast setup.py: WARNING: {msg}", file=sys.stderr)


def _mode(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"rubric_fast setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _cap_max_jobs(with_cuda: bool) -> None:
    """Cap the parallel jobs of ninja (read by torch's BuildExtension as MAX_JOBS) by memory."""
    if os.environ.get("MAX_JOBS"):
        return
    per_job_gib = 3.0 if with_cuda else 1.5
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    jobs = max(1, min(os.cpu_count() or 1, int(mem_gib // per_job_gib)))
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    """(ext_modules, cmdclass, strict) for the environment; ([], {}, False) when nothing is built."""
    build_ext_mode = _mode("RUBRIC_FAST_BUILD_EXT", "auto")
    cuda_mode = _mode("RUBRIC_FAST_BUILD_CUDA", "auto")
    if build_ext_mode == "0":
        return [], {}, False
    strict = build_ext_mode == "1" or cuda_mode == "1"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # e.g. an isolated build env without torch
        if strict:
            raise SystemExit(f"rubric_fast setup.py: the native extension needs torch at build time: {exc}")
        _warn(f"torch is not importable at build time ({exc}); building without rubric_fast._C")
        return [], {}, False

    sources = [os.path.relpath(p, HERE) for p in ["csrc/ops.cpp", *sorted(glob.glob(os.path.join(HERE, "csrc/cpu/*.cpp")))]]
    cu_sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc/cuda/*.cu")))]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O2", "-std=c++20"]

    nvcc = shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    )
    cuda_reasons = []
    if torch.version.cuda is None:
        cuda_reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not nvcc or not os.path.exists(nvcc):
        cuda_reasons.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    with_cuda = cuda_mode != "0" and not cuda_reasons
    if cuda_mode == "1" and cuda_reasons:
        raise SystemExit("rubric_fast setup.py: RUBRIC_FAST_BUILD_CUDA=1 but the CUDA ops cannot be built: "
                         + "; ".join(cuda_reasons))
    _cap_max_jobs(with_cuda)

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = cpp_extension.CUDAExtension(
            "rubric_fast._C",
            sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("RUBRIC_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O2", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    else:
        if cuda_mode == "auto" and cu_sources:
            print("rubric_fast setup.py: building the CPU ops only (" + "; ".join(cuda_reasons) + ")")
        ext = cpp_extension.CppExtension(
            "rubric_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtension(base):
        """torch's BuildExtension; in auto mode a failed build of _C warns instead of failing the install."""

        def build_extensions(self):
            self._failed = []
            try:  # torch's compiler checks run here, before build_extension
                super().build_extensions()
            except Exception as exc:
                if strict:
                    raise
                _warn(f"building the native extension failed ({type(exc).__name__}: {exc}); installing "
                      "without it. The ops fall back to the torch/Triton backends.")
                self._failed = list(self.extensions)
            # Drop what failed so that the copy into the tree / the wheel does not look for it.
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if strict:
                    raise
                self._failed.append(ext)
                _warn(
                    f"building {ext.name} failed ({type(exc).__name__}: {exc}); installing without it. "
                    "The ops fall back to the torch/Triton backends. Set RUBRIC_FAST_BUILD_EXT=1 to make "
                    "this an error."
                )

    return [ext], {"build_ext": BuildExtension}, strict


ext_modules, cmdclass, _strict = _extensions()

setup(
    packages=packages,
    package_dir={"rubric_fast.kernels": "kernels", "rubric_fast.examples": "examples"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
