"""Top-k sparsification with error feedback (EF14, EF21, EF21-SGDM or EControl) as a DDP comm hook.

Follow one bucket through :meth:`TopKState.reduce`:

1. Split the bucket's layers into *sparse* layers (those whose packed top-k message is
   ``min_compression_rate`` times smaller than the dense layer) and *dense* leftovers. A sparse
   layer whose feedback rule has no state yet (EF21/EControl on their first compressed step) is
   averaged densely once to initialise its estimates.
2. Per sparse layer the feedback rule (:mod:`gcomp.feedback`) says what to send, e.g.
   ``g + e`` for EF14 or ``g - g_i`` for EF21.
3. **Collective 1**: one allreduce of ``[dense leftovers | gradients of layers initialised this
   step | health flag]``.
4. **Collective 2**: one allgather of this rank's packed message (the k largest-``|x|`` entries of
   every sparse layer: values plus bit-packed indices or a bitmap; the same size on every rank).
   Top-k supports differ between ranks, so the messages cannot be summed by an allreduce.
5. Decode all messages in rank order into one accumulator, scaled by ``1 / world``: bitwise the
   same on every rank, so replicated estimates stay identical. This rank's own message is decoded
   too, so sender and receivers use the same (possibly half-precision) values.
6. The rule turns ``(own, mean)`` into new state (staged: committed at the end of the step unless
   some bucket was non-finite) and the averaged gradient written into the bucket.

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
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from .. import ops
from ..comm import CommWorker
from ..compress.sparse import sparse_message_layout
from ..feedback import ERROR, ESTIMATE, LOCAL_ESTIMATE, MOMENTUM, Exchange, FeedbackRule, make_feedback_rule
from .base import HookState, comm_hook
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
class _BucketPlan:
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
        state.attach(ddp_model)   # optional: key state by parameter name (robust checkpoints)
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
        self._plans: dict[int, _BucketPlan] = {}
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
        again starts afresh (EF21/EControl: with one dense initialisation step)."""
        if not isinstance(layer_densities, Mapping):
            raise TypeError(f"layer_densities must be a mapping {{parameter name: density}}; got {layer_densities!r}")
        for name, density in layer_densities.items():
            if not isinstance(name, str):
                raise TypeError(f"layer_densities keys must be parameter names (str); got {name!r}")
            _check_density(f"layer_densities[{name!r}]", density)
        self.layer_densities = {name: float(density) for name, density in layer_densities.items()}
        self._plans.clear()
        self._agreed_layouts.clear()

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["layer_densities"] = dict(self.layer_densities)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.set_layer_densities(state.get("layer_densities", {}))

    # ------------------------------------------------------------------ the codec
    def _plan(self, layout: BucketLayout) -> _BucketPlan:
        key = layout.fingerprint()
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        dense_element = 8 if layout.dtype == torch.float64 else 4  # the dense allreduce's dtype
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
        plan = self._plans[key] = _BucketPlan(dense=tuple(dense), sparse=tuple(sparse))
        return plan

    def _stored(self, slot: LayerSlot, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The rule's tensors of this layer that exist and fit (stale ones are forgotten)."""
        found = {}
        for key in self.rule.per_rank_tensors + self.rule.replicated_tensors:
            tensor = self.layer_tensor(slot.name, key, (slot.numel,), dtype)
            if tensor is not None:
                found[key] = tensor
        return found

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        plan = self._plan(layout)
        world = self.transport.world_size
        dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
        local = buffer.to(dtype, copy=True)  # this rank's gradients; the buffer receives the result

        stored = {layer.slot.name: self._stored(layer.slot, dtype) for layer in plan.sparse}
        ready = {name: self.rule.is_initialised(tensors) for name, tensors in stored.items()}
        compressed = tuple(layer for layer in plan.sparse if ready[layer.slot.name])
        initialised_now = tuple(layer.slot for layer in plan.sparse if not ready[layer.slot.name])
        fingerprint = layout.fingerprint()
        if fingerprint not in self._agreed_layouts:
            self._verify_agreement(plan, initialised_now, fingerprint)

        # Collective 1: [dense leftovers | gradients of layers initialised this step | health flag].
        exact = plan.dense + initialised_now
        message = torch.empty(sum(slot.numel for slot in exact) + 1, dtype=dtype)
        position = 0
        forgotten = []
        for slot in plan.dense:
            dense_stored = self._stored(slot, dtype)
            message[position : position + slot.numel].copy_(self.rule.uncompressed_input(_view(local, slot), dense_stored))
            if dense_stored:
                forgotten.append(slot.name)
            position += slot.numel
        for slot in initialised_now:
            message[position : position + slot.numel].copy_(_view(local, slot))
            position += slot.numel

        sent = torch.empty(sum(layer.slot.numel for layer in compressed), dtype=dtype)
        position = 0
        for layer in compressed:
            name, numel = layer.slot.name, layer.slot.numel
            sent[position : position + numel].copy_(self.rule.message_input(_view(local, layer.slot), stored[name]))
            if self.observer is not None:
                self.observer(name, layer.slot.shape, sent[position : position + numel])
            position += numel
        # Stored state is always finite (non-finite steps are never committed), so the step is
        # finite iff this rank's gradients are; a float64 sum is finite iff every entry is, and
        # far cheaper than an elementwise isfinite over the bucket.
        message[-1] = 0.0 if math.isfinite(float(local.sum(dtype=torch.float64))) else math.inf

        self.transport.allreduce_sum_(message, self.traffic)
        element = torch.finfo(dtype).bits // 8
        for slot in plan.dense:
            self.traffic.record_layer(slot.name, slot.shape, "dense", slot.numel * element, slot.numel * buffer.element_size())
        for slot in initialised_now:
            self.traffic.record_layer(slot.name, slot.shape, "dense (init)", slot.numel * element, slot.numel * buffer.element_size())

        mean_exact = message[:-1].div_(world)
        _write(buffer, exact, mean_exact)
        if not bool(torch.isfinite(message).all()):
            # Some rank had inf/NaN: every rank sees the same non-finite sum, so every rank skips
            # the allgather, leaves its state untouched and hands GradScaler a non-finite bucket.
            self.mark_non_finite()
            for layer in compressed:
                _view(buffer, layer.slot).fill_(math.nan)
            return buffer

        position = sum(slot.numel for slot in plan.dense)
        for slot in initialised_now:
            new_state = self.rule.dense_init(_view(local, slot), mean_exact[position : position + slot.numel])
            self.stage(_Commit(self, slot.name, new_state))
            position += slot.numel
        for name in forgotten:
            self.stage(_Forget(self, name, self.rule.per_rank_tensors + self.rule.replicated_tensors))

        if compressed:
            self._exchange_sparse(buffer, local, sent, compressed, stored, world)
        return buffer

    def _exchange_sparse(
        self,
        buffer: torch.Tensor,
        local: torch.Tensor,
        sent: torch.Tensor,
        compressed: tuple[_SparseLayer, ...],
        stored: dict[str, dict[str, torch.Tensor]],
        world: int,
    ) -> None:
        """Collective 2 and the feedback updates of the compressed layers."""
        offsets, numels, ks = [], [], []
        position = 0
        for layer in compressed:
            offsets.append(position)
            numels.append(layer.slot.numel)
            ks.append(layer.k)
            position += layer.slot.numel
        packed = ops.topk_pack(sent, offsets, numels, ks, self.value_dtype)
        gathered = self.transport.allgather(packed, self.traffic)
        for layer in compressed:
            self.traffic.record_layer(
                layer.slot.name,
                layer.slot.shape,
                f"density={layer.density:g}",
                layer.message_bytes,
                layer.slot.numel * buffer.element_size(),
            )

        own = torch.zeros_like(sent)
        ops.sparse_unpack_add_(own, packed, offsets, numels, ks, self.value_dtype)
        mean = torch.zeros_like(sent)
        ops.sparse_unpack_add_(mean, gathered, offsets, numels, ks, self.value_dtype, 1.0 / world)

        for layer, offset in zip(compressed, offsets):
            part = slice(offset, offset + layer.slot.numel)
            exchange = Exchange(gradient=_view(local, layer.slot), sent=sent[part], own=own[part], mean=mean[part])
            update = self.rule.update(stored[layer.slot.name], exchange)
            _view(buffer, layer.slot).copy_(update.output)
            self.stage(_Commit(self, layer.slot.name, update.stored))

    def _verify_agreement(self, plan: _BucketPlan, initialised_now: tuple[LayerSlot, ...], fingerprint: int) -> None:
        """Every rank must agree on each layer's k and on which layers are initialised densely
        this step: both set the sizes of the collectives. They can only differ when ranks were
        given different ``layer_densities`` or loaded inconsistent checkpoints; checked once per
        layout (and again after ``load_state_dict`` / ``set_layer_densities``)."""
        fresh = {slot.name for slot in initialised_now}
        text = ";".join(f"{layer.slot.name}:{layer.k}:{layer.slot.name in fresh}" for layer in plan.sparse)
        mine = torch.tensor([zlib.crc32(text.encode("utf-8"))], dtype=torch.int64)
        everyone = self.transport.allgather(mine, traffic=None)
        if not bool((everyone == everyone[0]).all()):
            raise ValueError(
                "gcomp: ranks disagree on the top-k layers of a bucket (per-layer k or which layers hold "
                "feedback state): were layer_densities or checkpoints different on different ranks? "
                f"checksums per rank {everyone.flatten().tolist()}"
            )
        self._agreed_layouts.add(fingerprint)


@dataclass
class _Commit:
    """End-of-step replacement of one layer's feedback tensors."""

    state: TopKState
    layer: str
    tensors: dict[str, torch.Tensor]

    def __call__(self) -> None:
        for key, tensor in self.tensors.items():
            self.state.set_layer_tensor(self.layer, key, tensor)


@dataclass
class _Forget:
    """End-of-step removal of the feedback state of a layer that is now sent dense."""

    state: TopKState
    layer: str
    keys: tuple[str, ...]

    def __call__(self) -> None:
        tensors = self.state.layer_state.get(self.layer, {})
        for key in self.keys:
            tensors.pop(key, None)


def _view(flat: torch.Tensor, slot: LayerSlot) -> torch.Tensor:
    return flat[slot.offset : slot.offset + slot.numel]


def _write(buffer: torch.Tensor, slots: tuple[LayerSlot, ...], values: torch.Tensor) -> None:
    """Copy consecutive segments of ``values`` into the slots of ``buffer``."""
    position = 0
    for slot in slots:
        _view(buffer, slot).copy_(values[position : position + slot.numel])
        position += slot.numel


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


# PyTorch-style name for the (state, hook) pair.
topk_hook = comm_hook
