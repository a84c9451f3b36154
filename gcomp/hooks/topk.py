"""Top-k sparsification with error feedback (EF14, EF21, EF21-SGDM or EControl) as a DDP comm hook.

Follow one bucket through the protocol top-k shares with quantization
(:class:`gcomp.hooks.message.MessageState`, where each step is written once):

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

   With ``exchange="shared_indices"`` (ScaleCom) the supports are made equal instead: before
   step 4 a leader rank (``step mod world``) broadcasts the indices of *its* top-k, every rank
   sends its own values at those indices, and the values are summed inside collective 1. Nothing
   is gathered, so no rank's bytes grow with the world size (:mod:`gcomp.hooks.exchange`).
6. The rule turns ``(own, mean)`` into new state (staged: committed at the end of the step unless
   some bucket was non-finite) and the averaged gradient written into the bucket.

Dense leftovers travel in the bucket's dtype (as DDP would send them); for float16/bfloat16
buckets they are divided by the world size before the sum, as DDP does, so the sum cannot
overflow where the mean fits.

Tuning guide:

- ``density``: fraction of each layer's entries sent (0.001-0.01 is typical for top-k). With the
  allgather every rank *receives* ``world - 1`` messages, so top-k only beats a dense allreduce in
  bytes when the message is smaller than about ``2 / world`` of the layer.
- ``exchange``: ``"allgather"`` (default) sends each rank's own top-k; every rank sends
  ``m = k (value + index bytes)`` and receives ``(W - 1) m`` per layer. ``"shared_indices"``
  sends the top-k *of one leader rank* (cyclic): the leader broadcasts ``k`` indices (bit-packed
  or a bitmap, as in the message) and every rank's ``k`` values are summed by the allreduce the
  step issues anyway, so a rank sends about ``k value + k index / W`` and receives about
  ``k value + k index (W - 1) / W`` bytes per layer whatever ``W``. Which is cheaper
  (``gcomp.hooks.topk.topk_step_cost`` prices both for your model and link, from
  ``gcomp.comm.cost``): in bytes, shared indices from ``W = 2`` on (the indices cross the wire
  once, not once per receiver), and the gap grows linearly with ``W``; in modelled time they tie
  at ``W = 2`` and win above, since the values ride in the allreduce issued anyway and a tree
  broadcast takes ``log2 W`` latencies where the ring allgather takes ``W - 1``. With a
  ``value_dtype`` narrower than the model's dtype the values need an allreduce of their own
  (three collectives per bucket instead of two): on a latency-bound link with few ranks keep the
  model's dtype. The price of shared indices is accuracy: every rank's update follows the leader's
  support, and entries that matter only on other ranks wait in their error-feedback buffers until
  those ranks lead (``benchmarks/RESULTS.md`` §13 measures the loss). Prefer them when ``W`` is
  large or the link slow; keep the allgather for small ``W`` on fast links, where it costs little.
- ``feedback``: ``"ef14"`` (default) trained best in every measured setting (AdamW with a constant
  or cosine rate, two models, 1-5 % density: ``benchmarks/RESULTS.md`` §3, §3b, §3c, §4d) and keeps
  one buffer per layer. ``"ef21"`` keeps one estimate replicated on every rank, which its theory
  makes exact on heterogeneous data, but at 1 % density each entry of that estimate is refreshed
  about every 100 steps, and AdamW turns the stale entries into full-size steps (+9.6 % against
  EF14's +4.2 % with a cosine rate, §3b); it needs one dense start. ``"econtrol"`` adds a damped
  error feedback to EF21 (tune ``eta`` in {0.001, 0.01, 0.05, 0.1}; 0.5 diverged; ``eta = 0`` is
  EF21); ``"ef21-sgdm"`` makes EF21 track a local momentum of the gradients (``momentum`` 0.9),
  the remedy for minibatch noise with plain SGD (``momentum = 0`` is EF21).
- ``value_dtype``: ``"float16"``/``"bfloat16"`` halve the value bytes; the rounding error is fed back.
- ``min_compression_rate``: raise it (e.g. to the world size) to keep layers dense unless the
  sparse message really saves bytes on the receiving side too.
- ``warmup_steps``: dense sync steps first (lets DDP rebuild its buckets and the model leave its
  initial transient).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .. import ops
from ..comm import CommWorker
from ..comm.cost import Collective, CommunicationCost, Link, communication_cost
from ..compress.sparse import sparse_message_layout
from .base import make_hook
from .exchange import CompressedLayers, LayerWire, make_exchange
from .layout import LayerSlot
from .message import MessageLayer, MessageState, worth_compressing

VALUE_DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")


class TopKState(MessageState):
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
        estimate_start: how EF21 / EF21-SGDM / EControl estimates start: ``"dense"`` (one exact
            average of the layer, one step at full bytes) or ``"zero"`` (from zero on every rank,
            every step compressed: suits a compressor that sends every entry, such as one bit).
        layer_densities: per-layer density overrides ``{parameter name: density}`` (the adaptive
            controller sets these).
        exchange: how the sparse layers travel: ``"allgather"`` (each rank's own top-k) or
            ``"shared_indices"`` (a cyclic leader's top-k indices, every rank's values summed; bytes
            per rank independent of the world size). See the tuning guide above.
        worker: share a communication thread with another state in the same process.
        hierarchical: ``"auto"`` (default), ``True`` or ``False``: sum densely inside each node
            and exchange messages among one leader per node (see :class:`~gcomp.PowerSGDState`).

    Example::

        state = gcomp.TopKState(density=0.01, feedback="ef14", warmup_steps=100)
        ddp_model.register_comm_hook(state, gcomp.topk_hook)
        # or, for many ranks: gcomp.register(ddp_model, "topk", density=0.01, exchange="shared_indices")
    """

    method = "topk"
    agreement_topic = "the top-k layers of a bucket (per-layer k, layers holding feedback state)"

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        density: float = 0.01,
        feedback: str = "ef14",
        eta: float = 0.1,
        momentum: float = 0.9,
        value_dtype: Union[str, torch.dtype] = "float32",
        warmup_steps: int = 10,
        min_compression_rate: float = 2.0,
        estimate_start: str = "dense",
        layer_densities: Optional[Mapping[str, float]] = None,
        exchange: str = "allgather",
        worker: Optional[CommWorker] = None,
        hierarchical: Union[str, bool] = "auto",
    ) -> None:
        _check_density("density", density)
        value_dtype_name = _value_dtype_name(value_dtype)
        super().__init__(
            process_group, feedback=feedback, eta=eta, momentum=momentum, warmup_steps=warmup_steps,
            min_compression_rate=min_compression_rate, estimate_start=estimate_start, worker=worker, exchange=make_exchange(exchange),
            hierarchical=hierarchical,
        )
        self.density = float(density)
        self.value_dtype_name = value_dtype_name
        self.value_dtype: torch.dtype = getattr(torch, value_dtype_name)
        self.layer_densities: dict[str, float] = {}
        if layer_densities:
            self.set_layer_densities(layer_densities)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "density": self.density,
            **self.feedback_config(),
            "value_dtype": self.value_dtype_name,
            "exchange": self.exchange.name,
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

    # ------------------------------------------------------------------ the codec (setting: k)
    def layer_setting(self, slot: LayerSlot) -> int:
        return topk_k(slot.numel, self.layer_densities.get(slot.name, self.density))

    def message_bytes(self, numel: int, setting: int) -> int:
        return sparse_message_layout([numel], [setting], self.value_dtype).message_bytes

    def setting_label(self, slot: LayerSlot, setting: int) -> str:
        return f"density={self.layer_densities.get(slot.name, self.density):g}"

    def pack(self, sent: torch.Tensor, offsets: Sequence[int], numels: Sequence[int], settings: Sequence[int],
             layers: Sequence[MessageLayer], step: int) -> torch.Tensor:
        return ops.topk_pack(sent, offsets, numels, settings, self.value_dtype)

    def unpack_add_(self, out: torch.Tensor, messages: torch.Tensor, offsets: Sequence[int], numels: Sequence[int],
                    settings: Sequence[int], weight: float) -> None:
        ops.sparse_unpack_add_(out, messages, offsets, numels, settings, self.value_dtype, weight)

    # ------------------------------------------------------------------ shared indices (IndexCodec)
    def pack_indices(self, sent: torch.Tensor, batch: CompressedLayers) -> torch.Tensor:
        """The index sections of this rank's packed message, back to back: the leader's broadcast."""
        packed = ops.topk_pack(sent, batch.offsets, batch.numels, batch.settings, self.value_dtype)
        sections = sparse_message_layout(batch.numels, batch.settings, self.value_dtype).layers
        return torch.cat([packed.narrow(0, section.index_offset, section.index_bytes) for section in sections])

    def index_bytes(self, numel: int, setting: int) -> int:
        return sparse_message_layout([numel], [setting], self.value_dtype).layers[0].index_bytes

    def value_bytes(self, numel: int, setting: int) -> int:
        return setting * (torch.finfo(self.value_dtype).bits // 8)

    def unpack_indices(self, message: torch.Tensor, batch: CompressedLayers) -> torch.Tensor:
        """Absolute positions selected by an index message, through the message codec itself: the
        index sections go back into an otherwise empty message, which the native ops decode (and
        validate: a corrupted broadcast raises on every rank alike, as all hold the same bytes)."""
        layout = sparse_message_layout(batch.numels, batch.settings, self.value_dtype)
        expected = sum(section.index_bytes for section in layout.layers)
        if message.numel() != expected:
            raise ValueError(f"index message has {message.numel()} bytes, the layers need {expected}")
        template = message.new_zeros(layout.message_bytes)
        position = 0
        for section in layout.layers:
            template.narrow(0, section.index_offset, section.index_bytes).copy_(message.narrow(0, position, section.index_bytes))
            position += section.index_bytes
        _, indices = ops.sparse_unpack(template, batch.offsets, batch.numels, batch.settings, self.value_dtype)
        return indices


def topk_k(numel: int, density: float) -> int:
    """Entries a layer of ``numel`` sends at ``density``: ``max(1, round(density * numel))``."""
    return min(numel, max(1, round(density * numel)))


def topk_step_collectives(
    buckets: Sequence[Sequence[int]],
    *,
    density: float = 0.01,
    exchange: str = "allgather",
    value_dtype: Union[str, torch.dtype] = "float32",
    bucket_dtype: torch.dtype = torch.float32,
    min_compression_rate: float = 2.0,
) -> list[Collective]:
    """The collectives one compressed sync step of top-k issues, bucket after bucket, for DDP
    buckets given as the element counts of their parameters (``[[numel, ...], ...]``).

    The steady state: warm-up over and every sparse layer initialised (EF21/EControl/EF21-SGDM
    average a layer densely once, on its first compressed step). The split into sparse and dense
    layers is the hook's own (:func:`gcomp.hooks.message.worth_compressing`), and the sizes are
    those of the wire format, so :func:`gcomp.comm.cost.communication_cost` of this list gives
    ``stats()``'s bytes exactly.
    """
    _check_density("density", density)
    value = getattr(torch, _value_dtype_name(value_dtype))
    strategy = make_exchange(exchange)
    dense_element = torch.finfo(bucket_dtype).bits // 8
    value_size = torch.finfo(value).bits // 8
    collectives: list[Collective] = []
    for numels in buckets:
        exact_numel, wires = 0, []
        for numel in numels:
            numel = int(numel)
            if numel == 0:
                continue
            k = topk_k(numel, density)
            layout = sparse_message_layout([numel], [k], value)
            if worth_compressing(layout.message_bytes, numel * dense_element, min_compression_rate):
                wires.append(LayerWire(layout.message_bytes, k * value_size, layout.layers[0].index_bytes))
            else:
                exact_numel += numel
        exact_bytes = (exact_numel + 1) * dense_element  # and the health flag
        if wires:
            collectives += strategy.bucket_collectives(exact_bytes, wires, value == bucket_dtype)
        else:
            collectives.append(Collective("allreduce", exact_bytes))
    return collectives


def topk_step_cost(
    buckets: Sequence[Sequence[int]],
    world: int,
    link: Link,
    *,
    algorithms: Optional[dict[str, str]] = None,
    **options: Any,
) -> CommunicationCost:
    """Bytes per rank and modelled seconds of one compressed top-k step (``options``: those of
    :func:`topk_step_collectives`; ``algorithms`` as for :func:`gcomp.comm.cost.communication_cost`).

    Example: which exchange is cheaper for 64 ranks on 10 Gbit/s with 20 us per message::

        buckets = [[p.numel() for p in model.parameters()]]
        for exchange in ("allgather", "shared_indices"):
            print(exchange, topk_step_cost(buckets, 64, Link(1.25e9, 20e-6), exchange=exchange))
    """
    return communication_cost(topk_step_collectives(buckets, **options), world, link, algorithms)


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
