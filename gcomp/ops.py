"""Sparse message ops: native kernels when available, else the pure-torch twins.

Four paths compute the same bytes and the same sums bit for bit (see ``gcomp.compress.sparse``
for the format and the rules), so a job may mix ranks that run different ones:

``"compiled-cpu"`` / ``"compiled-cuda"``
    ``torch.ops.gcomp.*`` from the extension ``gcomp._C`` (CPU kernels always, CUDA kernels when it
    was built as a CUDAExtension).
``"cupy-nvrtc"``
    CUDA tensors when ``gcomp._C`` has no CUDA kernels (a CPU toolchain, or no nvcc at install
    time) but cupy can drive the GPU: ``csrc/sparse_kernels.cu`` is compiled at run time with
    NVRTC (``gcomp.native_cupy``).
``"torch"``
    the pure-torch reference twins (``gcomp.compress.sparse``), on any device.

``native_backend(device)`` says which one runs. Set ``GCOMP_NATIVE=0`` to force the pure-torch
path everywhere (read at every call, so tests can flip it; the older ``GCOMP_DISABLE_NATIVE=1``
still works and warns).

The extension is loaded on first use, not at import: ``import gcomp`` never needs a compiler's
output. Loading it also registers the ops' fake (shape-only) implementations, so the ops trace
under ``FakeTensorMode`` and ``torch.compile`` on any device type, CUDA included on a CPU-only
build of torch.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from types import ModuleType
from typing import Optional, Sequence

import torch

from gcomp.compress import sparse as reference

logger = logging.getLogger(__name__)

NATIVE_ENV = "GCOMP_NATIVE"
# Before the GCOMP_* switches were unified, "GCOMP_DISABLE_NATIVE=1" turned native code off.
DEPRECATED_DISABLE_NATIVE_ENV = "GCOMP_DISABLE_NATIVE"
_OFF_VALUES = ("0", "false", "off", "no")
_OP_NAMES = ("topk_pack", "sparse_unpack_add_", "sparse_unpack")

BACKEND_COMPILED_CPU = "compiled-cpu"
BACKEND_COMPILED_CUDA = "compiled-cuda"
BACKEND_CUPY = "cupy-nvrtc"
BACKEND_TORCH = "torch"


def native_enabled() -> bool:
    """False when ``GCOMP_NATIVE=0`` (or the deprecated ``GCOMP_DISABLE_NATIVE=1``) is set."""
    value = os.environ.get(NATIVE_ENV)
    if value is not None:
        return value.strip().lower() not in _OFF_VALUES
    if os.environ.get(DEPRECATED_DISABLE_NATIVE_ENV, "0") == "1":
        warnings.warn(
            f"{DEPRECATED_DISABLE_NATIVE_ENV}=1 is deprecated, set {NATIVE_ENV}=0 instead",
            DeprecationWarning,
            stacklevel=3,
        )
        return False
    return True


_extension: Optional[ModuleType] = None
_extension_tried = False  # plain globals, not a cache: torch.compile reads them while tracing
_compiled_device_types: frozenset[str] = frozenset()  # device types gcomp._C has kernels for


def _native_extension() -> Optional[ModuleType]:
    """The loaded ``gcomp._C`` (importing it registers ``torch.ops.gcomp.*``), or None if absent."""
    global _extension, _extension_tried, _compiled_device_types
    if _extension_tried:
        return _extension
    _extension_tried = True
    try:
        extension = importlib.import_module("gcomp._C")
    except ImportError as error:
        logger.debug("gcomp._C is not available (%s): native ops use the other paths", error)
        return None
    if not all(hasattr(torch.ops.gcomp, name) for name in _OP_NAMES):
        logger.warning("gcomp._C loaded but does not define %s; ignoring it", ", ".join(_OP_NAMES))
        return None
    _register_fake_implementations()
    _compiled_device_types = frozenset(
        kind for kind in ("cpu", "cuda", "xpu", "mps") if _compiled_kernels_for(torch.device(kind))
    )
    _extension = extension
    return extension


@torch.compiler.disable
def _load_extension_outside_graph() -> None:
    """Importing a module cannot be traced: under torch.compile this runs eagerly (one graph break,
    first call only), so compiled code still reaches the native op."""
    _native_extension()


def native_available() -> bool:
    """True when the compiled extension is loaded and native code is not switched off."""
    return native_enabled() and _native_extension() is not None


def simd_level() -> str:
    """The SIMD level of the native CPU kernels: "avx512", "avx2" or "portable" ("none" when the
    pure-torch path runs). ``GCOMP_SIMD=avx512|avx2|portable`` forces a level (read at every call);
    by default the best one this CPU supports runs. All levels give identical bytes."""
    if not native_available():
        return "none"
    return _native_extension().simd_level()


def _compiled_kernels_for(device: torch.device) -> bool:
    """Whether ``gcomp._C`` registered kernels for this device type (CUDA only in a CUDAExtension)."""
    key = {"meta": "Meta"}.get(device.type, device.type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("gcomp::topk_pack", key)
    except RuntimeError:  # a device type without a dispatch key of that name
        return False


def native_backend(device: torch.device | str) -> str:
    """Which implementation the ops run for tensors on ``device``.

    One of ``"compiled-cpu"``, ``"compiled-cuda"`` (more generally ``"compiled-<type>"``),
    ``"cupy-nvrtc"`` or ``"torch"``. Cheap after the first call; for ``"cupy-nvrtc"`` the kernels
    are compiled at their first launch, and a failed compilation turns this into ``"torch"``.
    """
    device = torch.device(device)
    if not native_enabled():
        return BACKEND_TORCH
    if _native_extension() is not None and _compiled_kernels_for(device):
        return f"compiled-{device.type}"
    if device.type == "cuda":
        from gcomp import native_cupy  # cheap: it imports cupy only when asked to

        if native_cupy.available(device):
            return BACKEND_CUPY
    return BACKEND_TORCH


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor) or tensor.device.type == "meta"


def _route(tensor: torch.Tensor) -> str:
    """"op" (torch.ops.gcomp), "fake" (shapes only), "cupy" or "torch" for this call."""
    if torch.compiler.is_compiling():
        # The op shows up in the graph and its fake gives the shapes. Without it, the twin: its
        # data-dependent steps break the graph, but the results stay right (the shape-only
        # function would silently compute nothing).
        if not _extension_tried:
            _load_extension_outside_graph()
        native = _extension is not None and native_enabled()
        return "op" if native and tensor.device.type in _compiled_device_types else "torch"
    if _is_fake(tensor):
        # FakeTensorMode: the op's fake, or without the extension the same shape function.
        return "op" if native_available() else "fake"
    backend = native_backend(tensor.device)
    if backend.startswith("compiled-"):
        return "op"
    if backend == BACKEND_CUPY:
        return "cupy"
    return "torch"


def _ints(values: Sequence[int]) -> list[int]:
    """Plain Python ints for the ops' int[] arguments (numpy or tensor scalars are refused there)."""
    return [int(value) for value in values]


# ------------------------------------------------------------------------------------------------
# Fake (shape-only) implementations
# ------------------------------------------------------------------------------------------------
# They check what the int lists and dtypes decide (the message size comes from the same layout
# function as the reference) and nothing that needs tensor data or concrete tensor sizes, which
# may be symbolic under dynamic shapes.


def _fake_layout(op: str, numels: Sequence[int], ks: Sequence[int], value_dtype: torch.dtype):
    try:
        return reference.sparse_message_layout(numels, ks, value_dtype)
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None


def _check_lengths(op: str, offsets: Sequence[int], numels: Sequence[int], ks: Sequence[int]) -> None:
    if not len(offsets) == len(numels) == len(ks):
        raise ValueError(
            f"{op}: offsets, numels and ks must have the same length "
            f"(got {len(offsets)}, {len(numels)}, {len(ks)})"
        )


def topk_pack_fake(buffer, offsets, numels, ks, value_dtype):
    op = "gcomp.topk_pack"
    if buffer.dtype not in reference.BUFFER_DTYPES or buffer.dim() != 1:
        raise ValueError(f"{op}: buffer must be a 1-D float32/float64/float16/bfloat16 tensor")
    _check_lengths(op, offsets, numels, ks)
    layout = _fake_layout(op, numels, ks, value_dtype)
    return buffer.new_empty((layout.message_bytes,), dtype=torch.uint8)


def sparse_unpack_add_fake(out, messages, offsets, numels, ks, value_dtype, scale):
    op = "gcomp.sparse_unpack_add_"
    if out.dtype not in reference.BUFFER_DTYPES:
        raise ValueError(f"{op}: out must be float32, float64, float16 or bfloat16")
    if messages.dtype != torch.uint8:
        raise ValueError(f"{op}: messages must be uint8")
    _check_lengths(op, offsets, numels, ks)
    _fake_layout(op, numels, ks, value_dtype)


def sparse_unpack_fake(messages, offsets, numels, ks, value_dtype):
    op = "gcomp.sparse_unpack"
    if messages.dtype != torch.uint8:
        raise ValueError(f"{op}: messages must be uint8")
    if messages.dim() not in (1, 2):
        raise ValueError(f"{op}: messages must be 1-D or 2-D")
    _check_lengths(op, offsets, numels, ks)
    layout = _fake_layout(op, numels, ks, value_dtype)
    shape = (layout.total_entries,) if messages.dim() == 1 else (messages.shape[0], layout.total_entries)
    return messages.new_empty(shape, dtype=value_dtype), messages.new_empty(shape, dtype=torch.int64)


_FAKES = {
    "topk_pack": topk_pack_fake,
    "sparse_unpack_add_": sparse_unpack_add_fake,
    "sparse_unpack": sparse_unpack_fake,
}


@functools.lru_cache(maxsize=None)
def _register_fake_implementations() -> None:
    """Registers the Python fakes on the ops (once, after ``gcomp._C`` defined them).

    The extension also has C++ Meta kernels; the Python fakes take precedence under
    FakeTensorMode, and, unlike Meta kernels, keep the fake tensor's device (CUDA included).
    """
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"gcomp::{name}", fake)


# ------------------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------------------


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
    route = _route(buffer)
    if route == "op":
        return torch.ops.gcomp.topk_pack(buffer, _ints(offsets), _ints(numels), _ints(ks), value_dtype)
    if route == "fake":
        return topk_pack_fake(buffer, _ints(offsets), _ints(numels), _ints(ks), value_dtype)
    if route == "cupy":
        from gcomp import native_cupy

        try:
            return native_cupy.topk_pack(buffer, _ints(offsets), _ints(numels), _ints(ks), value_dtype)
        except native_cupy.KernelsUnavailable:
            pass  # logged once; from now on native_backend says "torch"
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
    route = _route(out)
    args = (_ints(offsets), _ints(numels), _ints(ks), value_dtype, float(scale))
    if route == "op":
        torch.ops.gcomp.sparse_unpack_add_(out, messages, *args)
    elif route == "fake":
        sparse_unpack_add_fake(out, messages, *args)
    else:
        if route == "cupy":
            from gcomp import native_cupy

            try:
                native_cupy.sparse_unpack_add_(out, messages, *args)
                return
            except native_cupy.KernelsUnavailable:
                pass  # logged once; from now on native_backend says "torch"
        reference.sparse_unpack_add_(out, messages, offsets, numels, ks, value_dtype, scale)


def sparse_unpack(
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes messages into (values, absolute int64 indices), shaped ``(total_k,)`` or ``(n, total_k)``."""
    route = _route(messages)
    args = (_ints(offsets), _ints(numels), _ints(ks), value_dtype)
    if route == "op":
        values, indices = torch.ops.gcomp.sparse_unpack(messages, *args)
        return values, indices
    if route == "fake":
        return sparse_unpack_fake(messages, *args)
    if route == "cupy":
        from gcomp import native_cupy

        try:
            return native_cupy.sparse_unpack(messages, *args)
        except native_cupy.KernelsUnavailable:
            pass  # logged once; from now on native_backend says "torch"
    return reference.sparse_unpack(messages, offsets, numels, ks, value_dtype)


# ---------------------------------------------------------------------------- quantized messages
# Pass-throughs to the pure-torch reference codec (gcomp.compress.quantize), with the signatures the
# native quantization kernels expose; routing to those kernels replaces this block when they land.
# Fake tensors (FakeTensorMode) get the shapes only, as the other ops' registered fakes give: the
# twin's Python indexing refuses fake CUDA tensors on a CPU-only build of torch. (On the "meta"
# device the twin itself runs, which is how tests prove it keeps every tensor on the input's device.)
from gcomp.compress import quantize as quantize_reference  # noqa: E402 - kept inside this block


def _is_fake_tensor(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def quantize_pack(
    buffer: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    bits: int,
    chunk: int,
    seeds: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """One bucket's quantized message (uint8, on ``buffer``'s device); see
    :func:`gcomp.compress.quantize.quantize_pack` for the format and the rounding."""
    if _is_fake_tensor(buffer):
        quantize_reference._check_buffer("quantize_pack", buffer, offsets, numels)
        layout = quantize_reference.quantized_message_layout(_ints(numels), bits, chunk)
        return buffer.new_empty(layout.message_bytes, dtype=torch.uint8)
    return quantize_reference.quantize_pack(buffer, offsets, numels, bits, chunk, seeds)


def quantize_unpack_add_(
    out: torch.Tensor,
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    bits: int,
    chunk: int,
    weight: float = 1.0,
) -> torch.Tensor:
    """``out[layer] += weight * decode(message)`` for every message, in row order (bitwise the same
    on every rank); see :func:`gcomp.compress.quantize.quantize_unpack_add_`."""
    if _is_fake_tensor(out):
        quantize_reference._check_buffer("quantize_unpack_add_", out, offsets, numels)
        layout = quantize_reference.quantized_message_layout(_ints(numels), bits, chunk)
        if messages.dtype != torch.uint8 or messages.numel() % layout.message_bytes:
            raise ValueError(f"quantize_unpack_add_: messages must be uint8 holding whole messages of {layout.message_bytes} bytes")
        return out
    return quantize_reference.quantize_unpack_add_(out, messages, offsets, numels, bits, chunk, weight)
