"""Elastic restart: a worker SIGKILLed mid-training under ``torchrun --max-restarts 1`` comes back
from the last checkpoint, and the job ends with the same loss as an uninterrupted run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--model", "tiny", "--steps", "24", "--method", "powersgd", "--rank", "2", "--warmup-steps", "3",
          "--batch-size", "8", "--eval-every", "0", "--log-every", "1", "--max-bytes", "300000", "--checkpoint-every", "4"]


def _torchrun(tmp_path, name: str, extra: list[str]) -> tuple[list[dict], str]:
    log = tmp_path / f"{name}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
               os.path.join(ROOT, "launch", "train.py"), *COMMON, "--checkpoint", str(tmp_path / f"{name}-ckpt"), "--resume",
               "--json", str(log), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()], done.stdout + done.stderr


def test_killed_worker_restarts_from_checkpoint(tmp_path):
    clean, _ = _torchrun(tmp_path, "clean", [])
    faulty, output = _torchrun(tmp_path, "faulty", ["--fault-kill-at", "10"])
    assert "killing itself (SIGKILL) before step 10" in output
    assert "resumed from" in output and "at step 8" in output  # the last checkpoint before the kill
    assert clean[-1]["step"] == faulty[-1]["step"] == 24
    assert faulty[-1]["loss"] == clean[-1]["loss"], (faulty[-1], clean[-1])
    assert faulty[-1]["bytes_sent"] == clean[-1]["bytes_sent"]
