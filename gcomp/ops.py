"""Sparse message ops: the native kernels of ``gcomp._C`` when built, else the pure-torch twins.

Both paths produce the same bytes and the same sums bit for bit (see ``gcomp.compress.sparse``
for the format and the rules), so a job may mix ranks with and without the extension.

The extension is loaded on first use, not at import: ``import gcomp`` never needs a compiler's
output. Set ``GCOMP_DISABLE_NATIVE=1`` to force the pure-torch path (read at every call, so tests
can flip it).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional, Sequence

import torch

from gcomp.compress import sparse as reference

DISABLE_NATIVE_ENV = "GCOMP_DISABLE_NATIVE"
_OP_NAMES = ("topk_pack", "sparse_unpack_add_", "sparse_unpack")


@functools.lru_cache(maxsize=None)
def _native_extension() -> Optional[ModuleType]:
    """The loaded ``gcomp._C`` (importing it registers ``torch.ops.gcomp.*``), or None if absent."""
    try:
        extension = importlib.import_module("gcomp._C")
    except ImportError:
        return None
    if not all(hasattr(torch.ops.gcomp, name) for name in _OP_NAMES):
        return None
    return extension


def native_available() -> bool:
    """True when the compiled kernels are loaded and not disabled by ``GCOMP_DISABLE_NATIVE=1``."""
    if os.environ.get(DISABLE_NATIVE_ENV, "0") == "1":
        return False
    return _native_extension() is not None


def simd_level() -> str:
    """The SIMD level of the native CPU kernels: "avx512", "avx2" or "portable" ("none" when the
    pure-torch path runs). ``GCOMP_SIMD=avx512|avx2|portable`` forces a level (read at every call);
    by default the best one this CPU supports runs. All levels give identical bytes."""
    if not native_available():
        return "none"
    return _native_extension().simd_level()


def _use_native(device: torch.device) -> bool:
    """Native for CPU tensors, and for other devices only if the extension has kernels for them."""
    if not native_available():
        return False
    if device.type == "cpu":
        return True
    dispatch_key = device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key("gcomp::topk_pack", dispatch_key)


def _ints(values: Sequence[int]) -> list[int]:
    """Plain Python ints for the ops' int[] arguments (numpy or tensor scalars are refused there)."""
    return [int(value) for value in values]


def topk_pack(
    buffer: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
) -> torch.Tensor:
    """Packs the top-``ks[l]`` entries (by ``|x|``) of every layer into one uint8 message.

    ``buffer`` is 1-D float32/float64/float16/bfloat16; layer ``l`` is
    ``buffer[offsets[l] : offsets[l] + numels[l]]``. The message size depends only on ``numels``,
    ``ks`` and ``value_dtype`` (``gcomp.compress.sparse.sparse_message_layout``).
    """
    if _use_native(buffer.device):
        return torch.ops.gcomp.topk_pack(buffer, _ints(offsets), _ints(numels), _ints(ks), value_dtype)
    return reference.topk_pack(buffer, offsets, numels, ks, value_dtype)


def sparse_unpack_add_(
    out: torch.Tensor,
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
    scale: float = 1.0,
) -> None:
    """Adds ``scale * value`` of every message into ``out``, messages in row order 0, 1, 2, ...

    ``messages`` is one message (1-D) or one per row (2-D, e.g. from ``all_gather_into_tensor``).
    The fixed order makes the sums bitwise identical on every rank. A malformed message raises
    ValueError before ``out`` is modified.
    """
    if _use_native(out.device):
        torch.ops.gcomp.sparse_unpack_add_(
            out, messages, _ints(offsets), _ints(numels), _ints(ks), value_dtype, float(scale)
        )
        return
    reference.sparse_unpack_add_(out, messages, offsets, numels, ks, value_dtype, scale)


def sparse_unpack(
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes messages into (values, absolute int64 indices), shaped ``(total_k,)`` or ``(n, total_k)``."""
    if _use_native(messages.device):
        values, indices = torch.ops.gcomp.sparse_unpack(
            messages, _ints(offsets), _ints(numels), _ints(ks), value_dtype
        )
        return values, indices
    return reference.sparse_unpack(messages, offsets, numels, ks, value_dtype)
