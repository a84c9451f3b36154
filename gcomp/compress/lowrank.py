"""Low-rank compression math for PowerSGD (pure tensor code: no torch.distributed here).

A gradient of shape ``(n, ...)`` is viewed as an ``n x m`` matrix ``M`` (``m`` = product of the
other dimensions; a conv kernel groups its input channels and spatial taps). One PowerSGD step
with a shared ``m x r`` matrix ``Q`` is

    P = M Q            (all-reduced: linear in M, so the sum over ranks is (sum M) Q)
    P = orth(P)
    Q = M^T P          (all-reduced and averaged)
    M ~ P Q^T

Functions here work on *batches* of same-shape matrices ``(b, n, m)`` so that layers of equal
shape share one ``bmm`` instead of a Python loop.
"""
from __future__ import annotations

import math

import torch


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(n, m)`` of the matrix view of a gradient of ``shape`` (1-D tensors give ``(n, 1)``)."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), int(math.prod(shape[1:])) if len(shape) > 1 else 1


def effective_rank(n: int, m: int, rank: int) -> int:
    """A rank above ``min(n, m)`` adds nothing: the factors would already be exact."""
    return max(1, min(n, m, rank))


def should_compress(shape: tuple[int, ...], rank: int, min_compression_rate: float) -> bool:
    """Compress a layer only if its factors are ``min_compression_rate`` times smaller than it.

    Biases and norm weights (1-D) are never compressed: an ``n x 1`` matrix has no low-rank saving.
    """
    if len(shape) < 2:
        return False
    n, m = matrix_shape(shape)
    r = effective_rank(n, m, rank)
    return (n + m) * r * min_compression_rate < n * m


def orthogonalize_(matrices: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Orthonormalise the columns of each matrix of a ``(b, n, r)`` batch in place.

    Rank 1: divide by the norm plus ``epsilon`` (PyTorch's ``orthogonalization_epsilon``); a zero
    column stays zero instead of becoming NaN. Rank > 1: Householder QR. Gram-Schmidt is cheaper
    but loses orthogonality when P is rank-deficient (a gradient of a batch smaller than the rank,
    an unused layer), and then ``P P^T`` is no longer a projection; QR stays exact there and turns
    an all-zero matrix into orthonormal columns, never NaN. Both are deterministic: the same input
    gives the same bits on every rank.
    """
    if matrices.dim() != 3:
        raise ValueError(f"orthogonalize_ expects a (batch, n, r) tensor; got shape {tuple(matrices.shape)}")
    if matrices.shape[-1] == 1:
        norm = torch.linalg.vector_norm(matrices, dim=1, keepdim=True) + epsilon
        return matrices.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
    orthonormal, _ = torch.linalg.qr(matrices, mode="reduced")
    return matrices.copy_(orthonormal)
