"""Build only: the rubric_fast._C extension and the mapping of kernels/ to rubric_fast.kernels.

(The C++/CUDA extension build is added by the native-ops work; metadata lives in pyproject.toml.)
"""

from setuptools import find_packages, setup

packages = find_packages(include=["rubric_fast", "rubric_fast.*"]) + ["rubric_fast.kernels"]

setup(
    packages=packages,
    package_dir={"rubric_fast.kernels": "kernels"},
)
