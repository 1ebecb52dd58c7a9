"""Build of the rdn_kernels._C extension (C++ CPU kernels, and CUDA kernels when possible).

Knobs (environment variables):
  FORCE_CUDA=1        build the CUDA kernels even when torch sees no GPU (needs nvcc and torch with CUDA)
  RDN_SKIP_CUDA=1     never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST  GPU architectures, default "8.0;9.0+PTX" (PTX: later GPUs compile it at load)
  MAX_JOBS            parallel compile jobs (ninja)
"""

import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _build_cuda() -> bool:
    if os.environ.get("RDN_SKIP_CUDA") == "1":
        return False
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    return has_toolkit and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")


def extension():
    sources = ["csrc/bindings.cpp", "csrc/nested_conv_common.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    if platform.machine() not in ("x86_64", "AMD64"):  # the AVX instantiations are x86-only
        sources = [source for source in sources if "_avx" not in source]
    cxx_flags = ["-O3", "-fopenmp"]
    if _build_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension(
            "rdn_kernels._C",
            sources,
            define_macros=[("RDN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("rdn_kernels._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
