"""Top-k sparse messages: the layout and the pure-torch reference codec.

A bucket of L layers (layer ``l`` is ``buffer[offsets[l] : offsets[l] + numels[l]]``) is sent as
one contiguous ``torch.uint8`` message. For each layer in order it holds

1. the ``k`` selected values in the value dtype (float32, float16 or bfloat16), by ascending index;
2. the indices, either bit-packed at ``bits = max(1, ceil(log2(numel)))`` bits each (ascending,
   least significant bit first; stream bit ``p`` is bit ``p % 8`` of byte ``p // 8``) or as a bitmap
   of ``numel`` bits (bit ``i`` set iff index ``i`` is selected), whichever takes fewer padded bytes;
   ties go to bit-packing.

Both sections are padded with zero bytes to a multiple of 8 so values stay aligned. Given the same
``numels``, ``ks`` and value dtype every rank produces a message of the same size, which is what
``all_gather_into_tensor`` needs.

Selection rule: the ``k`` entries of largest ``|x|``, ties to the smaller index, NaN above
everything (all NaNs tie). Values are converted with round-to-nearest-even; float64 input reaches
a 16-bit value dtype through float32. Unpacking computes ``out + scale * value`` with one rounding
for the product and one for the sum, in float32 (float64 for float64 ``out``); float16/bfloat16
``out`` is widened to float32, updated and rounded back once per message.

NaNs get fixed bits too (torch's own NaN bits differ between its scalar and vector paths):
widening float16/bfloat16 to float32 keeps sign and payload and sets the quiet bit; narrowing
float32 to float16/bfloat16 gives the quiet NaN of the same sign; same-dtype copies keep the bits.
A NaN produced by unpacking is stored as the positive quiet NaN without payload (which operand's
NaN IEEE addition returns is not portable).

This module is the reference: the native kernels (``csrc/``, reached through ``gcomp.ops``) must
produce the same bytes and the same sums bit for bit. It is also the fallback when they are not
built, so it is written for clarity first and vectorised second. No torch.distributed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SECTION_ALIGN = 8
MAX_INDEX_BITS = 56
MAX_LAYER_NUMEL = 1 << MAX_INDEX_BITS

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BUFFER_DTYPES = VALUE_DTYPES + (torch.float64,)

# Per input dtype: (integer view dtype, bit pattern of +inf, key given to every NaN). The bits of
# |x| order like |x|; one NaN key just above +inf makes NaN the largest and keeps sorting defined.
_KEY_SPEC: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7F800000, 0x7F800001),
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x7FF0000000000001),
    torch.float16: (torch.int16, 0x7C00, 0x7C01),
    torch.bfloat16: (torch.int16, 0x7F80, 0x7F81),
}


@dataclass(frozen=True)
class LayerSection:
    """Where one layer's values and indices sit inside the message (byte offsets from its start)."""

    numel: int
    k: int
    bits: int  # bits per bit-packed index (reported for bitmap layers too)
    bitmap: bool
    value_offset: int
    value_bytes: int  # padded
    index_offset: int
    index_bytes: int  # padded
    index_payload_bytes: int  # without padding

    @property
    def end(self) -> int:
        return self.index_offset + self.index_bytes


@dataclass(frozen=True)
class SparseMessageLayout:
    """The byte layout of a bucket's message; ``message_bytes`` is the size of every rank's message."""

    layers: tuple[LayerSection, ...]
    value_dtype: torch.dtype
    message_bytes: int

    @property
    def total_entries(self) -> int:
        return sum(section.k for section in self.layers)


def pad_section(n_bytes: int) -> int:
    return -(-n_bytes // SECTION_ALIGN) * SECTION_ALIGN


def index_bits(numel: int) -> int:
    """``max(1, ceil(log2(numel)))``: the fewest bits that hold every index below ``numel``."""
    return max(1, (numel - 1).bit_length())


def packed_index_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def bitmap_bytes(numel: int) -> int:
    return (numel + 7) // 8


def layer_uses_bitmap(numel: int, k: int) -> bool:
    """A bitmap only when strictly smaller once padded: bit-packed indices need no popcount."""
    return pad_section(bitmap_bytes(numel)) < pad_section(packed_index_bytes(k, index_bits(numel)))


def _value_size(value_dtype: torch.dtype) -> int:
    return torch.finfo(value_dtype).bits // 8


def sparse_message_layout(
    numels: Sequence[int], ks: Sequence[int], value_dtype: torch.dtype
) -> SparseMessageLayout:
    """Byte layout of a bucket's message; raises ValueError for k outside [1, numel]."""
    if len(numels) != len(ks):
        raise ValueError(f"numels and ks must have the same length (got {len(numels)}, {len(ks)})")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be float32, float16 or bfloat16, got {value_dtype}")
    value_size = _value_size(value_dtype)
    sections = []
    cursor = 0
    for layer, (numel, k) in enumerate(zip(numels, ks)):
        numel, k = int(numel), int(k)
        if not 1 <= numel <= MAX_LAYER_NUMEL:
            raise ValueError(
                f"layer {layer} has numel {numel}, expected 1 <= numel <= 2^{MAX_INDEX_BITS}"
            )
        if not 1 <= k <= numel:
            raise ValueError(f"layer {layer} has k = {k}, expected 1 <= k <= numel = {numel}")
        bits = index_bits(numel)
        bitmap = layer_uses_bitmap(numel, k)
        value_bytes = pad_section(k * value_size)
        payload = bitmap_bytes(numel) if bitmap else packed_index_bytes(k, bits)
        section = LayerSection(
            numel=numel,
            k=k,
            bits=bits,
            bitmap=bitmap,
            value_offset=cursor,
            value_bytes=value_bytes,
            index_offset=cursor + value_bytes,
            index_bytes=pad_section(payload),
            index_payload_bytes=payload,
        )
        sections.append(section)
        cursor = section.end
    return SparseMessageLayout(tuple(sections), value_dtype, cursor)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like ``|x|`` with every NaN one step above +inf (int32, int64 for float64)."""
    view_dtype, inf_bits, nan_key = _KEY_SPEC[x.dtype]
    if x.dtype == torch.float64:
        magnitude = x.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    else:
        magnitude = x.view(view_dtype).to(torch.int32) & (0x7FFFFFFF if x.dtype == torch.float32 else 0x7FFF)
    return torch.where(magnitude > inf_bits, torch.full_like(magnitude, nan_key), magnitude)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the ``k`` largest ``|x|`` (ties to the smaller index, NaN largest).

    ``torch.topk`` finds the k-th largest key; its own tie choice is then replaced by the rule:
    everything strictly above that key, plus the first tied indices in ascending order.
    """
    key = magnitude_key(x)
    if k == key.numel():
        return torch.arange(k, dtype=torch.int64, device=x.device)
    kth = torch.topk(key, k, sorted=False).values.min()
    selected = key > kth
    n_above = int(selected.sum())
    ties = torch.nonzero(key == kth).flatten()[: k - n_above]
    selected[ties] = True
    return torch.nonzero(selected).flatten()


# ------------------------------------------------------------------------------------------------
# Index encodings
# ------------------------------------------------------------------------------------------------


def _bytes_per_window(bits: int) -> int:
    """Bytes an index of ``bits`` bits can touch when it starts anywhere inside a byte."""
    return (7 + bits + 7) // 8


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-packs indices (each < 2^bits) into ``packed_index_bytes(len, bits)`` bytes.

    Index ``j`` is shifted to its bit position and its bytes are added into the output; different
    indices own disjoint bits, so the integer sums equal a bitwise OR.
    """
    count = indices.numel()
    n_bytes = packed_index_bytes(count, bits)
    positions = torch.arange(count, dtype=torch.int64, device=indices.device) * bits
    first_byte = positions >> 3
    shifted = indices.to(torch.int64) << (positions & 7)
    window = _bytes_per_window(bits)
    acc = torch.zeros(n_bytes + window, dtype=torch.int64, device=indices.device)
    for b in range(window):
        acc.index_add_(0, first_byte + b, (shifted >> (8 * b)) & 0xFF)
    return acc[:n_bytes].to(torch.uint8)


def unpack_indices(payload: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Reads ``count`` bit-packed indices (int64) from a uint8 payload."""
    positions = torch.arange(count, dtype=torch.int64, device=payload.device) * bits
    first_byte = positions >> 3
    window = _bytes_per_window(bits)
    padded = torch.cat([payload.to(torch.int64), payload.new_zeros(window, dtype=torch.int64)])
    gathered = torch.zeros(count, dtype=torch.int64, device=payload.device)
    for b in range(window):
        gathered |= padded[first_byte + b] << (8 * b)
    return (gathered >> (positions & 7)) & ((1 << bits) - 1)


def indices_to_bitmap(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """A bitmap of ``bitmap_bytes(numel)`` bytes with bit ``i`` set for every index ``i``."""
    n_bytes = bitmap_bytes(numel)
    flags = torch.zeros(n_bytes * 8, dtype=torch.uint8, device=indices.device)
    flags[indices] = 1
    flags = flags.view(n_bytes, 8)
    bitmap = torch.zeros(n_bytes, dtype=torch.uint8, device=indices.device)
    for b in range(8):
        bitmap |= flags[:, b] << b
    return bitmap


def bitmap_flags(bitmap: torch.Tensor) -> torch.Tensor:
    """One uint8 flag (0/1) per bitmap bit, bit ``i`` at position ``i``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    return ((bitmap.unsqueeze(1) >> shifts) & 1).flatten()


# ------------------------------------------------------------------------------------------------
# Conversions with the native kernels' NaN rule
# ------------------------------------------------------------------------------------------------

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT32_QUIET_BIT = 0x00400000
_QUIET_NAN_16 = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}
# (integer view, bits) of the NaN every unpacked NaN becomes
_CANONICAL_NAN = {
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF8000000000000),
    torch.float16: (torch.int16, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7FC0),
}


def widen_to_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (or float32) -> float32: exact, NaN payload kept and quieted.

    torch's own conversion turns every 16-bit NaN into 0x7FFFFFFF, so NaNs are rebuilt from bits.
    """
    y = x.to(torch.float32)
    if x.dtype in _HALF_DTYPES:
        nan = torch.isnan(x)
        if bool(nan.any()):  # y is a fresh tensor here: safe to edit in place
            half = x.view(torch.int16)[nan].to(torch.int32) & 0xFFFF
            if x.dtype == torch.float16:
                widened = ((half & 0x8000) << 16) | 0x7F800000 | ((half & 0x3FF) << 13)
            else:
                widened = half << 16
            y.view(torch.int32)[nan] = widened | _FLOAT32_QUIET_BIT
    return y


def narrow_from_float32(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> ``dtype`` rounding to nearest even; a NaN becomes the quiet NaN of its sign."""
    y = x.to(dtype)
    if dtype in _HALF_DTYPES:
        nan = torch.isnan(x)
        if bool(nan.any()):
            sign = (x.view(torch.int32) >> 16) & 0x8000
            y.view(torch.int16)[nan] = (sign[nan] | _QUIET_NAN_16[dtype]).to(torch.int16)
    return y


def to_value_dtype(values: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """Buffer elements as message values: bits kept for the same dtype, else through float32."""
    if values.dtype == value_dtype:
        return values
    as_float = widen_to_float32(values) if values.dtype != torch.float64 else values.to(torch.float32)
    return narrow_from_float32(as_float, value_dtype)


# ------------------------------------------------------------------------------------------------
# Argument checks (the native ops raise ValueError for exactly the same conditions)
# ------------------------------------------------------------------------------------------------


def _checked_layout(
    op: str,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
    extent: int | None,
) -> SparseMessageLayout:
    if not len(offsets) == len(numels) == len(ks):
        raise ValueError(
            f"{op}: offsets, numels and ks must have the same length "
            f"(got {len(offsets)}, {len(numels)}, {len(ks)})"
        )
    try:
        layout = sparse_message_layout(numels, ks, value_dtype)
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    for layer, (offset, numel) in enumerate(zip(offsets, numels)):
        offset = int(offset)
        if offset < 0 or (extent is not None and offset + int(numel) > extent):
            raise ValueError(
                f"{op}: layer {layer} spans [{offset}, {offset} + {numel}) which is outside "
                f"the tensor of {extent} elements"
            )
    return layout


def _check_disjoint(op: str, offsets: Sequence[int], numels: Sequence[int]) -> None:
    spans = sorted((int(o), int(n), layer) for layer, (o, n) in enumerate(zip(offsets, numels)))
    for (o0, n0, l0), (o1, _, l1) in zip(spans, spans[1:]):
        if o0 + n0 > o1:
            raise ValueError(f"{op}: layers {l0} and {l1} overlap")


def _check_messages(op: str, messages: torch.Tensor, layout: SparseMessageLayout) -> torch.Tensor:
    """Returns the messages as a contiguous 2-D tensor (one row per message)."""
    if messages.dtype != torch.uint8:
        raise ValueError(f"{op}: messages must be uint8, got {messages.dtype}")
    if messages.dim() not in (1, 2):
        raise ValueError(
            f"{op}: messages must be 1-D (one message) or 2-D (one message per row), "
            f"got {messages.dim()}-D"
        )
    if messages.shape[-1] != layout.message_bytes:
        raise ValueError(
            f"{op}: a message has {messages.shape[-1]} bytes but the layout needs "
            f"{layout.message_bytes} (truncated message or different offsets/numels/ks/value_dtype?)"
        )
    rows = messages.shape[0] if messages.dim() == 2 else 1  # explicit: -1 is ambiguous for 0-byte rows
    return messages.reshape(rows, layout.message_bytes).contiguous()


# ------------------------------------------------------------------------------------------------
# The codec
# ------------------------------------------------------------------------------------------------


def _as_dtype(section: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterprets uint8 bytes as ``dtype`` (copying when the bytes are misaligned for a view)."""
    if section.storage_offset() % _value_size(dtype) != 0:
        section = section.clone()
    return section.view(dtype)


def topk_pack(
    buffer: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
) -> torch.Tensor:
    """Packs the top-``ks[l]`` entries of every layer of ``buffer`` into one uint8 message."""
    op = "gcomp.topk_pack"
    if buffer.dtype not in BUFFER_DTYPES:
        raise ValueError(f"{op}: buffer must be float32, float64, float16 or bfloat16, got {buffer.dtype}")
    if buffer.dim() != 1:
        raise ValueError(f"{op}: buffer must be 1-D, got {buffer.dim()}-D")
    if not buffer.is_contiguous():
        raise ValueError(f"{op}: buffer must be contiguous")
    layout = _checked_layout(op, offsets, numels, ks, value_dtype, buffer.numel())
    message = torch.zeros(layout.message_bytes, dtype=torch.uint8, device=buffer.device)
    for offset, section in zip(offsets, layout.layers):
        x = buffer[int(offset) : int(offset) + section.numel]
        indices = topk_indices(x, section.k)
        values = to_value_dtype(x[indices], value_dtype)
        message[section.value_offset : section.value_offset + values.numel() * values.element_size()] = (
            values.view(torch.uint8)
        )
        payload = indices_to_bitmap(indices, section.numel) if section.bitmap else pack_indices(indices, section.bits)
        message[section.index_offset : section.index_offset + payload.numel()] = payload
    return message


def _decode_layer_indices(op: str, message: torch.Tensor, row: int, layer: int, section: LayerSection) -> torch.Tensor:
    payload = message[section.index_offset : section.index_offset + section.index_payload_bytes]
    if section.bitmap:
        flags = bitmap_flags(payload)
        if bool(flags[section.numel :].any()):
            raise ValueError(
                f"{op}: message {row}, layer {layer}: the bitmap has a bit set at a position >= numel "
                "(corrupted or mismatched message)"
            )
        indices = torch.nonzero(flags[: section.numel]).flatten()
        if indices.numel() != section.k:
            raise ValueError(
                f"{op}: message {row}, layer {layer}: the bitmap's popcount differs from k "
                "(corrupted or mismatched message)"
            )
        return indices
    indices = unpack_indices(payload, section.k, section.bits)
    if bool((indices >= section.numel).any()):
        raise ValueError(
            f"{op}: message {row}, layer {layer}: a bit-packed index is >= numel "
            "(corrupted or mismatched message)"
        )
    if section.k > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(
            f"{op}: message {row}, layer {layer}: bit-packed indices are not strictly increasing "
            "(corrupted or mismatched message)"
        )
    return indices


def _decode_messages(
    op: str, rows: torch.Tensor, offsets: Sequence[int], layout: SparseMessageLayout
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validates every message, then returns per message (values, absolute indices)."""
    decoded = []
    for row in range(rows.shape[0]):
        message = rows[row]
        values, indices = [], []
        for layer, (offset, section) in enumerate(zip(offsets, layout.layers)):
            indices.append(_decode_layer_indices(op, message, row, layer, section) + int(offset))
            value_end = section.value_offset + section.k * _value_size(layout.value_dtype)
            values.append(_as_dtype(message[section.value_offset : value_end], layout.value_dtype))
        empty_values = rows.new_empty(0, dtype=layout.value_dtype)
        empty_indices = rows.new_empty(0, dtype=torch.int64)
        decoded.append(
            (torch.cat(values) if values else empty_values, torch.cat(indices) if indices else empty_indices)
        )
    return decoded


def sparse_unpack_add_(
    out: torch.Tensor,
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
    scale: float = 1.0,
) -> None:
    """``out[offsets[l] + idx] += scale * value`` for every message, in row order 0, 1, 2, ...

    Every message is validated before ``out`` is touched: a malformed one raises ValueError and
    leaves ``out`` unchanged.
    """
    op = "gcomp.sparse_unpack_add_"
    if out.dtype not in BUFFER_DTYPES:
        raise ValueError(f"{op}: out must be float32, float64, float16 or bfloat16, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    if out.device != messages.device:
        raise ValueError(f"{op}: out is on {out.device} but messages are on {messages.device}")
    layout = _checked_layout(op, offsets, numels, ks, value_dtype, out.numel())
    _check_disjoint(op, offsets, numels)
    rows = _check_messages(op, messages, layout)
    if rows.shape[0] == 0 or not layout.layers:
        return
    decoded = _decode_messages(op, rows, offsets, layout)
    compute_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    scale_tensor = torch.tensor(scale, dtype=compute_dtype, device=out.device)
    flat = out.view(-1)
    nan_view, nan_bits = _CANONICAL_NAN[out.dtype]
    for values, indices in decoded:
        update = widen_to_float32(values).to(compute_dtype) * scale_tensor
        current = flat[indices]
        total = (widen_to_float32(current) if out.dtype in _HALF_DTYPES else current) + update
        is_nan = torch.isnan(total)
        total = total.to(out.dtype)
        if bool(is_nan.any()):
            total.view(nan_view)[is_nan] = nan_bits
        flat[indices] = total


def sparse_unpack(
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    ks: Sequence[int],
    value_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes messages into (values in ``value_dtype``, absolute int64 indices).

    Shapes are ``(total_k,)`` for a 1-D message and ``(n_messages, total_k)`` for 2-D messages;
    entries are layer by layer, ascending index within a layer.
    """
    op = "gcomp.sparse_unpack"
    layout = _checked_layout(op, offsets, numels, ks, value_dtype, None)
    rows = _check_messages(op, messages, layout)
    decoded = _decode_messages(op, rows, offsets, layout)
    total = layout.total_entries
    values = rows.new_empty((rows.shape[0], total), dtype=value_dtype)
    indices = rows.new_empty((rows.shape[0], total), dtype=torch.int64)
    for row, (row_values, row_indices) in enumerate(decoded):
        values[row] = row_values
        indices[row] = row_indices
    if messages.dim() == 1:
        return values[0], indices[0]
    return values, indices
