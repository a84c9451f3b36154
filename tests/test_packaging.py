"""Packaging: one version source, metadata in pyproject.toml, native sources shipped in the package."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import gcomp
from gcomp._sources import csrc_dir, csrc_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def test_version_has_one_source_and_python_m_gcomp_prints_it():
    version = re.search(r'__version__ = "([^"]+)"', read("gcomp/_version.py")).group(1)
    assert gcomp.__version__ == version
    assert "version=" not in read("setup.py") and '__version__ = "' not in read("gcomp/__init__.py")
    completed = subprocess.run([sys.executable, "-m", "gcomp", "--version"], capture_output=True, text=True, timeout=120, check=True)
    assert completed.stdout.strip() == f"gcomp {version}"


def test_pyproject_metadata():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import pytest

        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    meta = project["project"]
    assert meta["name"] == "gcomp" and "version" in meta["dynamic"]
    assert meta["dependencies"] == ["numpy"]  # torch deliberately absent (see pyproject.toml)
    assert meta["license"] == "BSD-3-Clause" and os.path.exists(os.path.join(ROOT, "LICENSE"))
    assert {"lightning", "accelerate", "tensorboard", "cuda", "test"} <= set(meta["optional-dependencies"])
    assert "ninja" in project["build-system"]["requires"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gcomp._version.__version__"}


def test_native_sources_are_found_and_copied_into_the_package(tmp_path):
    assert csrc_file("sparse_kernels.cu").is_file() and (csrc_dir() / "include" / "gcomp").is_dir()
    # What a wheel gets: build_py copies csrc/ to gcomp/csrc/ next to py.typed (no compiler involved).
    environment = {**os.environ, "GCOMP_NATIVE": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT, env=environment,
                   check=True, capture_output=True, timeout=120)
    package = tmp_path / "gcomp"
    assert (package / "py.typed").exists() and (package / "_version.py").exists()
    assert (package / "csrc" / "sparse_kernels.cu").exists()
    assert sorted(p.name for p in (package / "csrc" / "include" / "gcomp").glob("*.h")) == sorted(
        p.name for p in (csrc_dir() / "include" / "gcomp").glob("*.h"))
