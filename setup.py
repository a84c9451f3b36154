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
  GCOMP_CXX_STD=17|20 override the C++ standard chosen for the installed torch (see below).

The C++ standard follows the installed torch: its headers require C++20 from torch 2.14 on (and
say so with "#error C++20 or later compatible compiler is required"), while older ones are built
as C++17 as they always were. nvcc gets the same standard. The SIMD kernels need no -m flags: each
level is compiled with function target attributes and chosen at run time (GCOMP_SIMD).

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

# Oldest GCC / Clang whose -std=c++20 covers what torch's headers use (concepts, <span>, ...).
MIN_COMPILER_FOR_CXX20 = {"gcc": 10, "clang": 12}


def _torch_needs_cxx20(torch_module) -> bool:
    """True when the installed torch's headers refuse C++17.

    The version rule (>= 2.14) covers releases; the header probe also catches nightlies and local
    builds that moved before their version number did."""
    version = torch_module.__version__.split("+")[0].split(".")
    try:
        major, minor = int(version[0]), int(version[1])
    except (ValueError, IndexError):
        major, minor = 0, 0
    if (major, minor) >= (2, 14):
        return True
    from torch.utils import cpp_extension

    for include in cpp_extension.include_paths():
        for header in ("c10/util/C++17.h", "c10/macros/Macros.h"):
            path = os.path.join(include, header)
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    if "C++20 or later" in handle.read():
                        return True
    return False


def _compiler_version() -> tuple[str, int]:
    """(family, major version) of the C++ compiler the extension will be built with."""
    import subprocess

    compiler = os.environ.get("CXX", "c++")
    try:
        banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        major = subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", 0
    family = "clang" if "clang" in banner.lower() else "gcc"
    try:
        return family, int(major.strip().split(".")[0])
    except ValueError:
        return family, 0


def _cxx_standard(torch_module) -> str:
    """"17" or "20": the standard the installed torch's headers need, checked against the compiler."""
    forced = os.environ.get("GCOMP_CXX_STD")
    if forced:
        if forced not in ("17", "20"):
            raise RuntimeError(f"GCOMP_CXX_STD must be 17 or 20, not {forced!r}")
        return forced
    if not _torch_needs_cxx20(torch_module):
        return "17"
    family, major = _compiler_version()
    needed = MIN_COMPILER_FOR_CXX20.get(family)
    if needed is not None and 0 < major < needed:
        raise RuntimeError(
            f"torch {torch_module.__version__} needs C++20, which {family} {major} does not support well "
            f"enough: use {family} >= {needed} (set CXX), an older torch (< 2.14, built as C++17), or "
            "GCOMP_NATIVE=0 to skip the extension (gcomp then runs its pure-torch path)."
        )
    return "20"


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
    std = _cxx_standard(torch)
    # -ffp-contract=off: no fused multiply-adds, so every SIMD level and the pure-torch twin round
    # alike (the sums must be bitwise identical).
    cxx_flags = ["-O3", "-fopenmp", f"-std=c++{std}", "-ffp-contract=off"]
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
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", f"-std=c++{std}"]},
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
