"""Build of attnkit's op library (attnkit._C).

CUDA sources are compiled whenever torch has CUDA and nvcc is found, also on a machine without a
GPU. The targets come from scripts/cuda_archs.py (ATTNKIT_CUDA_ARCHS when set; else the visible
GPU's architecture, or "9.0a" without a GPU; plus PTX a newer GPU can JIT, "8.0+PTX" next to
9.0a); ATTNKIT_CPU_ONLY=1 skips CUDA.
With a ROCm torch (torch.version.hip) the same sources go through torch's hipify and hipcc for
PYTORCH_ROCM_ARCH / ATTNKIT_ROCM_ARCHS (default "gfx90a;gfx942"); see docs/rocm.md.
Sources are found by folder (DESIGN §1), so a new family only adds files.
"""
import glob
import importlib.util
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _cuda_archs_module():
    # One place decides the default targets; scripts/setup.sh asks the same file (build stamp).
    spec = importlib.util.spec_from_file_location("attnkit_cuda_archs", os.path.join(ROOT, "scripts", "cuda_archs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(pattern):
    return sorted(glob.glob(os.path.join(CSRC, pattern)))


def _want_cuda():
    if os.environ.get("ATTNKIT_CPU_ONLY", "0") == "1":
        return False
    if torch.version.hip is not None:
        return True  # torch's hipify turns the .cu launchers into HIP (docs/rocm.md)
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    with_cuda = _want_cuda()
    sources = (
        _sources("ops.cpp")
        + _sources("python_module.cpp")
        + _sources("cpu/*.cpp")
        + _sources("autograd/*.cpp")
        + _sources("autocast/*.cpp")
        + _sources("meta/*.cpp")
        + _sources("attnkit/*.cpp")
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DATTNKIT_WITH_OPENMP"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    if not with_cuda:
        return CppExtension(
            "attnkit._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    if torch.version.hip is not None:
        # ROCm torch: CUDAExtension runs torch's hipify over csrc/cuda/*.cu and the headers they
        # include, then compiles with hipcc for PYTORCH_ROCM_ARCH (docs/rocm.md). An explicit
        # PYTORCH_ROCM_ARCH wins; else ATTNKIT_ROCM_ARCHS; else MI200 + MI300.
        os.environ.setdefault("PYTORCH_ROCM_ARCH", os.environ.get("ATTNKIT_ROCM_ARCHS", "gfx90a;gfx942"))
        # The "nvcc" flags go to hipcc (clang) there: no nvcc-only options. torch defines
        # __HIP_NO_HALF_{OPERATORS,CONVERSIONS}__; undefine them as the CUDA build does for CUDA.
        nvcc = ["-O3", "-std=c++17", "-U__HIP_NO_HALF_OPERATORS__", "-U__HIP_NO_HALF_CONVERSIONS__"]
    else:
        # torch's build helper reads TORCH_CUDA_ARCH_LIST; without it, on a machine with no GPU it
        # would compile for every architecture torch itself was built for.
        targets = _cuda_archs_module()
        archs = targets.cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"attnkit: CUDA targets {archs}", flush=True)
        nvcc = [
            "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            f"--threads={os.environ.get('ATTNKIT_NVCC_THREADS', '2')}",
        ]
        if targets.has_sm90a(archs):
            # Host code may pick the Hopper-only (wgmma) kernels: kernels/common/wgmma.cuh.
            nvcc.append("-DATTNKIT_SM90A_TARGET")
    return CUDAExtension(
        "attnkit._C", sources + _sources("cuda/*.cu"), include_dirs=include_dirs,
        define_macros=define_macros + [("ATTNKIT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    name="attnkit",
    version="0.1.0",
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
