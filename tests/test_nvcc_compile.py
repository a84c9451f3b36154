"""The raw CUDA kernels compile with plain nvcc for sm_80 and sm_90.

Nothing CUDA runs on CI machines, so this is the check that keeps the kernels building. Only files
free of torch headers are compiled (the torch glue needs a CUDA build of torch); they include the
same gcomp/sparse_format.h that the CPU kernels use.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
RAW_KERNEL_SOURCES = [CSRC / "sparse_kernels.cu", CSRC / "quantize_kernels.cu"]
ARCHITECTURES = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def test_raw_kernels_have_no_torch_headers():
    for source in RAW_KERNEL_SOURCES:
        text = source.read_text(encoding="utf-8")
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text


@pytest.mark.parametrize("source", RAW_KERNEL_SOURCES, ids=lambda path: path.name)
def test_raw_kernels_compile_with_nvcc(source: Path, tmp_path: Path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: cannot compile the CUDA kernels here")
    command = [
        nvcc,
        "-std=c++17",
        *ARCHITECTURES,
        "-I",
        str(CSRC / "include"),
        "-Xcompiler",
        "-Wall",
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
