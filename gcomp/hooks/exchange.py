"""How the compressed layers of a bucket travel between ranks: the exchange strategies of
:class:`~gcomp.hooks.message.MessageState`.

The protocol around them (feedback rule, dense leftovers, health flag, staged state) is written
once in ``message.py``; a strategy only decides what crosses the wire for the compressed layers,
in two steps:

1. :meth:`MessageExchange.outgoing`, before the step's allreduce ("collective 1"): this rank's
   decoded message ``own`` (what the feedback rule counts as sent) and, optionally, values that
   ride inside collective 1 to be summed with the dense leftovers;
2. :meth:`MessageExchange.mean`, after collective 1 proved the step finite: the average of every
   rank's decoded message, ``mean``, bitwise identical on every rank.

Two strategies:

- :class:`AllgatherExchange` (``"allgather"``): every rank packs its own message (its own top-k
  support, its own quantization scales) and one allgather hands every rank all ``W`` messages.
  Each rank receives ``(W - 1)`` messages: its bytes grow linearly with the world size.
- :class:`SharedIndicesExchange` (``"shared_indices"``, ScaleCom: Chen et al., NeurIPS 2020): a
  leader, ``step mod W`` (the same on every rank, cyclic so that every rank's gradient steers the
  selection in turn), picks the top-k indices of its own message input and broadcasts them in the
  compact index format of the sparse message (bit-packed or bitmap, :mod:`gcomp.compress.sparse`).
  Every rank then sends its own values at those indices, and the values are *summed*: they share
  one support, so one allreduce replaces the allgather, and its size does not grow with ``W``.
  The broadcast has to come first (the values to sum depend on the indices); the values then ride
  in collective 1 itself when they have the bucket's dtype, so a bucket still costs two
  collectives, a broadcast and an allreduce. With a narrower ``value_dtype`` they go in a second
  allreduce of their own (in that dtype, divided by ``W`` before the sum when it is a 16-bit
  dtype, as DDP does for half precision), after collective 1 proved the step finite.

  In the feedback rules' terms (:mod:`gcomp.feedback`): ``own`` is this rank's message input
  masked to the shared indices (its values rounded to ``value_dtype``), ``mean`` the allreduced
  mean at those indices. Both are all a rule needs: EF14's residual ``sent - own`` keeps what was
  not selected; EF21/EF21-SGDM/EControl add ``own`` to the local estimate and ``mean`` to the
  replicated one, which stays identical on every rank because an allreduce hands every rank
  bitwise the same sum.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol, Sequence

import torch

from ..comm.cost import Collective
from ..metrics import TrafficStats

if TYPE_CHECKING:
    from .message import MessageLayer, MessageState

EXCHANGE_NAMES: tuple[str, ...] = ("allgather", "shared_indices")


@dataclass(frozen=True)
class CompressedLayers:
    """The compressed layers of one bucket, laid end to end in one flat vector ``sent``: layer
    ``l`` is ``sent[offsets[l] : offsets[l] + numels[l]]``; ``settings`` are the codec's."""

    layers: tuple["MessageLayer", ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    settings: tuple[Any, ...]
    numel: int

    @classmethod
    def of(cls, layers: Sequence["MessageLayer"]) -> "CompressedLayers":
        offsets, position = [], 0
        for layer in layers:
            offsets.append(position)
            position += layer.slot.numel
        return cls(
            tuple(layers), tuple(offsets), tuple(layer.slot.numel for layer in layers), tuple(layer.setting for layer in layers), position
        )


@dataclass
class Outgoing:
    """One bucket's exchange between its two steps."""

    own: torch.Tensor  # this rank's decoded message (flat, the codec's decode dtype)
    summed: Optional[torch.Tensor]  # values summed inside collective 1 (bucket dtype), or None
    held: Any  # what the strategy keeps for :meth:`MessageExchange.mean`


@dataclass(frozen=True)
class LayerWire:
    """One compressed layer's bytes on the wire, for the cost model."""

    message_bytes: int  # its packed message (values and indices, padded)
    value_bytes: int  # its k values in the value dtype, unpadded
    index_bytes: int  # its index section (padded), as the shared-indices broadcast carries it


class IndexCodec(Protocol):
    """What a codec offers to be exchanged with shared indices (top-k does)."""

    value_dtype: torch.dtype

    def pack_indices(self, sent: torch.Tensor, batch: CompressedLayers) -> torch.Tensor:
        """The uint8 index message of this rank's selection from ``sent`` (the leader's)."""

    def index_bytes(self, numel: int, setting: Any) -> int:
        """Bytes of one layer's part of the index message."""

    def value_bytes(self, numel: int, setting: Any) -> int:
        """Bytes of one layer's selected values in ``value_dtype``."""

    def unpack_indices(self, message: torch.Tensor, batch: CompressedLayers) -> torch.Tensor:
        """Absolute int64 positions in ``sent`` selected by an index message."""


class MessageExchange(ABC):
    """How the compressed layers' messages travel (see the module docstring)."""

    name: ClassVar[str]

    def check_codec(self, state: "MessageState") -> None:
        """Raise if ``state``'s codec cannot be exchanged this way."""

    @abstractmethod
    def outgoing(self, state: "MessageState", sent: torch.Tensor, batch: CompressedLayers, step: int,
                 bucket_dtype: torch.dtype) -> Outgoing:
        """Before collective 1: this rank's decoded message and values to sum inside collective 1."""

    @abstractmethod
    def mean(self, state: "MessageState", outgoing: Outgoing, summed_mean: Optional[torch.Tensor], sent: torch.Tensor,
             batch: CompressedLayers) -> Optional[torch.Tensor]:
        """After a finite collective 1 (``summed_mean``: the mean of :attr:`Outgoing.summed`): the
        average of every rank's decoded message, or None when it is not finite (the step is then
        skipped on every rank; every rank sees the same sums, so every rank decides alike)."""

    @abstractmethod
    def record_layers(self, state: "MessageState", batch: CompressedLayers, step: int, element_size: int) -> None:
        """Add each compressed layer's bytes of this step to the per-layer traffic report."""

    @abstractmethod
    def bucket_collectives(self, exact_bytes: int, layers: Sequence[LayerWire], values_in_allreduce: bool) -> list[Collective]:
        """The collectives one compressed bucket issues, in order (the cost model's input):
        ``exact_bytes`` is collective 1's payload without the values (dense leftovers and health
        flag); ``values_in_allreduce``: the value dtype is the bucket's."""


class AllgatherExchange(MessageExchange):
    """Every rank's own message, gathered by all: exact for any codec, ``(W - 1)`` messages received."""

    name = "allgather"

    def outgoing(self, state, sent, batch, step, bucket_dtype):
        packed = state.pack(sent, batch.offsets, batch.numels, batch.settings, batch.layers, step)
        own = torch.zeros_like(sent, dtype=state.decode_dtype or sent.dtype)
        state.unpack_add_(own, packed, batch.offsets, batch.numels, batch.settings, 1.0)
        return Outgoing(own=own, summed=None, held=packed)

    def mean(self, state, outgoing, summed_mean, sent, batch):
        gathered = state.codec_transport.allgather(outgoing.held, state.traffic)
        with TrafficStats.timed(state.traffic, "decompress"):
            mean = torch.zeros_like(outgoing.own)
            # Decoded in rank order: bitwise the same sum on every rank.
            state.unpack_add_(mean, gathered, batch.offsets, batch.numels, batch.settings, 1.0 / state.codec_transport.world_size)
        return mean

    def record_layers(self, state, batch, step, element_size):
        for layer in batch.layers:
            state.traffic.record_layer(layer.slot.name, layer.slot.shape, layer.label, layer.message_bytes, layer.slot.numel * element_size)

    def bucket_collectives(self, exact_bytes, layers, values_in_allreduce):
        return [Collective("allreduce", exact_bytes), Collective("allgather", sum(layer.message_bytes for layer in layers))]


class SharedIndicesExchange(MessageExchange):
    """A cyclic leader's indices, everybody's values summed: bytes per rank independent of ``W``."""

    name = "shared_indices"

    def check_codec(self, state):
        if not all(callable(getattr(state, name, None)) for name in ("pack_indices", "index_bytes", "value_bytes", "unpack_indices")):
            raise ValueError(f"exchange {self.name!r} needs a codec that selects indices (top-k); {type(state).__name__} has none")

    @staticmethod
    def leader(step: int, world: int) -> int:
        """The rank whose indices everyone uses at sync step ``step``."""
        return step % world

    def outgoing(self, state, sent, batch, step, bucket_dtype):
        transport = state.codec_transport
        leader = self.leader(step, transport.world_size)
        if transport.rank == leader:
            index_message = state.pack_indices(sent, batch)
        else:
            size = sum(state.index_bytes(numel, setting) for numel, setting in zip(batch.numels, batch.settings))
            index_message = sent.new_zeros(size, dtype=torch.uint8)
        transport.broadcast_(index_message, leader, state.traffic)
        indices = state.unpack_indices(index_message, batch)
        values = sent.index_select(0, indices)
        if values.dtype == torch.float64 and state.value_dtype != torch.float64:
            values = values.to(torch.float32)  # as the sparse message format rounds float64 input
        values = values.to(state.value_dtype)
        own = torch.zeros_like(sent, dtype=state.decode_dtype or sent.dtype)
        own.index_copy_(0, indices, values.to(own.dtype))
        summed = values if state.value_dtype == bucket_dtype else None
        return Outgoing(own=own, summed=summed, held=(indices, values))

    def mean(self, state, outgoing, summed_mean, sent, batch):
        indices, values = outgoing.held
        world = state.codec_transport.world_size
        if summed_mean is None:
            # The values in a dtype of their own: a second allreduce, in that dtype.
            half = values.dtype in (torch.float16, torch.bfloat16)
            total = values / world if half else values.clone()
            state.codec_transport.allreduce_sum_(total, state.traffic)
            if not state.worker.runtime.all_finite(total):
                return None
            summed_mean = total if half else total.div_(world)
        mean = torch.zeros_like(outgoing.own)
        mean.index_copy_(0, indices, summed_mean.to(mean.dtype))
        return mean

    def record_layers(self, state, batch, step, element_size):
        transport = state.codec_transport
        is_leader = transport.rank == self.leader(step, transport.world_size)
        for layer in batch.layers:
            sent = state.value_bytes(layer.slot.numel, layer.setting) + (state.index_bytes(layer.slot.numel, layer.setting) if is_leader else 0)
            state.traffic.record_layer(layer.slot.name, layer.slot.shape, layer.label, sent, layer.slot.numel * element_size)

    def bucket_collectives(self, exact_bytes, layers, values_in_allreduce):
        values = sum(layer.value_bytes for layer in layers)
        collectives = [Collective("broadcast", sum(layer.index_bytes for layer in layers))]
        if values_in_allreduce:
            return collectives + [Collective("allreduce", exact_bytes + values)]
        return collectives + [Collective("allreduce", exact_bytes), Collective("allreduce", values)]


def make_exchange(name: Any) -> MessageExchange:
    """The strategy called ``name`` (one of :data:`EXCHANGE_NAMES`)."""
    if not isinstance(name, str):
        raise TypeError(f"exchange must be a string, one of {list(EXCHANGE_NAMES)}; got {name!r}")
    if name == AllgatherExchange.name:
        return AllgatherExchange()
    if name == SharedIndicesExchange.name:
        return SharedIndicesExchange()
    raise ValueError(f"unknown exchange {name!r}; choose one of {list(EXCHANGE_NAMES)}")
