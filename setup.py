"""Builds the compiled extension mrrm._C.

CPU sources (csrc/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu) are compiled when torch
is a CUDA build and nvcc is found; MRRM_BUILD_CUDA=1 forces them (and fails loudly if impossible),
MRRM_BUILD_CUDA=0 skips them. TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper) when unset.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit root. nvcc on PATH may be a wrapper script; follow it to the real binary."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it executes
        m = re.search(rb"(/[^\s\"']+)/bin/nvcc", head)
        if m and os.path.exists(os.path.join(m.group(1).decode(), "bin", "nvcc")):
            return m.group(1).decode()
    root = os.path.dirname(os.path.dirname(nvcc))
    return root if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) else None


def _want_cuda(torch_is_cuda, cuda_home):
    flag = os.environ.get("MRRM_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    possible = torch_is_cuda and cuda_home is not None
    if flag in ("1", "true", "yes", "on"):
        if not possible:
            sys.exit(
                "MRRM_BUILD_CUDA=1 but the CUDA sources cannot be built: "
                f"torch CUDA build={torch_is_cuda}, CUDA toolkit found={cuda_home}"
            )
        return True
    return possible


def extensions():
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME once at import time.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _want_cuda(torch.version.cuda is not None, cuda_home)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # no -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20)
    cxx = ["-O3", "-g0"]
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    libs = ["gomp"] if sys.platform.startswith("linux") else []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # pip's CUDA wheels put the headers torch's CUDA headers include (cublas, cusparse) here.
        for sp in sys.path:
            inc = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        extra["cxx"] = cxx + ["-DMRRM_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-DMRRM_WITH_CUDA", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension("mrrm._C", sources, include_dirs=include_dirs,
                            extra_compile_args=extra, libraries=libs)
    else:
        ext = CppExtension("mrrm._C", sources, include_dirs=include_dirs,
                           extra_compile_args=extra, libraries=libs)
    print(f"[mrrm setup] building mrrm._C with CUDA={with_cuda} (CUDA_HOME={cuda_home})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
