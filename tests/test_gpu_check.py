"""benchmarks/gpu_check.py is run unattended on GPU machines; on CPU machines it must say so and
exit 0 (so it can sit in any pipeline), and its JSON output must be written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run its checks")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA device" in result.stdout
    assert json.loads(out.read_text()) == {"cuda": False, "records": []}
