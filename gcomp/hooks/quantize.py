"""Quantized gradients with error feedback (EF14, EF21, EF21-SGDM or EControl) as a DDP comm hook.

Each compressed layer travels as ``bits`` bits per entry plus one float32 scale per ``chunk``
entries (:mod:`gcomp.compress.quantize` defines the format). The protocol around the codec is the
one top-k uses, written once in :class:`gcomp.hooks.message.MessageState`: the feedback rule gives
each layer's message input, this rank packs and decodes its own message, one allreduce carries
``[dense leftovers | layers initialised this step | health flag]``, one allgather carries the
packed messages, every rank decodes them in rank order scaled by ``1 / world`` and the rule
updates its (staged) state. Every rank's message has the same size, so one allgather suffices;
the codes of different ranks use different scales, so they cannot be summed by an allreduce.

Messages are float32 codecs of the float32 message input whatever the bucket's dtype: a float64
bucket's message input is rounded to float32 first (the rounding is fed back like the
quantization error), a float16/bfloat16 bucket's is computed in float32.

Tuning guide:

- ``bits``: per layer with the default chunk, 8 bits send 3.9x fewer bytes than float32, 4 bits
  7.8x, 2 bits 15x, 1 bit (scaled sign) 28x. On the CharLM job (300 steps, EF14) 8 bits ended
  0.3 % and 4 bits 0.6 % above uncompressed training's validation loss; 2 and 1 bits lean on
  error feedback harder (benchmarks/RESULTS.md §12). 32 sends the raw float32 values (no compression; with
  ``min_compression_rate < 1`` it is the exactness check against a dense average).
- 1 bit after preconditioning (``bits=1, chunk=512, precondition="adamw"`` for AdamW models,
  ``precondition="momentum"`` for SGD with momentum) is the measured mode for 30x fewer bytes:
  every step 30.06x smaller than DDP's, and on 500-step runs from scratch within 2-4 % of
  uncompressed AdamW with warm-up + cosine (5.5 % with a constant rate; 1.9 / 4.2 % at 1000 steps,
  §3i) and within 4.6 % of SGD
  with momentum on an LSTM
  (benchmarks/RESULTS.md §3f, where the constant-rate and per-rule rows are). ``precondition="lion"``
  sends Lion directions, which one bit carries exactly (Distributed Lion; §3g: its learning rate
  did not carry over between the two transformers measured).
- ``estimate_start``: ``"zero"`` (default) starts EF21 / EF21-SGDM / EControl from zero estimates,
  so no step is sent at full bytes; measured against the dense start, the same loss on the
  transformer and no worse on the LSTM (§3f).
- ``chunk``: entries sharing one scale (4 bytes per chunk). Smaller chunks follow the
  gradient's local magnitude, so they err less but cost more: on the CharLM's gradients at 4 bits
  the relative error is 0.093 / 0.109 / 0.136 / 0.165 for chunks of 64 / 256 / 512 / 1024 at
  7.11x / 7.76x / 7.88x / 7.94x fewer bytes (1 bit: 0.55 / 0.55 / 0.65 / 0.74). 256, the default,
  keeps most of 64's accuracy for 1.5 % fewer bytes than 512 (benchmarks/RESULTS.md §12).
- ``rounding``: ``"nearest"`` has the smallest error per step and, with error feedback, no bias
  that matters; ``"stochastic"`` is unbiased without feedback (seeded per step, rank and layer,
  so a resumed run draws the same numbers).
- ``feedback``: ``"ef14"`` (default) feeds back exactly what quantization dropped and keeps one
  buffer per layer; ``"ef21"`` / ``"econtrol"`` / ``"ef21-sgdm"`` quantize the change of a
  replicated estimate instead (two or three buffers; see gcomp.hooks.topk's guide for eta and
  momentum).
- ``warmup_steps``: dense steps cost full bytes each, and they count in the bytes of the whole
  run: 5 of 300 steps at 4 bits take the run from 7.76x to 6.9x fewer bytes. EF14 needs no dense
  start (its residual begins at zero), so the default is 0.
- ``min_compression_rate``: a layer is quantized only if ``message bytes * rate < dense bytes``
  (small layers, where per-layer padding dominates, are averaged densely).
- ``layer_bits``: per-layer bit widths by parameter name (the adaptive controller sets these).
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .. import ops
from ..comm import CommWorker
from ..compress.quantize import QUANTIZE_BITS, check_quantize_arguments, quantized_message_bytes
from .base import make_hook
from .layout import LayerSlot
from .message import MessageLayer, MessageState

ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic")
DEFAULT_CHUNK = 256


class QuantizeState(MessageState):
    """Hyperparameters and state of the quantization hook (register with :func:`quantize_hook`).

    Args:
        process_group: the DDP process group (``None``: default group).
        bits: bits per entry, 1 (scaled sign), 2, 4 or 8; 32 sends raw float32 (no compression).
        chunk: entries per float32 scale, a multiple of 8.
        rounding: ``"nearest"`` or ``"stochastic"``.
        feedback: error-feedback rule, ``"ef14"``, ``"ef21"``, ``"ef21-sgdm"`` or ``"econtrol"``.
        eta: EControl's feedback strength (>= 0; ignored by the other rules).
        momentum: EF21-SGDM's averaging factor beta in [0, 1) (ignored by the other rules).
        warmup_steps: sync steps of plain allreduce before compression starts.
        min_compression_rate: quantize a layer only if ``message bytes * rate < dense bytes``.
        estimate_start: how EF21 / EF21-SGDM / EControl estimates start: ``"zero"`` (default: from
            zero on every rank, every step compressed; a quantized message carries every entry, so
            the estimates fill in one step) or ``"dense"`` (one exact average of each layer, one
            step at full bytes). Measured in ``benchmarks/RESULTS.md`` §3f: the same loss or lower
            at 30.06x instead of 28.4x over 500 steps.
        layer_bits: per-layer bit widths ``{parameter name: bits}`` (the adaptive controller sets these).
        worker: share a communication thread with another state in the same process.
        hierarchical: ``"auto"`` (default), ``True`` or ``False``: sum densely inside each node
            and exchange messages among one leader per node (see :class:`~gcomp.PowerSGDState`).

    Example::

        state = gcomp.QuantizeState(bits=4, feedback="ef14")
        ddp_model.register_comm_hook(state, gcomp.quantize_hook)
    """

    method = "quantize"
    agreement_topic = "the quantized layers of a bucket (per-layer bits, layers holding feedback state)"
    decode_dtype = torch.float32  # the codec is float32 whatever the bucket's dtype

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        bits: int = 4,
        chunk: int = DEFAULT_CHUNK,
        rounding: str = "nearest",
        feedback: str = "ef14",
        eta: float = 0.1,
        momentum: float = 0.9,
        warmup_steps: int = 0,
        min_compression_rate: float = 2.0,
        estimate_start: str = "zero",
        layer_bits: Optional[Mapping[str, int]] = None,
        worker: Optional[CommWorker] = None,
        hierarchical: Union[str, bool] = "auto",
    ) -> None:
        _check_bits("bits", bits)
        check_quantize_arguments(4, chunk)  # the chunk rule, whatever bits is
        if not isinstance(rounding, str) or rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {list(ROUNDING_MODES)}; got {rounding!r}")
        super().__init__(
            process_group, feedback=feedback, eta=eta, momentum=momentum, warmup_steps=warmup_steps,
            min_compression_rate=min_compression_rate, estimate_start=estimate_start, worker=worker, hierarchical=hierarchical,
        )
        self.bits = int(bits)
        self.chunk = int(chunk)
        self.rounding = rounding
        self.layer_bits: dict[str, int] = {}
        if layer_bits:
            self.set_layer_bits(layer_bits)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "bits": self.bits,
            "chunk": self.chunk,
            "rounding": self.rounding,
            **self.feedback_config(),
        }

    def set_layer_bits(self, layer_bits: Mapping[str, int]) -> None:
        """Per-layer bit widths (applied from the next bucket on; call between steps, on every
        rank alike). Feedback state is kept across a change of bits (it is measured in gradient
        units, not in codes). Unknown names raise at the next step, on every rank."""
        if not isinstance(layer_bits, Mapping):
            raise TypeError(f"layer_bits must be a mapping {{parameter name: bits}}; got {layer_bits!r}")
        for name, bits in layer_bits.items():
            if not isinstance(name, str):
                raise TypeError(f"layer_bits keys must be parameter names (str); got {name!r}")
            _check_bits(f"layer_bits[{name!r}]", bits)
        self.layer_bits = {name: int(bits) for name, bits in layer_bits.items()}
        self.settings_changed()

    def layer_overrides(self) -> Mapping[str, int]:
        return self.layer_bits

    def set_layer_overrides(self, overrides: Mapping[str, Any]) -> None:
        self.set_layer_bits(overrides)

    # ------------------------------------------------------------------ the codec (setting: bits)
    def layer_setting(self, slot: LayerSlot) -> int:
        return self.layer_bits.get(slot.name, self.bits)

    def message_bytes(self, numel: int, setting: int) -> int:
        return quantized_message_bytes(numel, setting, self.chunk)

    def setting_label(self, slot: LayerSlot, setting: int) -> str:
        return f"bits={setting}"

    def _seed(self, step: int, name: str) -> int:
        """Stochastic rounding's seed of one layer: a function of (step, rank, layer) only, so a
        resumed run draws the same numbers and ranks draw independent ones."""
        return zlib.crc32(f"quantize|{step}|{self.codec_transport.rank}|{name}".encode("utf-8"))

    def _groups(self, settings: Sequence[int]) -> list[tuple[int, list[int]]]:
        """Layer indices by bit width, widths in ascending order: ``quantize_pack`` takes one
        width per call, so a bucket with mixed widths is packed as one message per width, back to back."""
        groups: dict[int, list[int]] = {}
        for index, bits in enumerate(settings):
            groups.setdefault(int(bits), []).append(index)
        return sorted(groups.items())

    def pack(self, sent: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], settings: Sequence[int],
             layers: Sequence[MessageLayer], step: int) -> torch.Tensor:
        values = sent if sent.dtype == torch.float32 else sent.to(torch.float32)
        parts = []
        for bits, members in self._groups(settings):
            seeds = None
            if self.rounding == "stochastic":
                seeds = [self._seed(step, layers[i].slot.name) for i in members]
            parts.append(ops.quantize_pack(
                values, [offsets[i] for i in members], [numels[i] for i in members], bits, self.chunk, seeds,
            ))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def unpack_add_(self, out: torch.Tensor, messages: torch.Tensor, offsets: Sequence[int], numels: Sequence[int],
                    settings: Sequence[int], weight: float) -> None:
        groups = self._groups(settings)
        if len(groups) == 1:
            bits, _ = groups[0]
            ops.quantize_unpack_add_(out, messages, offsets, numels, bits, self.chunk, weight)
            return
        sizes = [sum(self.message_bytes(numels[i], bits) for i in members) for bits, members in groups]
        rows = messages.reshape(-1, sum(sizes))  # one row per rank (one row: this rank's message)
        start = 0
        for (bits, members), size in zip(groups, sizes):
            # A contiguous copy of every rank's part of this width (clone, not .contiguous(): the
            # latter's Python binding refuses fake CUDA tensors on CPU-only builds of torch).
            part = rows.narrow(1, start, size).clone(memory_format=torch.contiguous_format)
            ops.quantize_unpack_add_(
                out, part, [offsets[i] for i in members], [numels[i] for i in members], bits, self.chunk, weight,
            )
            start += size


def _check_bits(name: str, bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANTIZE_BITS:
        raise ValueError(f"{name} must be one of {list(QUANTIZE_BITS)} (bits per entry; 32 sends raw float32); got {bits!r}")


quantize_hook = make_hook(QuantizeState, "quantize_hook")
