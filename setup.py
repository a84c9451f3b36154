"""Build gcomp and its optional native extension ``gcomp._C``.

The extension holds the sparse packing kernels (``csrc/``). It is optional: gcomp imports and
computes identical results without it (pure-torch twins in ``gcomp/ops.py``).

Environment switches:
  GCOMP_NO_NATIVE=1   build no extension at all (pure-torch path only)
  GCOMP_SANITIZE=address  build the C++ code with AddressSanitizer (for memory-safety test runs;
                      run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
  GCOMP_WITH_CUDA=1   force a CUDAExtension (needs a CUDA toolkit and a CUDA build of torch);
                      by default CUDA is used when both are present, else a CppExtension.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
that is already installed instead of a freshly downloaded one.
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _native_extensions() -> tuple[list, dict]:
    if os.environ.get("GCOMP_NO_NATIVE", "0") == "1":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: the pure-torch path still works
        return [], {}

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("GCOMP_WITH_CUDA")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda is not None:
        use_cuda = want_cuda == "1"

    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    sanitizer = os.environ.get("GCOMP_SANITIZE")
    if sanitizer:
        cxx_flags += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
        link_flags += [f"-fsanitize={sanitizer}"]
    if use_cuda:
        extension = cpp_extension.CUDAExtension(
            name="gcomp._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("GCOMP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    else:
        extension = cpp_extension.CppExtension(
            name="gcomp._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args=cxx_flags,
            extra_link_args=link_flags,
        )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()

setup(
    name="gcomp",
    version="0.1.0",
    description="Communication compression hooks for PyTorch DistributedDataParallel",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gcomp", "gcomp.*"]),
    python_requires=">=3.9",
    # torch is deliberately not an install requirement: an unpinned torch requirement makes pip
    # fetch a multi-GB CUDA build. Install the torch you want first (see README).
    install_requires=["numpy"],
    extras_require={"test": ["pytest", "hypothesis"], "plots": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
