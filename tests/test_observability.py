"""What a user sees of gcomp besides gradients: profiler ranges, stats that tell "nothing ran"
from "no compression", and log records under the ``gcomp`` logger."""
import logging
import os
import subprocess
import sys

import gcomp
from gcomp.hooks.layout import ParameterNames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profiler_trace_holds_every_gcomp_range(tmp_path):
    trace = tmp_path / "trace.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "profile_trace.py"), "--trace", str(trace), "--steps", "4"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("gcomp.compress", "gcomp.collective", "gcomp.decompress", "gcomp.profile", "gcomp.decide"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert int(line.split()[-1]) > 0, line
    assert trace.stat().st_size > 0


def test_stats_before_any_step_say_so():
    stats = gcomp.PowerSGDState().stats()
    assert stats["steps"] == 0 and stats["compression_ratio"] is None


def test_positional_names_are_logged_under_the_gcomp_logger(caplog):
    import torch

    names = ParameterNames()
    with caplog.at_level(logging.WARNING, logger="gcomp"):
        assert names.name_of(torch.zeros(2), 3, 1) == "bucket3.param1"
    assert any(record.name.startswith("gcomp.") and "position" in record.getMessage() for record in caplog.records)
