"""Where each parameter's gradient lives inside a DDP bucket, and what the parameter is called.

DDP hands a hook one flat buffer per bucket; compression works per parameter ("layer"). A
:class:`BucketLayout` records, once per distinct bucket, each layer's name, offset, size and shape,
so the communication thread can slice the buffer without touching the ``GradBucket`` object again.

State in gcomp is keyed by **layer name**, never by bucket index or position: DDP rebuilds its
buckets after the first step (so a bucket position then holds another parameter, often of the same
shape), and a model rebuilt from a checkpoint starts again from the initial buckets.
:class:`ParameterNames` gives every parameter one name for its whole life:

1. the module-qualified name (``blocks.0.attn.weight``), from :meth:`ParameterNames.learn` (called
   by ``gcomp.register`` and ``state.attach``) or, when the hook was registered the PyTorch way
   (``ddp.register_comm_hook(state, hook)``, as Lightning and other frameworks do), from the DDP
   module that holds this state among its comm hooks, found once at the first hook call;
2. only if no such module can be found: the parameter's position when first seen,
   ``bucket<i>.param<j>`` of DDP's *initial* buckets, remembered by parameter identity so it follows
   the parameter through later rebuilds (stable across runs as long as the model, its parameter
   order and ``bucket_cap_mb`` are).

Views are taken with ``narrow`` (plain slicing is not supported on every device type that gcomp's
tests use to prove device placement).
"""
from __future__ import annotations

import functools
import gc
import logging
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class LayerSlot:
    """One parameter's gradient: ``buffer[offset : offset + numel].view(shape)``."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]

    def flat(self, buffer: torch.Tensor) -> torch.Tensor:
        """This layer's entries of a flat bucket-shaped tensor (a view)."""
        return buffer.narrow(0, self.offset, self.numel)


@dataclass(frozen=True)
class BucketLayout:
    """The layers of one bucket, in buffer order."""

    length: int
    dtype: torch.dtype
    layers: tuple[LayerSlot, ...]

    @classmethod
    def from_bucket(cls, bucket: dist.GradBucket, names: "ParameterNames") -> "BucketLayout":
        buffer = bucket.buffer()
        check_bucket_buffer(buffer)
        base = buffer.storage_offset()
        slots = []
        for position, (param, grad) in enumerate(zip(bucket.parameters(), bucket.gradients())):
            name = names.name_of(param, bucket.index(), position)
            slots.append(LayerSlot(name=name, offset=grad.storage_offset() - base, numel=grad.numel(), shape=tuple(grad.shape)))
        return cls(length=buffer.numel(), dtype=buffer.dtype, layers=tuple(slots))

    @functools.cached_property
    def fingerprint(self) -> int:
        """A hash of the layout that is equal on every rank iff the layouts are (names, shapes,
        offsets, dtype); used to detect ranks that disagree before they exchange data, and as the
        key of per-layout plans. Computed once per layout: it is read for every bucket of every step."""
        return zlib.crc32(self.describe().encode("utf-8"))

    def describe(self) -> str:
        return f"{self.length}|{self.dtype}|" + ";".join(f"{s.name}:{s.offset}:{s.shape}" for s in self.layers)


class ParameterNames:
    """Parameter identity -> stable layer name (see the module docstring)."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self.source = "none"  # "module" once names come from a module, "positions" for the fallback
        self._known_from_module: tuple[str, ...] = ()

    def learn(self, module: torch.nn.Module) -> None:
        """Name parameters after ``module`` (the DDP model or the module it wraps)."""
        target = module.module if isinstance(getattr(module, "module", None), torch.nn.Module) else module
        named = list(target.named_parameters())
        self._names = {id(param): name for name, param in named}
        self._known_from_module = tuple(name for name, _ in named)
        self.source = "module"

    def discover(self, state: object) -> bool:
        """Find the DDP model whose comm hook state is ``state`` and learn its names. Runs once, at
        the first hook call, when the state was registered without ``attach``."""
        from torch.nn.parallel import DistributedDataParallel

        for candidate in gc.get_objects():
            if isinstance(candidate, DistributedDataParallel) and any(
                registered is state for _, registered in getattr(candidate, "_comm_hooks", ())
            ):
                self.learn(candidate)
                return True
        return False

    @property
    def known(self) -> tuple[str, ...]:
        """Every name this run can use in per-layer overrides (module names, or positions seen)."""
        if self.source == "module":
            return self._known_from_module
        return tuple(self._names.values())

    def name_of(self, param: torch.Tensor, bucket_index: int, position: int) -> str:
        name = self._names.get(id(param))
        if name is None:
            if self.source == "none":
                self.source = "positions"
                logger.warning(
                    "gcomp: no module names for this model's parameters (call state.attach(model) or use "
                    "gcomp.register); naming them by their position in DDP's first buckets, which is stable only "
                    "while the model, its parameter order and bucket_cap_mb stay the same"
                )
            name = self._names[id(param)] = f"bucket{bucket_index}.param{position}"
        return name

    def lookup(self, param: torch.Tensor) -> Optional[str]:
        return self._names.get(id(param))


def check_bucket_buffer(buffer: torch.Tensor) -> None:
    """Refuse gradients gcomp cannot average correctly, before any collective is issued."""
    if buffer.is_sparse:
        raise TypeError("gcomp hooks need dense gradients; got a sparse gradient bucket (sparse embeddings are not supported)")
    if buffer.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"gcomp hooks support bucket dtypes {allowed}; got {buffer.dtype}")
