"""Where gcomp's native sources (``csrc/``) are at run time.

The CUDA kernels can be compiled at run time (CuPy/NVRTC) instead of at build time, so the
sources must be findable from an installed gcomp, not only from a source checkout:

- a wheel or a regular install carries them inside the package, as ``gcomp/csrc/*.cu``,
  ``gcomp/csrc/*.cpp`` and ``gcomp/csrc/include/gcomp/*.h`` (``setup.py``'s ``build_py`` copies
  them there);
- an editable install or a checkout on ``sys.path`` uses the repository's ``csrc/`` beside the
  ``gcomp/`` folder.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def csrc_dir() -> Path:
    """The folder holding ``sparse_kernels.cu`` etc.; its ``include/`` subfolder is the include path.

    Raises ``FileNotFoundError`` when neither location exists (a build that shipped no sources).
    """
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gcomp's native sources were not found in {_PACKAGE_DIR / 'csrc'} or {_PACKAGE_DIR.parent / 'csrc'}")


def csrc_file(name: str) -> Path:
    """``csrc_dir() / name``, checked to exist (e.g. ``csrc_file("sparse_kernels.cu")``)."""
    path = csrc_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"gcomp native source {name!r} not found in {path.parent}")
    return path
