"""Small models and deterministic data for the multi-process tests."""
from __future__ import annotations

import torch
from torch import nn


def make_mlp(seed: int = 0, width: int = 32, depth: int = 4, inputs: int = 16, outputs: int = 8) -> nn.Module:
    """An MLP with several equal-size layers (so small ``bucket_cap_mb`` gives many equal-size
    buckets: the case where mixed-up buckets would go unnoticed by shape checks)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def batch(rank: int, step: int, size: int = 16, inputs: int = 16, outputs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that differs per rank and per step (so averaging matters)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, inputs, generator=generator)
    y = torch.randn(size, outputs, generator=generator)
    return x, y


def train_steps(
    rank: int,
    method: str | None,
    options: dict,
    steps: int,
    bucket_cap_mb: float,
    model: nn.Module | None = None,
    lr: float = 0.05,
) -> dict:
    """Train ``make_mlp()`` under DDP with a gcomp method (``None``: DDP without a hook); return
    the averaged gradients of every step, the final parameters and the hook's stats."""
    from torch.nn.parallel import DistributedDataParallel

    import gcomp

    ddp = DistributedDataParallel(model if model is not None else make_mlp(), bucket_cap_mb=bucket_cap_mb)
    state = gcomp.register(ddp, method, **options) if method else None
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    gradients = []
    for step in range(steps):
        x, y = batch(rank, step)
        x, y = x.to(next(ddp.parameters()).dtype), y.to(next(ddp.parameters()).dtype)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        gradients.append(torch.cat([p.grad.flatten().float() for p in ddp.parameters()]))
        optimizer.step()
    result = {
        "gradients": gradients,
        "parameters": [p.detach().clone() for p in ddp.parameters()],
        "stats": state.stats() if state else None,
        "layouts": len(state._layouts) if state else 0,
    }
    if state:
        state.close()
    return result


def max_relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, expected))
