"""Worker for tests/test_integrations.py: an Accelerate training loop on 2 CPU processes with gcomp.

Run under ``torchrun --nproc-per-node 2``; rank 0 writes a JSON report to argv[1].
"""
from __future__ import annotations

import gc
import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from accelerate import Accelerator  # noqa: E402

from gcomp.integrations.accelerate import register  # noqa: E402


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(256, 64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.flip(1)), batch_size=16)
    prepared, optimizer, data = accelerator.prepare(model, optimizer, data)
    state = register(accelerator, prepared, "topk", density=0.05, warmup_steps=2)
    for x, y in data:
        optimizer.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(prepared(x), y))
        optimizer.step()
    stats = state.stats()
    state.close()
    if accelerator.is_main_process:
        report = {k: stats[k] for k in ("steps", "compressed_steps", "bytes_sent", "bytes_uncompressed")}
        report["layers"] = sorted(stats["layers"])
        report["distributed_type"] = str(accelerator.distributed_type)
        report["num_processes"] = accelerator.num_processes
        with open(out_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    del prepared, optimizer
    gc.collect()


if __name__ == "__main__":
    main(sys.argv[1])
