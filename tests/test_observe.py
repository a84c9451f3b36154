"""gcomp.observe: TensorBoard / JSON-lines scalars from a state, and the progress-bar switch."""
from __future__ import annotations

import json
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from distributed import run_ranks
from gcomp.observe import JsonLinesLogger, TensorBoardLogger, progress, scalars


class FakeState:
    """stats() and controller.history shaped like gcomp's, including the "seconds" dict."""

    def __init__(self) -> None:
        self.sent = 0
        self.steps = 0
        self.controller = type("Controller", (), {"history": []})()

    def stats(self) -> dict:
        return {
            "steps": self.steps, "compressed_steps": self.steps, "skipped_steps": 0, "bytes_sent": self.sent,
            "bytes_received": self.sent, "bytes_uncompressed": 10 * self.sent, "compression_ratio": 10.0, "method": "powersgd",
            "seconds": {"compress": 0.5, "collective": 1.5, "decompress": 0.25},
            "layers": {"fc.weight": {"setting": "rank=4"}, "fc.bias": {"setting": "dense"}, "emb.weight": {"setting": "density=0.01"}},
        }


class RecordingWriter:
    def __init__(self) -> None:
        self.points: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.points.append((tag, value, step))

    def flush(self):
        pass


def test_scalars_cover_totals_time_layers_and_adaptive_decisions(tmp_path):
    state = FakeState()
    values = scalars(state.stats())
    assert values["gcomp/compression_ratio"] == 10.0 and values["gcomp_time/collective"] == 1.5
    assert values["gcomp_layers/rank/fc.weight"] == 4.0 and values["gcomp_layers/density/emb.weight"] == 0.01
    assert not any("fc.bias" in tag for tag in values)  # "dense" is not numeric
    assert "gcomp_time" not in json.dumps(scalars({"steps": 1}))  # stats without "seconds" work too

    writer = RecordingWriter()
    logger = TensorBoardLogger(state, writer)
    lines = JsonLinesLogger(state, tmp_path / "gcomp.jsonl")
    for step in (10, 20):
        state.steps, state.sent = step, 100 * step
        if step == 20:
            state.controller.history.append({"step": 15, "predicted_bytes": 1e3, "uniform_bytes": 2e3, "used_fallback": False,
                                             "measured_bytes_per_step_since_last": None, "choices": {"fc.weight": 2}})
        logger.log(step)
        lines.log(step)
    tags = {(tag, step): value for tag, value, step in writer.points}
    assert tags[("gcomp/bytes_sent_per_step", 20)] == 100.0  # (2000 - 1000) bytes / 10 steps
    assert tags[("gcomp_adaptive/predicted_bytes", 15)] == 1e3 and tags[("gcomp_adaptive/used_fallback", 15)] == 0.0
    assert ("gcomp_adaptive/measured_bytes_per_step_since_last", 15) not in tags  # None is skipped
    assert sum(tag.startswith("gcomp_adaptive/") for tag, _, _ in writer.points) == 3  # each decision once
    records = [json.loads(line) for line in (tmp_path / "gcomp.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20] and records[1]["decisions"][0]["step"] == 15


def test_progress_is_plain_iteration_without_a_terminal():
    bar = progress(range(3), total=3, enabled=True)  # pytest captures stderr: not a TTY
    assert not hasattr(bar, "set_postfix_str") and list(bar) == [0, 1, 2]


def _tensorboard_run(rank: int, world: int, log_dir: str) -> list:
    import gcomp

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)))
    state = gcomp.register(model, "powersgd", rank=2, warmup_steps=1, min_compression_rate=1.0)
    logger = TensorBoardLogger(state, log_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 5):
        optimizer.zero_grad()
        x = torch.randn(8, 32)
        model(x).square().mean().backward()
        optimizer.step()
        logger.log(step)
    logger.close()
    state.close()
    return sorted(os.listdir(log_dir))


def test_tensorboard_event_file_from_a_real_two_rank_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = str(tmp_path / "tb")
    os.makedirs(log_dir)
    files = run_ranks(_tensorboard_run, 2, log_dir, timeout=90)
    assert len(files[0]) == 1 and files[0][0].startswith("events.out.tfevents")  # rank 0 only wrote
    events = EventAccumulator(log_dir)
    events.Reload()
    ratio = events.Scalars("gcomp/compression_ratio")
    assert [e.step for e in ratio] == [1, 2, 3, 4] and ratio[-1].value > 1.0
    sent, dense = events.Scalars("gcomp/bytes_sent")[-1].value, events.Scalars("gcomp/bytes_uncompressed")[-1].value
    assert 0 < sent < dense
    assert events.Scalars("gcomp_layers/rank/0.weight")[-1].value == 2.0


def test_train_py_writes_tensorboard_scalars(tmp_path):
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log_dir = tmp_path / "tb"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               os.path.join(root, "launch", "train.py"), "--model", "tiny", "--steps", "8", "--method", "powersgd", "--rank", "2",
               "--warmup-steps", "2", "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--log-every", "2",
               "--max-bytes", "100000", "--tensorboard", str(log_dir), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/validation_loss", "gcomp/bytes_sent", "gcomp/compression_ratio"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert events.Scalars("gcomp/bytes_sent")[-1].value < events.Scalars("gcomp/bytes_uncompressed")[-1].value
    assert any(tag.startswith("gcomp_layers/rank/") for tag in tags)
