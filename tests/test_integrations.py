"""Lightning and Accelerate recipes, run for real on 2 gloo CPU processes under torchrun.

Each recipe's worker script (tests/scripts/) trains a small model and rank 0 writes its gcomp
stats as JSON; the tests assert that the hook ran and compressed (``bytes_sent <
bytes_uncompressed``, ``steps > 0``) with state keyed by the model's real parameter names.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def torchrun(script: str, tmp_path, timeout: float = 150.0) -> dict:
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(SCRIPTS, script), str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0 and out.exists(), f"{script} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
    return json.loads(out.read_text())


def test_lightning_callback_compresses_on_cpu_and_checkpoints(tmp_path):
    report = torchrun("lightning_fit.py", tmp_path)
    first, second = report["first"], report["second"]
    assert first["steps"] == 6 and first["compressed_steps"] == 4
    assert 0 < first["bytes_sent"] < first["bytes_uncompressed"]
    assert report["layers"] == ["body.0.bias", "body.0.weight", "body.2.bias", "body.2.weight"]  # real names
    assert "rank=2" in report["settings"]
    # The checkpoint held both ranks' states; the second fit resumed from step 6 and ran to 10.
    assert report["checkpoint_world_size"] == 2 and report["checkpoint_steps"] == [6, 6]
    assert second["steps"] == 10 and second["compressed_steps"] == 8
    assert second["bytes_sent"] > first["bytes_sent"] and second["bytes_sent"] < second["bytes_uncompressed"]
    assert report["same_on_strategy"]


def test_accelerate_register_compresses_on_cpu(tmp_path):
    report = torchrun("accelerate_train.py", tmp_path)
    assert report["num_processes"] == 2 and "MULTI_CPU" in report["distributed_type"]
    assert report["steps"] > 0 and report["compressed_steps"] > 0
    assert 0 < report["bytes_sent"] < report["bytes_uncompressed"]
    assert report["layers"] == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_import_gcomp_imports_no_framework():
    # Measured against plain "import torch", which itself imports tqdm when it is installed.
    code = ("import sys, torch; before = set(sys.modules); import gcomp, gcomp.integrations, gcomp.observe; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'accelerate', 'tensorboard', 'tqdm') "
            "if m in sys.modules and m not in before))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize("module, blocked, extra", [
    ("gcomp.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"), "gcomp[lightning]"),
    ("gcomp.integrations.accelerate", ("accelerate",), "gcomp[accelerate]"),
])
def test_missing_framework_names_the_extra(monkeypatch, module, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # makes "import name" raise ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_lightning_callback_forwards_loss_scale_and_skips_single_process():
    from gcomp.integrations.lightning import GcompCallback

    class Scaler:
        def is_enabled(self):
            return True

        def get_scale(self):
            return 1024.0

    class State:
        scale = None

        def set_gradient_scale(self, value):
            self.scale = value

    callback = GcompCallback("powersgd", rank=2)
    callback.state = State()
    trainer = types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=Scaler()))
    callback.on_before_backward(trainer, None, torch.tensor(1.0))
    assert callback.state.scale == 1024.0

    single = GcompCallback("topk", density=0.1)
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=torch.nn.Linear(2, 2)), world_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single.on_fit_start(trainer, None)
    assert single.state is None and any("single-process" in str(w.message) for w in caught)
    trainer.world_size = 2
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        single.on_fit_start(trainer, None)
