"""Uncompressed baselines with the same accounting as the compressing hooks.

- ``allreduce``: what DDP does without a hook (average in the bucket's dtype).
- ``fp16`` / ``bf16``: cast to half precision, divide by the world size *before* the sum (so fp16
  does not overflow), allreduce, cast back. Unlike PyTorch's ``bf16_compress_hook`` these run on
  CPU/gloo too.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..metrics import TrafficStats
from .base import HookState, make_hook
from .layout import BucketLayout


class AllreduceState(HookState):
    """Plain averaging allreduce through the gcomp adapter (the reference every method is
    compared with)."""

    method = "allreduce"

    def dense_from_step(self) -> Optional[int]:
        return 0  # after the first two steps' checks, DDP's own allreduce (HookState._runs_on_model_group)

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        self.record_dense_layers(layout, buffer, "dense")
        return self.dense_average_(buffer)


class CastState(HookState):
    """Allreduce in a narrower floating-point dtype (``wire_dtype``)."""

    method = "cast"
    wire_dtype: torch.dtype = torch.float16

    def config(self) -> dict[str, Any]:
        return {**super().config(), "wire_dtype": str(self.wire_dtype)}

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        # As PyTorch's fp16 hook: narrow, then divide before the sum. A value that overflows
        # becomes inf in the sum on every rank; there is no state here, so GradScaler's skip of
        # the step is all that is needed.
        with TrafficStats.timed(self.traffic, "compress"):
            wire = buffer.to(self.wire_dtype).div_(self.codec_transport.world_size)
        self.codec_transport.allreduce_sum_(wire, self.traffic)
        element = wire.element_size()
        for slot in layout.layers:
            self.traffic.record_layer(
                slot.name, slot.shape, str(self.wire_dtype).replace("torch.", ""), slot.numel * element, slot.numel * buffer.element_size()
            )
        buffer.copy_(wire)
        return buffer


class FP16State(CastState):
    method = "fp16"
    wire_dtype = torch.float16


class BF16State(CastState):
    method = "bf16"
    wire_dtype = torch.bfloat16


allreduce_hook = make_hook(AllreduceState, "allreduce_hook")
fp16_hook = make_hook(FP16State, "fp16_hook")
bf16_hook = make_hook(BF16State, "bf16_hook")
