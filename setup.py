"""Build gcomp and its optional native extension ``gcomp._C``.

The extension holds the sparse packing kernels (``csrc/``). It is optional: gcomp imports and
computes identical results without it (pure-torch twins in ``gcomp/ops.py``).

Environment switches:
  GCOMP_NATIVE=0      build no extension at all (pure-torch path only; the same switch turns
                      native code off at run time). GCOMP_NO_NATIVE=1 is still read, deprecated.
  GCOMP_SANITIZE=address  build the C++ code with AddressSanitizer (for memory-safety test runs;
                      run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
  GCOMP_WITH_CUDA=1   force a CUDAExtension (needs a CUDA toolkit and a CUDA build of torch);
                      by default CUDA is used when both are present, else a CppExtension.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
that is already installed instead of a freshly downloaded one.

Package metadata (name, version, dependencies, extras) lives in ``pyproject.toml``; this file only
adds the extension and ships the native sources inside the package (``gcomp/csrc/``), where
``gcomp._sources.csrc_dir()`` finds them for run-time (NVRTC) compilation.
"""
from __future__ import annotations

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _native_extensions() -> tuple[list, dict]:
    if os.environ.get("GCOMP_NATIVE", "1") == "0" or os.environ.get("GCOMP_NO_NATIVE", "0") == "1":
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


class BuildPyWithSources(build_py):
    """Copy ``csrc/`` (sources and headers) into the built package as ``gcomp/csrc/``.

    Editable installs skip the copy: there ``gcomp._sources`` reads the checkout's ``csrc/``.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        patterns = ("*.cu", "*.cpp", os.path.join("include", "**", "*.h"))
        for pattern in patterns:
            for source in sorted(glob.glob(os.path.join(HERE, "csrc", pattern), recursive=True)):
                relative = os.path.relpath(source, HERE)
                target = os.path.join(self.build_lib, "gcomp", relative)
                self.mkpath(os.path.dirname(target))
                self.copy_file(source, target)


ext_modules, cmdclass = _native_extensions()

# Everything else (name, version from gcomp/_version.py, dependencies, extras) is in pyproject.toml.
setup(
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPyWithSources},
)
