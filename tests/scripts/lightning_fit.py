"""Worker for tests/test_integrations.py: Lightning ``fit`` on 2 CPU processes with GcompCallback.

Run under ``torchrun --nproc-per-node 2``; rank 0 writes a JSON report to argv[1]. Two fits: the
first saves a checkpoint, the second resumes from it with a fresh callback, so the report shows the
gcomp state travelled through Lightning's checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from gcomp.integrations.lightning import CHECKPOINT_KEY, GcompCallback  # noqa: E402


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))

    def training_step(self, batch, batch_index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.flip(1)), batch_size=16)


def trainer(steps: int, callback: GcompCallback, root: str) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=steps,
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, logger=False,
        enable_checkpointing=False, default_root_dir=root,
    )


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    root = os.path.dirname(out_path)
    first = GcompCallback("powersgd", rank=2, warmup_steps=2, min_compression_rate=1.0)
    fit1 = trainer(6, first, root)
    fit1.fit(Regression(), loader())
    stats1 = fit1.strategy.gcomp_state.stats()
    checkpoint_path = os.path.join(root, "fit1.ckpt")
    fit1.save_checkpoint(checkpoint_path)
    saved = torch.load(checkpoint_path, weights_only=True)[CHECKPOINT_KEY]

    second = GcompCallback("powersgd", rank=2, warmup_steps=2, min_compression_rate=1.0)
    fit2 = trainer(10, second, root)
    fit2.fit(Regression(), loader(), ckpt_path=checkpoint_path)
    stats2 = second.state.stats()
    if fit2.global_rank == 0:
        report = {
            "first": {k: stats1[k] for k in ("steps", "compressed_steps", "bytes_sent", "bytes_uncompressed")},
            "second": {k: stats2[k] for k in ("steps", "compressed_steps", "bytes_sent", "bytes_uncompressed")},
            "layers": sorted(stats1["layers"]),
            "settings": sorted({layer["setting"] for layer in stats1["layers"].values()}),
            "checkpoint_world_size": saved["world_size"],
            "checkpoint_steps": [entry["step"] for entry in saved["ranks"]],
            "same_on_strategy": fit2.strategy.gcomp_state is second.state,
        }
        with open(out_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
