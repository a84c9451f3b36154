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
