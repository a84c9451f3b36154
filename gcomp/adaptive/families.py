"""What each compression family offers the controller: per-layer candidates, their bytes, their
errors on a measured tensor, and how to apply a choice to the hook state.

- :class:`RankFamily` (PowerSGD): candidate ranks around the uniform rank; error of the best
  rank-r approximation, ``sqrt(sum_{k>r} sigma_k^2)`` from one ``svdvals`` (Eckart-Young: a
  lower bound PowerSGD with warm start approaches); bytes ``(n + m) * r * element``.
- :class:`DensityFamily` (top-k): candidate densities on a geometric grid around the uniform
  density; exact error ``||x - topk_k(x)||`` for every k from one partial top-k of the squares and
  a cumulative sum;
  bytes = the packed message the hook would send for that k.
- :class:`BitsFamily` (quantization): bit widths from ``widths`` (1, 2, 4, 8); error
  ``||x - decode(encode(x))||`` of the hook's own codec with round-to-nearest (deterministic, so
  every rank measures the same function); bytes = the layer's packed message at that width.

Candidates are limited to settings under which the hook still compresses the layer (its
``min_compression_rate`` rule), so a decision never moves a layer between the compressed and the
dense path.
"""
from __future__ import annotations

import math
from typing import Mapping, Protocol, Sequence

import torch

from ..compress.lowrank import effective_rank, matrix_shape, should_compress
from .. import ops
from ..compress.quantize import quantized_message_bytes
from ..compress.sparse import sparse_message_layout
from ..hooks.powersgd import PowerSGDState
from ..hooks.quantize import QuantizeState
from ..hooks.topk import TopKState


class Family(Protocol):
    setting: str  # "rank", "density" or "bits": the name used in logs

    def uniform(self) -> float: ...

    def candidates(self, shape: tuple[int, ...]) -> list[float]: ...

    def size(self, shape: tuple[int, ...], setting: float) -> float: ...

    def errors(self, tensor: torch.Tensor, shape: tuple[int, ...], settings: Sequence[float]) -> torch.Tensor:
        """One float64 error per setting, on ``tensor``'s device (no host read)."""
        ...

    def apply(self, choices: Mapping[str, float]) -> None: ...


class RankFamily:
    """PowerSGD ranks in ``[floor(low * r0), ceil(high * r0)]``."""

    setting = "rank"

    def __init__(self, state: PowerSGDState, low: float = 0.5, high: float = 2.0) -> None:
        if not (0 < low <= 1 <= high):
            raise ValueError(f"candidate range must satisfy 0 < low <= 1 <= high; got low={low}, high={high}")
        self.state, self.low, self.high = state, low, high

    def uniform(self) -> float:
        return self.state.rank

    def candidates(self, shape: tuple[int, ...]) -> list[float]:
        n, m = matrix_shape(shape)
        r0 = self.state.rank
        ranks = set(range(max(1, math.floor(self.low * r0)), math.ceil(self.high * r0) + 1))
        usable = {effective_rank(n, m, r) for r in ranks if should_compress(shape, r, self.state.min_compression_rate)}
        usable.add(effective_rank(n, m, r0))
        return sorted(usable)

    def size(self, shape: tuple[int, ...], setting: float) -> float:
        n, m = matrix_shape(shape)
        return float((n + m) * int(setting) * 4)

    def errors(self, tensor: torch.Tensor, shape: tuple[int, ...], settings: Sequence[float]) -> torch.Tensor:
        n, m = matrix_shape(shape)
        singular = torch.linalg.svdvals(tensor.reshape(n, m).double())
        squares = singular.pow(2)
        # tail[r] = sum of squares beyond the first r singular values
        tail = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)])
        picks = torch.tensor([min(int(r), min(n, m)) for r in settings], dtype=torch.int64, device=tensor.device)
        return tail.index_select(0, picks).sqrt()

    def apply(self, choices: Mapping[str, float]) -> None:
        self.state.set_layer_ranks({name: int(rank) for name, rank in choices.items()})


class DensityFamily:
    """Top-k densities ``d0 * f`` for ``f`` in ``factors`` (capped at 1)."""

    setting = "density"

    def __init__(self, state: TopKState, factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> None:
        if not factors or any(f <= 0 for f in factors):
            raise ValueError(f"density factors must be a non-empty list of positive numbers; got {factors}")
        self.state, self.factors = state, tuple(sorted(set(factors) | {1.0}))

    def uniform(self) -> float:
        return self.state.density

    def _k(self, shape: tuple[int, ...], density: float) -> int:
        numel = math.prod(shape)
        return min(numel, max(1, round(density * numel)))

    def candidates(self, shape: tuple[int, ...]) -> list[float]:
        numel = math.prod(shape)
        out = []
        for factor in self.factors:
            density = min(1.0, self.state.density * factor)
            sparse_bytes = self.size(shape, density)
            if factor == 1.0 or sparse_bytes * self.state.min_compression_rate < numel * 4:
                out.append(density)
        return sorted(set(out))

    def size(self, shape: tuple[int, ...], setting: float) -> float:
        return float(sparse_message_layout([math.prod(shape)], [self._k(shape, setting)], self.state.value_dtype).message_bytes)

    def errors(self, tensor: torch.Tensor, shape: tuple[int, ...], settings: Sequence[float]) -> torch.Tensor:
        # Only the largest max(k) squares are needed: error(k)^2 = total - (sum of the k largest).
        # A partial top-k instead of a full sort (the candidates keep a few percent at most).
        squares = tensor.reshape(-1).double().pow(2)
        ks = [self._k(shape, density) for density in settings]
        largest = squares.topk(max(ks)).values  # descending
        prefix = torch.cat([squares.new_zeros(1), largest.cumsum(0)])  # prefix[j] = sum of the j largest
        picks = torch.tensor(ks, dtype=torch.int64, device=tensor.device)
        return (squares.sum() - prefix.index_select(0, picks)).clamp_min(0).sqrt()

    def apply(self, choices: Mapping[str, float]) -> None:
        self.state.set_layer_densities(dict(choices))


class BitsFamily:
    """Quantization bit widths: those of ``widths`` under which the hook still quantizes the layer,
    and always the uniform width. A wider code never has a larger error, so the solver trades
    bits where a layer's error is small for bits where it is large."""

    setting = "bits"

    def __init__(self, state: QuantizeState, widths: Sequence[int] = (1, 2, 4, 8)) -> None:
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w not in (1, 2, 4, 8) for w in widths):
            raise ValueError(f"bit widths must be a non-empty list drawn from 1, 2, 4, 8; got {widths}")
        self.state, self.widths = state, tuple(sorted(set(widths)))

    def uniform(self) -> float:
        return self.state.bits

    def candidates(self, shape: tuple[int, ...]) -> list[float]:
        numel = math.prod(shape)
        usable = {bits for bits in self.widths if self.size(shape, bits) * self.state.min_compression_rate < numel * 4}
        usable.add(self.state.bits)
        return sorted(usable)

    def size(self, shape: tuple[int, ...], setting: float) -> float:
        return float(quantized_message_bytes(math.prod(shape), int(setting), self.state.chunk))

    def errors(self, tensor: torch.Tensor, shape: tuple[int, ...], settings: Sequence[float]) -> torch.Tensor:
        values = tensor.reshape(-1)
        exact = values.double()
        single = values.to(torch.float32).contiguous()
        numel = single.numel()
        rows = []
        for bits in settings:
            message = ops.quantize_pack(single, [0], [numel], int(bits), self.state.chunk)
            decoded = torch.zeros_like(single)
            ops.quantize_unpack_add_(decoded, message, [0], [numel], int(bits), self.state.chunk)
            rows.append(torch.linalg.vector_norm(exact - decoded.double()).reshape(1))
        return torch.cat(rows)

    def apply(self, choices: Mapping[str, float]) -> None:
        self.state.set_layer_bits({name: int(bits) for name, bits in choices.items()})


def family_for(state: object, **options: object) -> Family:
    """The family matching a hook state (PowerSGD ranks, top-k densities or quantization bits)."""
    if isinstance(state, PowerSGDState):
        return RankFamily(state, **options)  # type: ignore[arg-type]
    if isinstance(state, TopKState):
        return DensityFamily(state, **options)  # type: ignore[arg-type]
    if isinstance(state, QuantizeState):
        return BitsFamily(state, **options)  # type: ignore[arg-type]
    raise TypeError(f"adaptive compression supports PowerSGD, top-k and quantize states; got {type(state).__name__}")
