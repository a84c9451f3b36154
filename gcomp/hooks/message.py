"""The protocol every message-based method shares (top-k, quantization), written once.

A *message-based* method turns each compressed layer into bytes whose layout is fixed by the
layer's setting alone (top-k's ``k``, quantization's bit width), so every rank's message has the
same size and one allgather carries them all. What differs between methods is only the codec;
:class:`MessageState` runs the protocol around it:

1. Split the bucket's layers into *compressed* layers (those whose message is
   ``min_compression_rate`` times smaller than the dense layer) and *dense* leftovers. A compressed
   layer whose feedback rule has no state yet (EF21/EControl on their first compressed step) is
   averaged densely once to initialise its estimates.
2. Per compressed layer the feedback rule (:mod:`gcomp.feedback`) says what to send, e.g.
   ``g + e`` for EF14 or ``g - g_i`` for EF21.
3. Pack this rank's message and decode it again, so sender and receivers use the same (rounded)
   values in their feedback state.
4. **Collective 1**: one allreduce, in the bucket's dtype, of ``[dense leftovers | gradients of
   layers initialised this step | health flag]``. The flag is non-finite when this rank's
   gradients or its *decoded message* are (a value that overflowed the wire format), so every rank
   skips the step together, without a host read before the collective.
5. **Collective 2**: one allgather of the packed messages (their contents differ between ranks,
   so they cannot be summed by an allreduce). Decode all messages in rank order into one
   accumulator, scaled by ``1 / world``: bitwise the same on every rank, so replicated estimates
   stay identical.

   Steps 3 and 5 are the *exchange strategy* (:mod:`gcomp.hooks.exchange`), chosen by the
   ``exchange`` setting: the allgather above, or (top-k) shared indices, where a cyclic leader
   broadcasts its top-k indices before step 4 and every rank's values at those indices are summed
   inside collective 1 itself.
6. The rule turns ``(own, mean)`` into new state (staged: committed at the end of the step unless
   some bucket was non-finite) and the averaged gradient written into the bucket.

The codec interface a subclass implements (all per layer, plain Python settings):

- :meth:`MessageState.layer_setting`: the setting of a layer (a per-layer override or the default);
- :meth:`MessageState.message_bytes`: bytes of a layer's message at that setting;
- :meth:`MessageState.setting_label`: how the traffic report names the setting;
- :meth:`MessageState.pack` / :meth:`MessageState.unpack_add_`: the codec itself, over the flat
  message input of all compressed layers of a bucket;
- :attr:`MessageState.decode_dtype`: the dtype decoded values are accumulated in (``None``: the
  message input's own dtype).
"""
from __future__ import annotations

import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import AbstractSet, Any, ClassVar, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..comm import CommWorker, check_agreement
from ..feedback import ERROR, ESTIMATE, LOCAL_ESTIMATE, MOMENTUM, Exchange, FeedbackRule, make_feedback_rule
from ..metrics import TrafficStats
from .base import HookState
from .exchange import AllgatherExchange, CompressedLayers, MessageExchange
from .layout import BucketLayout, LayerSlot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MessageLayer:
    """A layer sent as a message, with its setting and its share of the packed message."""

    slot: LayerSlot
    setting: Any  # what the codec needs per layer (top-k: k; quantization: bits)
    label: str  # the setting as the traffic report shows it ("density=0.01", "bits=4")
    message_bytes: int  # this layer's bytes inside the bucket's message (padding included)


@dataclass(frozen=True)
class MessagePlan:
    """How one bucket layout is reduced: layers sent dense, and layers sent as messages."""

    dense: tuple[LayerSlot, ...]
    compressed: tuple[MessageLayer, ...]


class MessageState(HookState):
    """Base class of hooks that send one packed message per bucket (through an allgather, or a
    strategy of :mod:`gcomp.hooks.exchange` given as ``exchange``).

    Subclasses implement the codec interface (see the module docstring) and extend
    :meth:`config`; the feedback rule, the dense/compressed split, collective 1, the health
    flag and the staged state updates live here, the compressed layers' exchange in the strategy.
    """

    # Every tensor name a rule may store; the chosen rule uses a subset (see gcomp.feedback).
    replicated_tensors = (ESTIMATE,)
    per_rank_tensors = (ERROR, LOCAL_ESTIMATE, MOMENTUM)
    gradient_valued_tensors = (ERROR, LOCAL_ESTIMATE, MOMENTUM, ESTIMATE)
    # What check_agreement calls the per-layer settings when ranks disagree about them.
    agreement_topic: ClassVar[str] = "the compressed layers of a bucket (per-layer setting, layers holding feedback state)"
    # Dtype decoded messages are accumulated in; None: the dtype of the message input.
    decode_dtype: ClassVar[Optional[torch.dtype]] = None

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        feedback: str,
        eta: float,
        momentum: float,
        warmup_steps: int,
        min_compression_rate: float,
        estimate_start: str = "dense",
        worker: Optional[CommWorker] = None,
        exchange: Optional[MessageExchange] = None,
        hierarchical: Union[str, bool] = "auto",
    ) -> None:
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) or not (
            math.isfinite(min_compression_rate) and min_compression_rate > 0
        ):
            raise ValueError(f"min_compression_rate must be a finite number > 0 (default 2); got {min_compression_rate!r}")
        rule = make_feedback_rule(feedback, eta=eta, momentum=momentum, start=estimate_start)
        super().__init__(process_group, warmup_steps=warmup_steps, worker=worker, hierarchical=hierarchical)
        self.feedback = feedback
        self.eta = float(eta)
        self.momentum = float(momentum)
        self.min_compression_rate = float(min_compression_rate)
        self.estimate_start = estimate_start
        self.rule: FeedbackRule = rule
        self.exchange: MessageExchange = exchange if exchange is not None else AllgatherExchange()
        self.exchange.check_codec(self)
        # Layouts whose split into compressed / initialised layers all ranks have confirmed.
        self._agreed_layouts: set[int] = set()

    def feedback_config(self) -> dict[str, Any]:
        """The feedback rule's and the split's hyperparameters, for :meth:`config`."""
        out: dict[str, Any] = {"feedback": self.feedback, "eta": self.eta, "momentum": self.momentum,
                               "min_compression_rate": self.min_compression_rate}
        if self.rule.needs_dense_init:  # only rules with estimates have a start (EF14 checkpoints load as before)
            out["estimate_start"] = self.estimate_start
        return out

    def set_preconditioner(self, precondition: Any, parameters: Any = None) -> None:
        """As :meth:`HookState.set_preconditioner`; warns when EF21-SGDM's momentum would average a
        direction that averages gradients already (two momenta in a row: on the deep CharLM +17 %
        loss against +4 % with one, benchmarks/RESULTS.md §3i)."""
        super().set_preconditioner(precondition, parameters)
        if self.preconditioner is None or self.rule.name != "ef21-sgdm" or self.momentum == 0:
            return
        hint = self.preconditioner.single_momentum_hint()
        if hint is not None:
            logger.warning("gcomp: feedback='ef21-sgdm' averages %s, which average gradients already (two momenta in a row "
                           "train worse); for one, use %s", self.preconditioner.sends, hint)

    def settings_changed(self) -> None:
        super().settings_changed()
        self._agreed_layouts.clear()

    # ------------------------------------------------------------------ the codec interface
    @abstractmethod
    def layer_setting(self, slot: LayerSlot) -> Any:
        """The codec's setting for this layer (its override, else the method's default)."""

    @abstractmethod
    def message_bytes(self, numel: int, setting: Any) -> int:
        """Bytes of one layer's message at ``setting`` (what the compression rule compares)."""

    @abstractmethod
    def setting_label(self, slot: LayerSlot, setting: Any) -> str:
        """The layer's setting as the per-layer traffic report shows it."""

    @abstractmethod
    def pack(self, sent: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], settings: Sequence[Any],
             layers: Sequence[MessageLayer], step: int) -> torch.Tensor:
        """This rank's uint8 message for the layers ``sent[offsets[l] : offsets[l] + numels[l]]``."""

    @abstractmethod
    def unpack_add_(self, out: torch.Tensor, messages: torch.Tensor, offsets: Sequence[int], numels: Sequence[int],
                    settings: Sequence[Any], weight: float) -> None:
        """``out += weight * decode(message)`` for every message (one, or one per row), in row order."""

    # ------------------------------------------------------------------ the protocol
    def _build_plan(self, layout: BucketLayout, dense_layers: Optional[AbstractSet[str]] = None) -> MessagePlan:
        """``dense_layers``: layers sent dense whatever their setting (default: the state's own, see
        :meth:`HookState.set_dense_layers`; the time-aware choice passes an empty set to see which
        layers *could* be compressed)."""
        forced = self.dense_layers if dense_layers is None else dense_layers
        dense_element = torch.finfo(layout.dtype).bits // 8  # dense layers travel in the bucket's dtype
        dense: list[LayerSlot] = []
        compressed: list[MessageLayer] = []
        for slot in layout.layers:
            if slot.numel == 0 or slot.name in forced:
                dense.append(slot)
                continue
            setting = self.layer_setting(slot)
            message_bytes = self.message_bytes(slot.numel, setting)
            if worth_compressing(message_bytes, slot.numel * dense_element, self.min_compression_rate):
                compressed.append(MessageLayer(slot, setting, self.setting_label(slot, setting), message_bytes))
            else:
                dense.append(slot)
        return MessagePlan(dense=tuple(dense), compressed=tuple(compressed))

    def _stored(self, slot: LayerSlot, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The rule's tensors of this layer that exist and fit (stale ones are forgotten)."""
        found = {}
        for key in self.rule.per_rank_tensors + self.rule.replicated_tensors:
            tensor = self.store.get(slot.name, key, (slot.numel,), dtype, device)
            if tensor is not None:
                found[key] = tensor
        return found

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        plan: MessagePlan = self.plan_for(layout, self._build_plan)
        world = self.codec_transport.world_size
        device = buffer.device
        dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
        half_bucket = buffer.dtype in (torch.float16, torch.bfloat16)
        local = buffer.to(dtype, copy=True)  # this rank's gradients; the buffer receives the result

        stored = {layer.slot.name: self._stored(layer.slot, dtype, device) for layer in plan.compressed}
        compressed = tuple(layer for layer in plan.compressed if self.rule.is_initialised(stored[layer.slot.name]))
        initialised_now = tuple(layer.slot for layer in plan.compressed if not self.rule.is_initialised(stored[layer.slot.name]))
        fingerprint = layout.fingerprint
        if fingerprint not in self._agreed_layouts:
            # The per-layer settings and which layers are initialised densely this step set the
            # sizes of both collectives: they can only differ after inconsistent checkpoints.
            # (With estimate_start="zero" no layer is initialised densely, but a layer holding its
            # replicated estimate on one rank only would still split the ranks' parameters.)
            fresh = {layer.slot.name for layer in plan.compressed if not self.rule.holds_state(stored[layer.slot.name])}
            check_agreement(
                self.codec_transport, self.worker.runtime, self.agreement_topic,
                [(layer.slot.name, layer.setting, layer.slot.name in fresh) for layer in plan.compressed], device,
                hint="Were checkpoints of different runs loaded on different ranks?",
            )
            self._agreed_layouts.add(fingerprint)

        with TrafficStats.timed(self.traffic, "compress"):
            # What this rank sends compressed, and its decoded message (the values receivers see).
            batch = CompressedLayers.of(compressed)
            sent = local.new_empty(batch.numel)
            for layer, offset in zip(compressed, batch.offsets):
                sent.narrow(0, offset, layer.slot.numel).copy_(self.rule.message_input(layer.slot.flat(local), stored[layer.slot.name]))
            outgoing = self.exchange.outgoing(self, sent, batch, step, buffer.dtype) if compressed else None
            own = outgoing.own if outgoing is not None else torch.zeros_like(sent)
            summed = outgoing.summed if outgoing is not None and outgoing.summed is not None else buffer.new_empty(0)

            # Collective 1: [dense leftovers | gradients of layers initialised this step | values
            # the exchange sums here | flag], in the bucket's dtype.
            exact = plan.dense + initialised_now
            exact_numel = sum(slot.numel for slot in exact)
            message = buffer.new_empty(exact_numel + summed.numel() + 1)
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
            message.narrow(0, exact_numel, summed.numel()).copy_(summed)
            # Health flag without a host read: 0 when this rank's gradients and decoded message are
            # finite, NaN otherwise (inf * 0). Stored state is always finite (non-finite steps are
            # never committed), so these two sums see every way this step can go non-finite.
            health = local.sum(dtype=torch.float64) + own.sum(dtype=torch.float64)
            message.narrow(0, exact_numel + summed.numel(), 1).copy_((health * 0).reshape(1))
            if half_bucket:
                message.div_(world)  # as DDP does for half precision: the sum stays in range

        self.codec_transport.allreduce_sum_(message, self.traffic)
        for slot in plan.dense:
            nbytes = slot.numel * buffer.element_size()
            self.traffic.record_layer(slot.name, slot.shape, "dense", nbytes, nbytes)
        for slot in initialised_now:
            nbytes = slot.numel * buffer.element_size()
            self.traffic.record_layer(slot.name, slot.shape, "dense (init)", nbytes, nbytes)

        means = message.narrow(0, 0, exact_numel + summed.numel())
        if not half_bucket:
            means.div_(world)
        mean_exact = means.narrow(0, 0, exact_numel)
        position = 0
        for slot in exact:
            slot.flat(buffer).copy_(mean_exact.narrow(0, position, slot.numel))
            position += slot.numel
        if not self.worker.runtime.all_finite(message):
            # Some rank had inf/NaN, or a value that overflowed the wire format: every rank sees
            # the same non-finite sum, so every rank skips the exchange, leaves its state
            # untouched and hands GradScaler a non-finite bucket.
            return self._skip(buffer, local, layout, step, compressed)

        all_keys = self.rule.per_rank_tensors + self.rule.replicated_tensors
        for slot, keep in kept_dense:
            self.store.stage(slot.name, keep, forget=all_keys)
        position = sum(slot.numel for slot in plan.dense)
        for slot in initialised_now:
            mean = mean_exact.narrow(0, position, slot.numel).to(dtype)
            self.store.stage(slot.name, self.rule.dense_init(slot.flat(local), mean))
            position += slot.numel

        if compressed:
            summed_mean = means.narrow(0, exact_numel, summed.numel()) if outgoing.summed is not None else None
            mean = self.exchange.mean(self, outgoing, summed_mean, sent, batch)
            if mean is None:  # the exchanged values overflowed their dtype: as a non-finite flag
                return self._skip(buffer, local, layout, step, compressed)
            if self.observer is not None:  # only finite steps are profiled
                for layer, offset in zip(compressed, batch.offsets):
                    self.observer(layer.slot.name, layer.slot.shape, sent.narrow(0, offset, layer.slot.numel))
            self.exchange.record_layers(self, batch, step, buffer.element_size())
            with TrafficStats.timed(self.traffic, "decompress"):
                own, mean = own.to(dtype), mean.to(dtype)  # no copy when the codec decodes in dtype
                for layer, offset in zip(compressed, batch.offsets):
                    part = (offset, layer.slot.numel)
                    exchange = Exchange(
                        gradient=layer.slot.flat(local), sent=sent.narrow(0, *part), own=own.narrow(0, *part), mean=mean.narrow(0, *part)
                    )
                    update = self.rule.update(stored[layer.slot.name], exchange)
                    layer.slot.flat(buffer).copy_(update.output)
                    self.store.stage(layer.slot.name, update.stored)
        return buffer

    def _skip(self, buffer: torch.Tensor, local: torch.Tensor, layout: BucketLayout, step: int,
              compressed: Sequence[MessageLayer]) -> torch.Tensor:
        """Every rank found the same sums non-finite: drop the step's state, hand back NaNs."""
        self.skip_step(local, layout, step)
        for layer in compressed:
            layer.slot.flat(buffer).fill_(math.nan)
        return buffer


def worth_compressing(message_bytes: int, dense_bytes: int, min_compression_rate: float) -> bool:
    """The split rule of :class:`MessageState` (and of the cost model): a layer is sent as a
    message only if the message is ``min_compression_rate`` times smaller than the dense layer."""
    return message_bytes * min_compression_rate < dense_bytes
