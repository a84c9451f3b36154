"""Quantized messages: the layout and the pure-torch reference codec.

A bucket of L layers (layer ``l`` is ``buffer[offsets[l] : offsets[l] + numels[l]]``, float32)
is sent as one contiguous ``torch.uint8`` message. Every rank's message has the same size for the
same ``numels``, ``bits`` and ``chunk``, which is what one ``all_gather_into_tensor`` needs.

For each layer in order the message holds two sections, each padded with zero bytes to a multiple
of 8 (so the scales stay aligned):

1. **scales**: one float32 per chunk of ``chunk`` consecutive entries (the last chunk may be
   shorter); none for ``bits = 32``;
2. **codes**: ``bits`` bits per entry, least significant bit first (entry ``i``'s code is bits
   ``(i * bits) % 8 ...`` of byte ``(i * bits) // 8``; with bits in {1, 2, 4, 8} a code never
   straddles two bytes).

What a code means, per ``bits``:

- ``2``, ``4``, ``8``: with ``levels = 2**(bits-1) - 1`` (1, 7, 127) and the chunk's scale
  ``m = max |x|``, entry ``x`` becomes the integer ``q = rint(x * (levels / m))`` (round half to
  even), clamped to ``[-levels, levels]``; code = ``q + levels``. Decoding gives
  ``q * (m / levels)``. With *stochastic* rounding ``q = floor(x * (levels / m) + u)``, where
  ``u`` in [0, 1) is a hash of the layer's seed and the entry's index (:func:`uniform_noise`), so
  every implementation draws the same ``u`` and a run is reproducible.
- ``1`` (scaled sign): code 1 for ``x >= 0`` (and NaN), 0 for ``x < 0``; the chunk's scale is
  ``mean |x|``, decoded as ``+scale`` / ``-scale``. The mean is computed exactly in integers so
  that every implementation agrees bit for bit: ``a_i = min(2^24, rint(|x_i| * (2^24 / m)))``,
  ``scale = float32(float64(sum a_i) * float64(m) / (float64(n) * 2^24))`` (``n`` entries in the
  chunk, ``m = max |x|``). When ``m`` is subnormal, ``2^24 / m`` overflows to ``inf``: a zero entry's
  product ``0 * inf`` is NaN, and such an ``a_i`` counts 0 (every other entry counts ``2^24``).
- ``32``: the float32 bits of the entry; no scales. Decoding is exact (the no-quantization path
  that error-feedback exactness tests compare with a dense average).

Edge cases, fixed so that results are bitwise reproducible: ``m = 0`` gives code ``q = 0``
everywhere; a chunk holding a NaN has scale NaN (the quiet NaN ``0x7FC00000``) and one holding an
infinity has scale ``inf``, so each decodes to non-finite values (which the hooks detect and skip);
``x * (levels / m)`` that is NaN gives ``q = 0``.

Unpacking adds: ``out + weight * value``, one rounding for the product and one for the sum, in
float32, message after message in rank order (``weight`` is rounded to float32 first, as torch does
with a Python scalar). A sum that is NaN is stored as the quiet NaN ``0x7FC00000``: the NaN an
invalid operation produces differs between CPUs (``0xFFC00000`` on x86) and GPUs (``0x7FFFFFFF``).
The layers must not overlap in ``out`` (the order of the additions would otherwise depend on the
kernel). Every operation above is a single IEEE operation (no fused multiply-add), which is what
lets C++, CUDA and this module agree bit for bit.

This module is the reference the native kernels must reproduce, and the fallback when they are
not built; it is written for clarity first. No torch.distributed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SECTION_ALIGN = 8
QUANTIZE_BITS = (1, 2, 4, 8, 32)
SIGN_SCALE_ONE = 1 << 24  # fixed-point unit of the 1-bit scale's exact mean
_QUIET_NAN_BITS = 0x7FC00000
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@dataclass(frozen=True)
class QuantizedSection:
    """Where one layer's scales and codes sit inside the message (byte offsets from its start)."""

    numel: int
    chunks: int
    scale_offset: int
    scale_bytes: int  # padded
    code_offset: int
    code_bytes: int  # padded

    @property
    def end(self) -> int:
        return self.code_offset + self.code_bytes


@dataclass(frozen=True)
class QuantizedMessageLayout:
    """The byte layout of a bucket's quantized message (the same on every rank)."""

    layers: tuple[QuantizedSection, ...]
    bits: int
    chunk: int
    message_bytes: int


def _pad(n_bytes: int) -> int:
    return -(-n_bytes // SECTION_ALIGN) * SECTION_ALIGN


def levels(bits: int) -> int:
    """Largest ``|q|`` of a ``bits``-bit code (2: 1, 4: 7, 8: 127)."""
    return (1 << (bits - 1)) - 1


def check_quantize_arguments(bits: int, chunk: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANTIZE_BITS:
        raise ValueError(f"bits must be one of {list(QUANTIZE_BITS)}; got {bits!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 8 or chunk % 8 or chunk > (1 << 24):
        raise ValueError(f"chunk must be a multiple of 8 in [8, 2^24] (entries sharing one scale); got {chunk!r}")


def quantized_message_layout(numels: Sequence[int], bits: int, chunk: int) -> QuantizedMessageLayout:
    """Byte layout of a bucket's message; raises ValueError for bad arguments."""
    check_quantize_arguments(bits, chunk)
    sections = []
    cursor = 0
    for layer, numel in enumerate(numels):
        numel = int(numel)
        if numel < 1 or numel > _MASK32:
            raise ValueError(f"layer {layer} has numel {numel}, expected 1 <= numel < 2^32")
        chunks = 0 if bits == 32 else -(-numel // chunk)
        scale_bytes = _pad(4 * chunks)
        code_bytes = _pad((numel * bits + 7) // 8)
        sections.append(QuantizedSection(numel, chunks, cursor, scale_bytes, cursor + scale_bytes, code_bytes))
        cursor += scale_bytes + code_bytes
    return QuantizedMessageLayout(tuple(sections), bits, chunk, cursor)


def quantized_message_bytes(numel: int, bits: int, chunk: int) -> int:
    """Bytes of one layer's section pair (what the adaptive controller weighs)."""
    return quantized_message_layout([numel], bits, chunk).message_bytes


# ---------------------------------------------------------------------------- noise
def _multiply32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2^32`` for int64 tensors holding uint32 values, without int64 overflow."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, constants 0x7feb352d and 0x846ca68b)."""
    x = x ^ (x >> 16)
    x = _multiply32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _multiply32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    """``u_i = (mix32((seed + i * 0x9E3779B9) mod 2^32) >> 8) * 2^-24`` for ``i < numel``: float32
    in [0, 1), exactly representable, the same in every implementation."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    x = (_multiply32(index & _MASK32, _GOLDEN) + (int(seed) & _MASK32)) & _MASK32
    return (mix32(x) >> 8).to(torch.float32) * (1.0 / SIGN_SCALE_ONE)


# ---------------------------------------------------------------------------- codec
def _quiet_nan(device: torch.device) -> torch.Tensor:
    return torch.tensor([_QUIET_NAN_BITS], dtype=torch.int32, device=device).view(torch.float32)


def _chunk_max(chunks: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per chunk (rows), the canonical quiet NaN where a chunk holds a NaN."""
    magnitude = chunks.abs()
    has_nan = torch.isnan(magnitude).any(1)
    top = magnitude.masked_fill(torch.isnan(magnitude), 0.0).amax(1)
    return torch.where(has_nan, _quiet_nan(chunks.device), top)


def _encode_layer(x: torch.Tensor, bits: int, chunk: int, seed: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales float32, codes per entry: int64, or the int32 bits of the entries for 32 bits)."""
    numel = x.numel()
    if bits == 32:
        return x.new_empty(0), x.contiguous().view(torch.int32)
    chunks = -(-numel // chunk)
    padded = x.new_zeros(chunks * chunk)
    padded[:numel] = x
    rows = padded.view(chunks, chunk)
    top = _chunk_max(rows)
    if bits == 1:
        finite = torch.isfinite(top)
        unit = torch.where(finite & (top > 0), torch.full_like(top, float(SIGN_SCALE_ONE)) / top, torch.zeros_like(top))
        fixed = torch.round(rows.abs() * unit[:, None]).clamp_(max=float(SIGN_SCALE_ONE))
        fixed = fixed.masked_fill_(torch.isnan(fixed), 0.0)  # 0 * inf: a zero entry, subnormal m
        fixed = torch.where(finite[:, None], fixed, torch.zeros_like(fixed)).to(torch.int64)
        counts = torch.full((chunks,), chunk, dtype=torch.float64, device=x.device)
        counts[-1] = numel - (chunks - 1) * chunk
        mean = (fixed.sum(1).to(torch.float64) * top.to(torch.float64)) / (counts * float(SIGN_SCALE_ONE))
        scales = torch.where(finite, mean.to(torch.float32), top)
        codes = (~(x < 0)).to(torch.int64)
        return scales, codes
    limit = float(levels(bits))
    inverse = torch.where(top > 0, torch.full_like(top, limit) / top, torch.zeros_like(top))
    scaled = (rows * inverse[:, None]).reshape(-1)[:numel]
    if seed is None:
        q = torch.round(scaled)
    else:
        q = torch.floor(scaled + uniform_noise(seed, numel, x.device))
    q = torch.where(torch.isnan(scaled), torch.zeros_like(q), q.clamp(-limit, limit))
    return top, (q + limit).to(torch.int64)


def _pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write int64 codes (each below ``2**bits``) LSB-first into the uint8 section ``out``."""
    if bits == 32:  # int32 bit patterns of the float32 entries
        out[: codes.numel() * 4].copy_(codes.view(torch.uint8))
        return
    per_byte = 8 // bits
    n_bytes = (codes.numel() * bits + 7) // 8
    padded = codes.new_zeros(n_bytes * per_byte)
    padded[: codes.numel()] = codes
    shifts = torch.arange(per_byte, dtype=torch.int64, device=codes.device) * bits
    out[:n_bytes].copy_((padded.view(n_bytes, per_byte) << shifts).sum(1).to(torch.uint8))


def _unpack_codes(section: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """The codes of ``numel`` entries from a uint8 section (int64; int32 bit patterns for 32 bits)."""
    if bits == 32:
        return section[: numel * 4].view(torch.int32)
    per_byte = 8 // bits
    n_bytes = (numel * bits + 7) // 8
    shifts = torch.arange(per_byte, dtype=torch.int64, device=section.device) * bits
    expanded = (section[:n_bytes].to(torch.int64)[:, None] >> shifts) & ((1 << bits) - 1)
    return expanded.reshape(-1)[:numel]


def _decode_layer(scales: torch.Tensor, codes: torch.Tensor, numel: int, bits: int, chunk: int) -> torch.Tensor:
    if bits == 32:
        return codes.view(torch.float32)
    per_entry = scales.repeat_interleave(chunk)[:numel]
    if bits == 1:
        return torch.where(codes == 1, per_entry, -per_entry)
    limit = levels(bits)
    step = scales / float(limit)
    return (codes - limit).to(torch.float32) * step.repeat_interleave(chunk)[:numel]


def _check_buffer(op: str, tensor: torch.Tensor, offsets: Sequence[int], numels: Sequence[int]) -> None:
    if tensor.dtype != torch.float32 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(f"{op}: expected a contiguous 1-D float32 tensor; got {tensor.dtype} of shape {tuple(tensor.shape)}")
    if len(offsets) != len(numels):
        raise ValueError(f"{op}: offsets and numels must have the same length (got {len(offsets)}, {len(numels)})")
    for offset, numel in zip(offsets, numels):
        if offset < 0 or offset + numel > tensor.numel():
            raise ValueError(f"{op}: layer [{offset}, {offset + numel}) lies outside the buffer of {tensor.numel()} entries")


def _check_disjoint(op: str, offsets: Sequence[int], numels: Sequence[int]) -> None:
    spans = sorted((int(offset), int(offset) + int(numel), layer) for layer, (offset, numel) in enumerate(zip(offsets, numels)))
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{op}: layers {first} and {second} overlap in out")


def quantize_pack(
    buffer: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    bits: int,
    chunk: int,
    seeds: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """This bucket's quantized message (uint8, on ``buffer``'s device). ``seeds``: one 32-bit seed
    per layer for stochastic rounding (``None``: round to nearest; ignored for 1 and 32 bits)."""
    _check_buffer("quantize_pack", buffer, offsets, numels)
    layout = quantized_message_layout(numels, bits, chunk)
    if seeds is not None and len(seeds) != len(numels):
        raise ValueError(f"quantize_pack: one seed per layer expected ({len(numels)}); got {len(seeds)}")
    message = torch.zeros(layout.message_bytes, dtype=torch.uint8, device=buffer.device)
    for layer, (offset, section) in enumerate(zip(offsets, layout.layers)):
        seed = None if seeds is None or bits in (1, 32) else int(seeds[layer])
        scales, codes = _encode_layer(buffer[offset : offset + section.numel], bits, chunk, seed)
        if section.chunks:
            message[section.scale_offset : section.scale_offset + 4 * section.chunks].copy_(scales.view(torch.uint8))
        _pack_codes(codes, bits, message[section.code_offset : section.end])
    return message


def quantize_unpack_add_(
    out: torch.Tensor,
    messages: torch.Tensor,
    offsets: Sequence[int],
    numels: Sequence[int],
    bits: int,
    chunk: int,
    weight: float = 1.0,
) -> torch.Tensor:
    """``out[layer] += weight * decode(message)`` for every message in ``messages`` (uint8, one or
    more messages back to back, or one per row), in order. Returns ``out``."""
    _check_buffer("quantize_unpack_add_", out, offsets, numels)
    layout = quantized_message_layout(numels, bits, chunk)
    _check_disjoint("quantize_unpack_add_", offsets, numels)
    flat = messages.reshape(-1)
    if messages.dtype != torch.uint8 or layout.message_bytes == 0 or flat.numel() % layout.message_bytes:
        raise ValueError(
            f"quantize_unpack_add_: messages must be uint8 holding whole messages of {layout.message_bytes} bytes; "
            f"got {messages.dtype} with {flat.numel()} bytes"
        )
    quiet_nan = _quiet_nan(out.device)
    for start in range(0, flat.numel(), layout.message_bytes):
        message = flat[start : start + layout.message_bytes]
        for offset, section in zip(offsets, layout.layers):
            scales = message[section.scale_offset : section.scale_offset + 4 * section.chunks].view(torch.float32)
            codes = _unpack_codes(message[section.code_offset : section.end], section.numel, bits)
            value = _decode_layer(scales, codes, section.numel, bits, chunk)
            target = out[offset : offset + section.numel]
            target.add_(value * weight)  # product rounded, then the sum: no fused multiply-add
            target.copy_(torch.where(torch.isnan(target), quiet_nan, target))  # one NaN on every device
    return out
