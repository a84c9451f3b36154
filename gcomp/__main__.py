"""``python -m gcomp``: the installed version and what this build can use.

``python -m gcomp --version`` prints the version; ``python -m gcomp info`` (the default) prints
what a bug report needs: gcomp, Python, torch and its CUDA, whether the native extension
``gcomp._C`` loaded, the optional integrations that import, and the native sources' folder.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Optional

from ._version import __version__

_OPTIONAL = ("lightning", "accelerate", "tensorboard", "tqdm", "cupy")


def _module_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable here"
        return f"not available ({type(error).__name__})"
    return str(getattr(module, "__version__", "installed"))


def info() -> dict[str, str]:
    """The facts ``python -m gcomp info`` prints, as a dict (also handy in tests and bug reports)."""
    out = {"gcomp": __version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
    except ImportError:
        out["torch"] = "not installed (gcomp needs it: install torch first)"
        return out
    out["torch"] = torch.__version__
    out["torch cuda"] = str(torch.version.cuda)
    out["cuda available"] = str(torch.cuda.is_available())
    from . import ops

    native = getattr(ops, "native_available", None)
    out["native extension"] = ("gcomp._C loaded" if native() else "not loaded (pure-torch path)") if native else "unknown"
    for name in ("simd_level", "SIMD_LEVEL"):  # exposed by newer gcomp.ops builds
        value = getattr(ops, name, None)
        if value is not None:
            out["simd"] = str(value() if callable(value) else value)
            break
    from ._sources import csrc_dir

    try:
        out["native sources"] = str(csrc_dir())
    except FileNotFoundError:
        out["native sources"] = "not shipped"
    for name in _OPTIONAL:
        out[name] = _module_version(name)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcomp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gcomp {__version__}")
    parser.add_argument("command", nargs="?", default="info", choices=("info",), help="info: versions and build facts")
    parser.parse_args(argv)
    facts = info()
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
