"""Where each parameter's gradient lives inside a DDP bucket.

DDP hands a hook one flat buffer per bucket; compression works per parameter ("layer"). A
:class:`BucketLayout` records, once per distinct bucket, each layer's name, offset, size and shape,
so the communication thread can slice the buffer without touching the ``GradBucket`` object again.

State in gcomp is keyed by **layer name**, not by bucket index: DDP rebuilds its buckets after the
first step, and a model rebuilt from a checkpoint starts again from the initial buckets, so
bucket indices do not identify the same gradients over time. Names do.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class LayerSlot:
    """One parameter's gradient: ``buffer[offset : offset + numel].view(shape)``."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BucketLayout:
    """The layers of one bucket, in buffer order."""

    length: int
    dtype: torch.dtype
    layers: tuple[LayerSlot, ...]

    @classmethod
    def from_bucket(cls, bucket: dist.GradBucket, names: Mapping[int, str]) -> "BucketLayout":
        """Read the layout of ``bucket``. ``names`` maps ``id(parameter)`` to its name; parameters
        without a name get ``bucket<i>.param<j>`` (stable only while the bucket layout is)."""
        buffer = bucket.buffer()
        check_bucket_buffer(buffer)
        base = buffer.storage_offset()
        slots = []
        for position, (param, grad) in enumerate(zip(bucket.parameters(), bucket.gradients())):
            name = names.get(id(param), f"bucket{bucket.index()}.param{position}")
            slots.append(LayerSlot(name=name, offset=grad.storage_offset() - base, numel=grad.numel(), shape=tuple(grad.shape)))
        return cls(length=buffer.numel(), dtype=buffer.dtype, layers=tuple(slots))

    def fingerprint(self) -> int:
        """A hash of the layout that is equal on every rank iff the layouts are (names, shapes,
        offsets, dtype); used to detect ranks that disagree before they exchange data."""
        text = f"{self.length}|{self.dtype}|" + ";".join(f"{s.name}:{s.offset}:{s.shape}" for s in self.layers)
        return zlib.crc32(text.encode("utf-8"))

    def view(self, buffer: torch.Tensor, slot: LayerSlot) -> torch.Tensor:
        return buffer[slot.offset : slot.offset + slot.numel].view(slot.shape)


def check_bucket_buffer(buffer: torch.Tensor) -> None:
    """Refuse gradients gcomp cannot average correctly, before any collective is issued."""
    if buffer.is_sparse:
        raise TypeError("gcomp hooks need dense gradients; got a sparse gradient bucket (sparse embeddings are not supported)")
    if buffer.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"gcomp hooks support bucket dtypes {allowed}; got {buffer.dtype}")
