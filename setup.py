"""Packaging for wfnet: the two Python packages, plus the optional CUDA extension ``wfnet._C`` built from csrc/.

The extension is built only when (1) torch is importable at build time (``pip install --no-build-isolation``, since
torch is deliberately not a build requirement), (2) torch is a CUDA build, (3) a CUDA toolkit is found, and (4)
``WFNET_SKIP_CUDA_BUILD`` is not set to 1. Otherwise the install still succeeds and wfnet runs on its other
backends; ``backend="cuda"`` then raises an error that says how to build it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[wfnet setup] {msg}", file=sys.stderr)


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the directory of nvcc on PATH, else /usr/local/cuda. torch's own guess can land
    on /usr/local, where linking fails on -lcudart, so we set CUDA_HOME before importing cpp_extension."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    from shutil import which

    nvcc = which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "lib64")) or os.path.exists(os.path.join(home, "targets")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def cuda_extensions():
    if os.environ.get("WFNET_SKIP_CUDA_BUILD", "0") == "1":
        _log("WFNET_SKIP_CUDA_BUILD=1: not building the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return [], {}
    try:
        import torch
    except ImportError:
        _log("torch is not importable at build time (build isolation?): skipping the CUDA extension; "
             "install torch first and use `pip install --no-build-isolation -e .` to build it")
        return [], {}
    if torch.version.cuda is None:
        _log("torch is a CPU-only build: skipping the CUDA extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _log("no CUDA toolkit found (set CUDA_HOME): skipping the CUDA extension")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # Ampere + Hopper when no GPU is visible to detect
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _log(f"building wfnet._C with CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    ext = CUDAExtension(
        name="wfnet._C",
        sources=sources,
        # No -std flag: torch's cpp_extension adds the standard its own headers need (C++17 in older releases,
        # C++20 in torch 2.14, whose ATen refuses to compile under an explicit -std=c++17).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages("python") + find_packages(".", include=["wf_kernels", "wf_kernels.*"]),
    package_dir={"": "python", "wf_kernels": "wf_kernels"},
    # verification.json is written by the GPU check (bench/gpu_check.sh -> bench/record_verification.py) and is
    # absent until a device has been verified: wf_kernels.verification then reads {} (nothing verified)
    package_data={"wf_kernels": ["dispatch_table.json", "verification.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
