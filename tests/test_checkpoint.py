"""Save every rank's state, rebuild DDP from scratch, load, continue: identical to no interruption."""
import os

import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from models import batch, make_mlp

TOTAL, SPLIT = 14, 7
OPTIONS = {"rank": 2, "warmup_steps": 3}


def _build(bucket_cap_mb: float):
    ddp = DistributedDataParallel(make_mlp(depth=5), bucket_cap_mb=bucket_cap_mb)
    state = gcomp.register(ddp, "powersgd", **OPTIONS)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return ddp, state, optimizer


def _train(ddp, optimizer, rank: int, steps: range) -> list[torch.Tensor]:
    losses = []
    for step in steps:
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _checkpoint_run(rank: int, world_size: int, directory: str, bucket_cap_mb: float) -> dict:
    ddp, state, optimizer = _build(bucket_cap_mb)
    _train(ddp, optimizer, rank, range(TOTAL))
    uninterrupted = [p.detach().clone() for p in ddp.parameters()]
    state.close()

    ddp, state, optimizer = _build(bucket_cap_mb)
    _train(ddp, optimizer, rank, range(SPLIT))
    path = os.path.join(directory, f"rank{rank}.pt")
    torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
    state.close()
    del ddp, state, optimizer

    checkpoint = torch.load(path, weights_only=True)
    ddp = DistributedDataParallel(make_mlp(depth=5, seed=123), bucket_cap_mb=bucket_cap_mb)
    ddp.module.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    optimizer.load_state_dict(checkpoint["optimizer"])
    state = gcomp.PowerSGDState(**OPTIONS)
    state.load_state_dict(checkpoint["gcomp"])
    state.attach(ddp)
    ddp.register_comm_hook(state, gcomp.powersgd_hook)
    _train(ddp, optimizer, rank, range(SPLIT, TOTAL))
    resumed = [p.detach().clone() for p in ddp.parameters()]
    stats = state.stats()
    state.close()
    return {
        "equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
        "difference": max(float((a - b).abs().max()) for a, b in zip(uninterrupted, resumed)),
        "steps": stats["steps"],
        "layers_with_residual": int(sum("error" in t for t in checkpoint["gcomp"]["layers"].values())),
    }


def test_resume_is_identical(tmp_path):
    for bucket_cap_mb in (25.0, 0.004):
        for result in run_ranks(_checkpoint_run, 2, str(tmp_path), bucket_cap_mb):
            assert result["layers_with_residual"] >= 4
            assert result["steps"] == TOTAL
            assert result["equal"], (bucket_cap_mb, result["difference"])
