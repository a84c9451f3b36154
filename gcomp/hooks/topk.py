"""Top-k sparsification with error feedback (EF14, EF21, EF21-SGDM or EControl) as a DDP comm hook.

Follow one bucket through :meth:`TopKState.reduce`:

1. Split the bucket's layers into *sparse* layers (those whose packed top-k message is
   ``min_compression_rate`` times smaller than the dense layer) and *dense* leftovers. A sparse
   layer whose feedback rule has no state yet (EF21/EControl on their first compressed step) is
   averaged densely once to initialise its estimates.
2. Per sparse layer the feedback rule (:mod:`gcomp.feedback`) says what to send, e.g.
   ``g + e`` for EF14 or ``g - g_i`` for EF21.
3. Pack this rank's message (the k largest-``|x|`` entries of every sparse layer: values plus
   bit-packed indices or a bitmap; the same size on every rank) and decode it again, so sender and
   receivers use the same (possibly half-precision) values.
4. **Collective 1**: one allreduce, in the bucket's dtype, of ``[dense leftovers | gradients of
   layers initialised this step | health flag]``. The flag is non-finite when this rank's
   gradients or its *decoded message* are: a value that overflowed the wire dtype (float16 holds
   at most 65504, less than GradScaler's initial scale) makes every rank skip the step together.
5. **Collective 2**: one allgather of the packed messages. Top-k supports differ between ranks,
   so the messages cannot be summed by an allreduce. Decode all messages in rank order into one
   accumulator, scaled by ``1 / world``: bitwise the same on every rank, so replicated estimates
   stay identical.
6. The rule turns ``(own, mean)`` into new state (staged: committed at the end of the step unless
   some bucket was non-finite) and the averaged gradient written into the bucket.

Dense leftovers travel in the bucket's dtype (as DDP would send them); for float16/bfloat16
buckets they are divided by the world size before the sum, as DDP does, so the sum cannot
overflow where the mean fits.

Tuning guide:

- ``density``: fraction of each layer's entries sent (0.001-0.01 is typical for top-k). Every rank
  *receives* ``world - 1`` messages, so top-k only beats a dense allreduce in bytes when the
  message is smaller than about ``2 / world`` of the layer.
- ``feedback``: ``"ef21"`` is the safe default for heterogeneous data; ``"ef14"`` needs one
  buffer per layer instead of two; ``"econtrol"`` adds a damped error feedback to EF21 (tune
  ``eta`` in {0.001, 0.01, 0.05, 0.1, 0.2}; ``eta = 0`` is EF21); ``"ef21-sgdm"`` makes EF21
  track a local momentum of the gradients (``momentum`` 0.9), the remedy for minibatch noise at low
  density with plain SGD (``momentum = 0`` is EF21; with AdamW prefer ``"ef14"``).
- ``value_dtype``: ``"float16"``/``"bfloat16"`` halve the value bytes; the rounding error is fed back.
- ``min_compression_rate``: raise it (e.g. to the world size) to keep layers dense unless the
  sparse message really saves bytes on the receiving side too.
- ``warmup_steps``: dense sync steps first (lets DDP rebuild its buckets and the model leave its
  initial transient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from .. import ops
from ..comm import CommWorker, check_agreement
from ..compress.sparse import sparse_message_layout
from ..feedback import ERROR, ESTIMATE, LOCAL_ESTIMATE, MOMENTUM, Exchange, FeedbackRule, make_feedback_rule
from ..metrics import TrafficStats
from .base import HookState, make_hook
from .layout import BucketLayout, LayerSlot

VALUE_DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _SparseLayer:
    """A layer sent as a top-k message, with its share of the packed message."""

    slot: LayerSlot
    density: float
    k: int
    message_bytes: int  # values + indices of this layer (padded) inside the bucket's message


@dataclass(frozen=True)
class TopKPlan:
    """How one bucket layout is reduced: layers sent dense, and layers sent as top-k messages."""

    dense: tuple[LayerSlot, ...]
    sparse: tuple[_SparseLayer, ...]


class TopKState(HookState):
    """Hyperparameters and state of the top-k hook (register with :func:`topk_hook`).

    Args:
        process_group: the DDP process group (``None``: default group).
        density: fraction of each layer's entries sent, in (0, 1]; ``k = max(1, round(density * numel))``.
        feedback: error-feedback rule, ``"ef14"``, ``"ef21"``, ``"ef21-sgdm"`` or ``"econtrol"``.
        eta: EControl's feedback strength (>= 0; ignored by the other rules).
        momentum: EF21-SGDM's averaging factor beta in [0, 1) (ignored by the other rules).
        value_dtype: dtype of the values on the wire: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        warmup_steps: sync steps of plain allreduce before compression starts.
        min_compression_rate: send a layer sparse only if ``message bytes * rate < dense bytes``.
        layer_densities: per-layer density overrides ``{parameter name: density}`` (the adaptive
            controller sets these).
        worker: share a communication thread with another state in the same process.

    Example::

        state = gcomp.TopKState(density=0.01, feedback="ef21", warmup_steps=100)
        ddp_model.register_comm_hook(state, gcomp.topk_hook)
    """

    method = "topk"
    # Every tensor name a rule may store; the chosen rule uses a subset (see gcomp.feedback).
    replicated_tensors = (ESTIMATE,)
    per_rank_tensors = (ERROR, LOCAL_ESTIMATE, MOMENTUM)
    gradient_valued_tensors = (ERROR, LOCAL_ESTIMATE, MOMENTUM, ESTIMATE)

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        density: float = 0.01,
        feedback: str = "ef21",
        eta: float = 0.1,
        momentum: float = 0.9,
        value_dtype: Union[str, torch.dtype] = "float32",
        warmup_steps: int = 10,
        min_compression_rate: float = 2.0,
        layer_densities: Optional[Mapping[str, float]] = None,
        worker: Optional[CommWorker] = None,
    ) -> None:
        _check_density("density", density)
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) or not (
            math.isfinite(min_compression_rate) and min_compression_rate > 0
        ):
            raise ValueError(f"min_compression_rate must be a finite number > 0 (default 2); got {min_compression_rate!r}")
        rule = make_feedback_rule(feedback, eta=eta, momentum=momentum)
        value_dtype_name = _value_dtype_name(value_dtype)
        super().__init__(process_group, warmup_steps=warmup_steps, worker=worker)
        self.density = float(density)
        self.feedback = feedback
        self.eta = float(eta)
        self.momentum = float(momentum)
        self.value_dtype_name = value_dtype_name
        self.value_dtype: torch.dtype = getattr(torch, value_dtype_name)
        self.min_compression_rate = float(min_compression_rate)
        self.rule: FeedbackRule = rule
        self.layer_densities: dict[str, float] = {}
        # Layouts whose split into compressed / initialised layers all ranks have confirmed.
        self._agreed_layouts: set[int] = set()
        if layer_densities:
            self.set_layer_densities(layer_densities)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "density": self.density,
            "feedback": self.feedback,
            "eta": self.eta,
            "momentum": self.momentum,
            "value_dtype": self.value_dtype_name,
            "min_compression_rate": self.min_compression_rate,
        }

    def set_layer_densities(self, layer_densities: Mapping[str, float]) -> None:
        """Per-layer densities (applied from the next bucket on; call between steps, on every rank
        alike). A layer that becomes dense forgets its feedback state; one that becomes sparse
        again starts afresh (EF21/EControl: with one dense initialisation step). Unknown names
        raise at the next step."""
        if not isinstance(layer_densities, Mapping):
            raise TypeError(f"layer_densities must be a mapping {{parameter name: density}}; got {layer_densities!r}")
        for name, density in layer_densities.items():
            if not isinstance(name, str):
                raise TypeError(f"layer_densities keys must be parameter names (str); got {name!r}")
            _check_density(f"layer_densities[{name!r}]", density)
        self.layer_densities = {name: float(density) for name, density in layer_densities.items()}
        self.settings_changed()

    def layer_overrides(self) -> Mapping[str, float]:
        return self.layer_densities

    def set_layer_overrides(self, overrides: Mapping[str, Any]) -> None:
        self.set_layer_densities(overrides)

    def settings_changed(self) -> None:
        super().settings_changed()
        self._agreed_layouts.clear()

    # ------------------------------------------------------------------ the codec
    def _build_plan(self, layout: BucketLayout) -> TopKPlan:
        dense_element = torch.finfo(layout.dtype).bits // 8  # dense layers travel in the bucket's dtype
        dense: list[LayerSlot] = []
        sparse: list[_SparseLayer] = []
        for slot in layout.layers:
            if slot.numel == 0:
                dense.append(slot)
                continue
            density = self.layer_densities.get(slot.name, self.density)
            k = min(slot.numel, max(1, round(density * slot.numel)))
            message_bytes = sparse_message_layout([slot.numel], [k], self.value_dtype).message_bytes
            if message_bytes * self.min_compression_rate < slot.numel * dense_element:
                sparse.append(_SparseLayer(slot=slot, density=density, k=k, message_bytes=message_bytes))
            else:
                dense.append(slot)
        return TopKPlan(dense=tuple(dense), sparse=tuple(sparse))

    def _stored(self, slot: LayerSlot, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The rule's tensors of this layer that exist and fit (stale ones are forgotten)."""
        found = {}
        for key in self.rule.per_rank_tensors + self.rule.replicated_tensors:
            tensor = self.store.get(slot.name, key, (slot.numel,), dtype, device)
            if tensor is not None:
                found[key] = tensor
        return found

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        plan: TopKPlan = self.plan_for(layout, self._build_plan)
        world = self.transport.world_size
        device = buffer.device
        dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
        half_bucket = buffer.dtype in (torch.float16, torch.bfloat16)
        local = buffer.to(dtype, copy=True)  # this rank's gradients; the buffer receives the result

        stored = {layer.slot.name: self._stored(layer.slot, dtype, device) for layer in plan.sparse}
        compressed = tuple(layer for layer in plan.sparse if self.rule.is_initialised(stored[layer.slot.name]))
        initialised_now = tuple(layer.slot for layer in plan.sparse if not self.rule.is_initialised(stored[layer.slot.name]))
        fingerprint = layout.fingerprint
        if fingerprint not in self._agreed_layouts:
            # k per layer and which layers are initialised densely this step set the sizes of
            # both collectives: they can only differ after inconsistent checkpoints.
            fresh = {slot.name for slot in initialised_now}
            check_agreement(
                self.transport, self.worker.runtime, "the top-k layers of a bucket (per-layer k, layers holding feedback state)",
                [(layer.slot.name, layer.k, layer.slot.name in fresh) for layer in plan.sparse], device,
                hint="Were checkpoints of different runs loaded on different ranks?",
            )
            self._agreed_layouts.add(fingerprint)

        with TrafficStats.timed(self.traffic, "compress"):
            # What this rank sends sparse, packed, and decoded again (the values receivers see).
            offsets, numels, ks = [], [], []
            position = 0
            for layer in compressed:
                offsets.append(position)
                numels.append(layer.slot.numel)
                ks.append(layer.k)
                position += layer.slot.numel
            sent = local.new_empty(position)
            for layer, offset in zip(compressed, offsets):
                sent.narrow(0, offset, layer.slot.numel).copy_(self.rule.message_input(layer.slot.flat(local), stored[layer.slot.name]))
            packed = ops.topk_pack(sent, offsets, numels, ks, self.value_dtype) if compressed else None
            own = torch.zeros_like(sent)
            if packed is not None:
                ops.sparse_unpack_add_(own, packed, offsets, numels, ks, self.value_dtype)

            # Collective 1: [dense leftovers | gradients of layers initialised this step | flag],
            # in the bucket's dtype.
            exact = plan.dense + initialised_now
            exact_numel = sum(slot.numel for slot in exact)
            message = buffer.new_empty(exact_numel + 1)
            position = 0
            kept_dense: list[tuple[LayerSlot, dict[str, torch.Tensor]]] = []
            for slot in plan.dense:
                dense_stored = self._stored(slot, dtype, device)
                contribution = self.rule.uncompressed_input(slot.flat(local), dense_stored)
                message.narrow(0, position, slot.numel).copy_(contribution)
                kept_dense.append((slot, self.rule.after_uncompressed(contribution, dense_stored)))
                position += slot.numel
            for slot in initialised_now:
                message.narrow(0, position, slot.numel).copy_(slot.flat(local))
                position += slot.numel
            # Health flag without a host read: 0 when this rank's gradients and decoded message are
            # finite, NaN otherwise (inf * 0). Stored state is always finite (non-finite steps are
            # never committed), so these two sums see every way this step can go non-finite.
            health = local.sum(dtype=torch.float64) + own.sum(dtype=torch.float64)
            message.narrow(0, exact_numel, 1).copy_((health * 0).reshape(1))
            if half_bucket:
                message.div_(world)  # as DDP does for half precision: the sum stays in range

        self.transport.allreduce_sum_(message, self.traffic)
        for slot in plan.dense:
            nbytes = slot.numel * buffer.element_size()
            self.traffic.record_layer(slot.name, slot.shape, "dense", nbytes, nbytes)
        for slot in initialised_now:
            nbytes = slot.numel * buffer.element_size()
            self.traffic.record_layer(slot.name, slot.shape, "dense (init)", nbytes, nbytes)

        mean_exact = message.narrow(0, 0, exact_numel)
        if not half_bucket:
            mean_exact.div_(world)
        position = 0
        for slot in exact:
            slot.flat(buffer).copy_(mean_exact.narrow(0, position, slot.numel))
            position += slot.numel
        if not self.worker.runtime.all_finite(message):
            # Some rank had inf/NaN, or a value that overflowed the wire dtype: every rank sees the
            # same non-finite sum, so every rank skips the allgather, leaves its state untouched
            # and hands GradScaler a non-finite bucket.
            self.skip_step(local, layout, step)
            for layer in compressed:
                layer.slot.flat(buffer).fill_(math.nan)
            return buffer

        all_keys = self.rule.per_rank_tensors + self.rule.replicated_tensors
        for slot, keep in kept_dense:
            self.store.stage(slot.name, keep, forget=all_keys)
        position = sum(slot.numel for slot in plan.dense)
        for slot in initialised_now:
            mean = mean_exact.narrow(0, position, slot.numel).to(dtype)
            self.store.stage(slot.name, self.rule.dense_init(slot.flat(local), mean))
            position += slot.numel
        if self.observer is not None:  # only finite steps are profiled
            for layer, offset in zip(compressed, offsets):
                self.observer(layer.slot.name, layer.slot.shape, sent.narrow(0, offset, layer.slot.numel))

        if compressed:
            gathered = self.transport.allgather(packed, self.traffic)
            for layer in compressed:
                self.traffic.record_layer(
                    layer.slot.name, layer.slot.shape, f"density={layer.density:g}", layer.message_bytes,
                    layer.slot.numel * buffer.element_size(),
                )
            with TrafficStats.timed(self.traffic, "decompress"):
                mean = torch.zeros_like(sent)
                ops.sparse_unpack_add_(mean, gathered, offsets, numels, ks, self.value_dtype, 1.0 / world)
                for layer, offset in zip(compressed, offsets):
                    part = (offset, layer.slot.numel)
                    exchange = Exchange(
                        gradient=layer.slot.flat(local), sent=sent.narrow(0, *part), own=own.narrow(0, *part), mean=mean.narrow(0, *part)
                    )
                    update = self.rule.update(stored[layer.slot.name], exchange)
                    layer.slot.flat(buffer).copy_(update.output)
                    self.store.stage(layer.slot.name, update.stored)
        return buffer


def _check_density(name: str, density: Any) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < density <= 1):
        raise ValueError(f"{name} must be a number in (0, 1] (fraction of entries sent per layer); got {density!r}")


def _value_dtype_name(value_dtype: Any) -> str:
    if isinstance(value_dtype, torch.dtype):
        value_dtype = str(value_dtype).replace("torch.", "")
    elif not isinstance(value_dtype, str):
        raise TypeError(f"value_dtype must be one of {list(VALUE_DTYPE_NAMES)}; got {value_dtype!r}")
    if value_dtype not in VALUE_DTYPE_NAMES:
        raise ValueError(f"value_dtype must be one of {list(VALUE_DTYPE_NAMES)}; got {value_dtype!r}")
    return value_dtype


topk_hook = make_hook(TopKState, "topk_hook")
