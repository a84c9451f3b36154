"""The DDP adapter every gcomp hook shares: bucket -> layers -> codec -> collectives -> bucket.

A gcomp hook is ``hook(state, bucket) -> Future``. On the autograd thread it only reads the
bucket's layout, stamps it with the current sync step and queues the reduction on the state's
communication thread (:mod:`gcomp.comm.worker`), which

1. proves once that every rank runs the same method, hyperparameters and per-layer overrides,
   and once per new bucket layout that every rank holds the same layers
   (:func:`gcomp.comm.agreement.check_agreement`: a ``ValueError`` on every rank, never a hang);
2. averages densely during the first ``warmup_steps`` sync steps, then calls the subclass's
   :meth:`HookState.reduce` (the codec: compression + collectives + decompression);
3. at the end of each step commits the state updates the codec staged in the
   :class:`~gcomp.hooks.store.LayerStore`, or drops them if any bucket of the step was non-finite
   (:class:`~gcomp.hooks.step.StepLifecycle`).

The parts, each small: :class:`~gcomp.hooks.layout.ParameterNames` (stable layer names),
:class:`~gcomp.hooks.store.LayerStore` (per-layer tensors, commit, checkpoint),
:class:`~gcomp.hooks.step.StepLifecycle`, :class:`~gcomp.comm.Transport` (collectives, bytes),
:class:`~gcomp.comm.CommWorker` (the thread; streams and futures via
:class:`~gcomp.comm.DeviceRuntime`), :class:`~gcomp.metrics.TrafficStats` (what was sent).

Devices: every tensor a codec creates is derived from the bucket (``new_empty``, ``*_like``) or
names the bucket's device; shared random numbers are drawn on the CPU from a seeded generator and
copied, so they are bitwise identical on every rank whatever the device.
"""
import logging
import math
import warnings
import zlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..comm import CommWorker, Transport, check_agreement
from ..comm.topology import NodeGroups, check_hierarchical_option, discover
from ..metrics import TrafficStats
from .hierarchical import reduce_within_nodes
from .layout import BucketLayout, ParameterNames, check_bucket_buffer
from .step import StepLifecycle
from .store import LayerStore

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 2


class HookState(ABC):
    """Base class of every gcomp hook state.

    Subclasses set ``method``, implement :meth:`reduce` (and extend :meth:`config`), and list the
    names of their per-layer tensors in ``replicated_tensors`` / ``per_rank_tensors``, and among
    those the ones measured in gradient units (error-feedback residuals, gradient estimates,
    momenta) in ``gradient_valued_tensors``: :meth:`set_gradient_scale` rescales them when the loss
    scale changes.
    """

    method: ClassVar[str] = "base"
    replicated_tensors: ClassVar[tuple[str, ...]] = ()
    per_rank_tensors: ClassVar[tuple[str, ...]] = ()
    gradient_valued_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        warmup_steps: int = 0,
        worker: Optional[CommWorker] = None,
        hierarchical: Union[str, bool] = "auto",
    ) -> None:
        self.lifecycle = StepLifecycle(warmup_steps)
        self.hierarchical = check_hierarchical_option(hierarchical)
        # ``transport``: every rank (agreement checks, the flat path). ``codec_transport``: the group the
        # codec runs over, the same in the flat path, the node leaders' on the hierarchical path
        # (None on the other ranks, which never run the codec). Both known after the first hook call.
        self.transport = Transport(process_group)
        self.codec_transport: Optional[Transport] = self.transport
        self.node_groups: Optional[NodeGroups] = None
        self.path_reason = "not decided before the first step"
        self.worker = worker if worker is not None else CommWorker(name=f"gcomp-{self.method}")
        self.names = ParameterNames()
        self.store = LayerStore(self.replicated_tensors, self.per_rank_tensors, self.gradient_valued_tensors)
        self.traffic = TrafficStats()
        self._layouts: dict[tuple[int, int, int, int], BucketLayout] = {}
        self._verified_layouts: set[int] = set()
        self._config_verified = False
        self._plans: dict[int, Any] = {}  # bucket layout fingerprint -> the subclass's plan
        self._first_call = True
        self._steps_in_process = 0  # sync steps handed over since this process started (autograd thread)
        # Optional plug-ins, both called on the communication thread: ``observer(name, shape,
        # tensor)`` sees each compressed layer's input to the compressor (for error profiling), and
        # ``controller.on_step_end(steps)`` runs after every completed step (adaptive settings).
        self.observer: Optional[Callable[[str, tuple[int, ...], torch.Tensor], None]] = None
        self.controller: Optional[Any] = None
        # The time-aware choice (gcomp.adaptive.timeaware): it times the buckets of the steps it
        # asks for (``wants_timing(step)``, ``record_bucket``) and decides at step ends
        # (``on_step_end(step)``), before ``controller``. ``dense_layers``: layers it sends dense
        # whatever their per-layer setting.
        self.time_controller: Optional[Any] = None
        self.dense_layers: frozenset[str] = frozenset()
        # Loss scale of the gradients DDP hands over (see set_gradient_scale): the one asked for
        # next, and the one the stored gradient-valued tensors are in (None: not known yet).
        self._requested_gradient_scale: Optional[float] = None
        self._gradient_scale: Optional[float] = None
        # Compress after preconditioning (gcomp.precondition): None, or the rule that turns each
        # rank's gradients into its local optimizer direction before anything else happens.
        self.preconditioner: Optional[Any] = None
        self._optimizer_guard: Optional[Any] = None

    # ------------------------------------------------------------------ to implement in subclasses
    def config(self) -> dict[str, Any]:
        """Hyperparameters that must agree on every rank (plain values), overrides included."""
        out: dict[str, Any] = {"warmup_steps": self.warmup_steps}
        if self.preconditioner is not None:
            out["precondition"] = self.preconditioner.config()
        return out

    def layer_overrides(self) -> Mapping[str, Any]:
        """Per-layer settings given by name (``layer_ranks``, ``layer_densities``)."""
        return {}

    def set_layer_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Replace the per-layer settings (methods without any accept only an empty mapping)."""
        if overrides:
            raise ValueError(f"method {self.method!r} has no per-layer settings; got {dict(overrides)}")

    @abstractmethod
    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        """Average ``buffer`` over ranks (compressed). Runs on the communication thread; may block.

        Must issue the same collectives in the same order on every rank, write the averaged
        gradient into ``buffer`` (or return a tensor of its shape), create tensors on
        ``buffer.device`` only, and defer state updates with ``self.store.stage`` so they can be
        dropped if the step turns out non-finite.
        """

    def dense_from_step(self) -> Optional[int]:
        """The first sync step from which every bucket of this state is averaged plainly and the
        communication thread has nothing left to issue, so those steps may run as DDP's own
        allreduce (see :meth:`_runs_on_model_group`); None: not (yet) such a state."""
        return None

    def decided_settings(self) -> dict[str, Any]:
        """Settings decided while training (the time-aware choice) that must agree on every rank
        like the configuration; empty when there are none, so the agreement text stays as before."""
        out: dict[str, Any] = {}
        if self.dense_layers:
            out["dense_layers"] = sorted(self.dense_layers)
        if self.time_controller is not None:
            out["time_aware"] = self.time_controller.config_dict()
        return out

    def set_dense_layers(self, names: Iterable[str]) -> None:
        """Send these layers dense whatever their per-layer setting (the time-aware choice; call
        between steps, on every rank alike: the next step proves every rank holds the same)."""
        names = frozenset(names)
        if any(not isinstance(name, str) for name in names):
            raise TypeError(f"dense layers must be parameter names (str); got {sorted(map(repr, names))}")
        if names != self.dense_layers:
            self.dense_layers = names
            self.settings_changed()

    # ------------------------------------------------------------------ public interface
    @property
    def warmup_steps(self) -> int:
        return self.lifecycle.warmup_steps

    @property
    def step(self) -> int:
        """Sync steps handed over so far."""
        return self.lifecycle.started

    @property
    def layer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Committed per-layer tensors, ``{layer name: {tensor name: tensor}}`` (read-only use)."""
        return self.store.layers

    def attach(self, module: torch.nn.Module) -> "HookState":
        """Name layers after ``module``'s parameters (the DDP model or the module it wraps).
        ``gcomp.register`` does this; when the hook is registered the PyTorch way the names are
        found from the DDP model at the first step, so calling it is only needed for models that
        are not a ``DistributedDataParallel``."""
        self.names.learn(module)
        self._layouts.clear()
        self._config_verified = False
        return self

    def set_preconditioner(self, precondition: Any, parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """Send each rank's local AdamW direction, momentum buffer or Lion direction instead of its
        gradient (``"adamw"``, ``"momentum"``, ``"lion"``, or a :class:`gcomp.LocalAdamW`,
        :class:`gcomp.LocalMomentum` or :class:`gcomp.LocalLion`;
        see :mod:`gcomp.precondition`). Call before the first step, on
        every rank alike. ``parameters`` (the model's): an optimizer other than momentum-free SGD
        over them is refused at its first step."""
        from ..precondition import OptimizerGuard, make_preconditioner

        if self.lifecycle.started:
            raise RuntimeError("set_preconditioner must be called before the first step")
        self.preconditioner = make_preconditioner(precondition)
        if self.preconditioner is not None:
            self.store.per_rank = tuple(dict.fromkeys(self.store.per_rank + self.preconditioner.tensors))
        if self._optimizer_guard is not None:
            self._optimizer_guard.remove()
            self._optimizer_guard = None
        if self.preconditioner is not None and parameters is not None:
            self._optimizer_guard = OptimizerGuard(parameters, self.preconditioner)
        self._config_verified = False

    def stats(self) -> dict[str, Any]:
        """Cumulative traffic: ``steps``, ``bytes_sent``, ``bytes_received``, ``bytes_uncompressed``,
        ``compression_ratio`` (None until a step ran), ``seconds`` per phase and per-layer detail
        under ``layers`` (see :mod:`gcomp.metrics`)."""
        out = self.traffic.summary()
        out["method"] = self.method
        out["topology"] = self._path_description()
        out["state_bytes"] = self.memory_bytes()
        if self.time_controller is not None:
            out["time_aware"] = self.time_controller.summary()
        return out

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this state holds on the gradients' device, by kind: ``state`` (tensors carried
        from step to step) and ``workspace`` (buffers kept to avoid re-allocation)."""
        held = self.store.bases()
        spare = [t for t in self._workspace_tensors() if id(t) not in {id(b) for b in held}]
        return {"state": sum(_nbytes(t) for t in held), "workspace": sum(_nbytes(t) for t in spare)}

    def _workspace_tensors(self) -> list[torch.Tensor]:
        """Work buffers kept between steps (a subclass that keeps some lists them)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: tensors and plain values only (loads with ``weights_only=True``).
        Every rank saves its own; error-feedback residuals differ between ranks."""
        self.synchronize()
        return {
            "format_version": STATE_FORMAT_VERSION,
            "method": self.method,
            "config": self.config(),
            "world_size": self.transport.world_size if dist.is_initialized() else None,
            "step": self.lifecycle.started,
            "traffic": self.traffic.state_dict(),
            "layers": self.store.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "gradient_scale": self._gradient_scale,
            "overrides": dict(self.layer_overrides()),
            "topology": self._path_description(),
            "dense_layers": sorted(self.dense_layers),
            "time_aware": self.time_controller.state_dict() if self.time_controller is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Policy when the checkpoint does not match this run:

        - another method: ``ValueError`` (nothing sensible to keep);
        - other hyperparameters: a warning; per-layer tensors whose shapes no longer fit are
          dropped (and re-initialised identically on every rank) when the layer is next reduced;
        - another world size: replicated state is kept, per-rank error buffers are dropped, warning.
        """
        if not isinstance(state, dict) or "method" not in state:
            raise ValueError("load_state_dict expects a dict produced by a gcomp state's state_dict()")
        if state["method"] != self.method:
            raise ValueError(f"checkpoint holds state of method {state['method']!r}, this state is {self.method!r}")
        self.synchronize()
        if state.get("config") != self.config():
            warnings.warn(
                f"gcomp: checkpoint hyperparameters {state.get('config')} differ from {self.config()}; "
                "state that no longer fits is re-initialised",
                stacklevel=2,
            )
        saved_world = state.get("world_size")
        keep_per_rank = True
        if saved_world is not None and dist.is_initialized() and saved_world != self.transport.world_size:
            warnings.warn(
                f"gcomp: checkpoint from world size {saved_world} loaded into world size "
                f"{self.transport.world_size}; per-rank error buffers are reset, replicated state is kept",
                stacklevel=2,
            )
            keep_per_rank = False
        self.lifecycle.started = int(state["step"])
        self.traffic.load_state_dict(state.get("traffic", {}))
        self.store.load_state_dict(state.get("layers", {}), keep_per_rank)
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        saved_scale = state.get("gradient_scale")
        self._gradient_scale = float(saved_scale) if saved_scale is not None else None
        self._requested_gradient_scale = self._gradient_scale
        # Format 1 saved the overrides under the method's own option name.
        self.set_layer_overrides(state.get("overrides", state.get("layer_ranks", state.get("layer_densities", {}))))
        self.set_dense_layers(state.get("dense_layers", ()))
        if self.time_controller is not None and state.get("time_aware") is not None:
            self.time_controller.load_state_dict(state["time_aware"])

    def close(self) -> None:
        """Stop the communication thread (call before ``destroy_process_group``)."""
        self.worker.close()
        if self._optimizer_guard is not None:
            self._optimizer_guard.remove()
            self._optimizer_guard = None

    def set_gradient_scale(self, scale: float) -> None:
        """Declare the factor the coming backward passes multiply gradients by (with AMP:
        ``scaler.get_scale()``), before those passes; call it before every backward, or whenever
        the scale may have changed.

        Error-feedback buffers carry gradient-sized values from one step to the next. With
        ``GradScaler`` those are scaled gradients, and when the scaler changes its scale (halving
        it after an overflow, growing it every ``growth_interval`` steps) the stored buffers would
        be off by the ratio. On the next reduction the state multiplies them by
        ``new scale / old scale`` first (on the communication thread, in step order), so the
        feedback stays exact. The scale is saved with :meth:`state_dict`.
        """
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"set_gradient_scale expects a single number; got a tensor of shape {tuple(scale.shape)}")
            scale = float(scale.item())
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"set_gradient_scale expects a finite number > 0 (the loss scale); got {scale!r}")
        self._requested_gradient_scale = float(scale)

    # ------------------------------------------------------------------ helpers for subclasses
    def settings_changed(self) -> None:
        """Per-layer settings changed (call between steps, on every rank alike): plans are rebuilt
        and the new settings are proven equal on every rank before the next exchange."""
        self._plans.clear()
        self._config_verified = False

    def plan_for(self, layout: BucketLayout, build: Callable[[BucketLayout], Any]) -> Any:
        """The subclass's plan for ``layout`` (which layers are compressed how), built once per
        layout and settings."""
        key = layout.fingerprint
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build(layout)
        return plan

    def skip_step(self, gradients: torch.Tensor, layout: BucketLayout, step: int) -> None:
        """The all-reduced data of a bucket is non-finite (on every rank alike): drop this step's
        updates, and say which of this rank's layers held inf/NaN (one host read per layer, only
        on this path). A warning while the adaptive controller profiles (its window loses a
        step), else an info record: GradScaler overflows are routine."""
        self.lifecycle.mark_non_finite()
        bad = [slot.name for slot in layout.layers if not self.worker.runtime.all_finite(slot.flat(gradients))]
        level = logging.WARNING if self.observer is not None else logging.INFO
        if bad:
            logger.log(level, "gcomp: step %d is skipped on every rank: non-finite gradients on this rank in layers %s", step, bad)
        else:
            logger.log(level, "gcomp: step %d is skipped on every rank: non-finite values on another rank or on the wire", step)

    def dense_average_(self, buffer: torch.Tensor) -> torch.Tensor:
        """Plain averaging allreduce, in place (divide first: safe for half precision)."""
        buffer.div_(self.codec_transport.world_size)
        return self.codec_transport.allreduce_sum_(buffer, self.traffic)

    def shared_randn(self, shape: tuple[int, ...], keys: tuple[Any, ...], like: torch.Tensor) -> torch.Tensor:
        """Standard normal numbers seeded by ``keys`` alone, on ``like``'s device and dtype: drawn on
        the CPU (the same bits on every rank and device, no global RNG touched), then copied."""
        seed = zlib.crc32("|".join(str(k) for k in keys).encode("utf-8"))
        values = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32, device="cpu")
        return values.to(device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ the adapter
    def submit_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """What every gcomp hook does: queue this bucket's reduction, return its future."""
        buffer = bucket.buffer()
        check_bucket_buffer(buffer)
        if self._first_call:
            self._first_call = False
            self.transport.ensure_group()
            self._choose_path(buffer.device)
            if self.names.source == "none" and self.names.discover(self):
                logger.info("gcomp: %s state found its DDP model; layers are named after its parameters", self.method)
        layout = self._layout_for(bucket)
        is_last = bucket.is_last()
        steps_before = self._steps_in_process
        step = self.lifecycle.begin_bucket(is_last)
        if is_last:
            self._steps_in_process += 1
        scale = self._requested_gradient_scale  # read here: every bucket of a backward sees the same
        if self._runs_on_model_group(step, steps_before, layout):
            return self._average_on_model_group(buffer, layout, step, is_last, scale)
        # When the time-aware choice measures this step: the moment backward handed the bucket over.
        timing = self.time_controller is not None and self.time_controller.wants_timing(step)
        submitted = self.worker.runtime.mark(buffer.device) if timing else None
        return self.worker.submit(lambda: self._reduce_job(buffer, layout, step, is_last, scale, submitted), buffer.device)

    def _layout_for(self, bucket: dist.GradBucket) -> BucketLayout:
        params = bucket.parameters()
        key = (bucket.index(), bucket.buffer().numel(), id(params[0]), id(params[-1]))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = BucketLayout.from_bucket(bucket, self.names)
        return layout

    def _stores(self) -> list[LayerStore]:
        """The stores whose staged updates a step's end commits or drops (a state that hands its
        buckets to other states adds theirs)."""
        return [self.store]

    def _runs_on_model_group(self, step: int, steps_before: int, layout: BucketLayout) -> bool:
        """Whether this bucket skips the communication thread and is averaged the way DDP averages
        without a hook: one asynchronous allreduce on the model's process group, issued here.

        Only for a state that sends everything densely from a known step on (:meth:`dense_from_step`;
        ``"allreduce"``, and ``"auto"`` once it chose dense), on the flat path, with no controller or
        preconditioner, for a bucket layout every rank already proved it holds. Each condition is
        the same on every rank at the same step: settings change only between steps, the layout
        checks are collective, and the process-local step count is equal on every rank. The first
        two steps of a process always take the thread: they prove the configuration and the bucket
        layouts (DDP rebuilds its buckets after the first step). Nothing of this state is queued
        then: a state's last thread job belongs to a step whose futures DDP has already waited for.
        """
        start = self.dense_from_step()
        return (
            start is not None
            and step >= start
            and steps_before >= 2
            and self.node_groups is None
            and self.controller is None
            and self.preconditioner is None
            and self._config_verified
            and layout.fingerprint in self._verified_layouts
        )

    def _average_on_model_group(
        self, buffer: torch.Tensor, layout: BucketLayout, step: int, is_last: bool, scale: Optional[float]
    ) -> torch.futures.Future:
        """DDP's own dense average (divide, then an asynchronous allreduce on the model's group, as
        PyTorch's ``allreduce_hook``), with gcomp's byte accounting. No thread hand-over, no
        process group of gcomp's: on a fast link this is what plain DDP costs. The bytes are counted
        here (they are known in advance); ``seconds["collective"]`` does not include these steps."""
        self._apply_gradient_scale(scale)
        self.traffic.bytes_uncompressed += buffer.numel() * buffer.element_size()
        self.record_dense_layers(layout, buffer, "dense")
        if not self.lifecycle.in_warmup(step):
            self.lifecycle.mark_compressed()
        group = self.transport.model_group
        buffer.div_(dist.get_world_size(group))
        future = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        size = buffer.numel() * buffer.element_size()
        self.traffic.record_collective(sent=size, received=size, link=self.transport.link)
        if is_last:
            self.traffic.model_group_steps += 1
            self.lifecycle.finish(self._stores(), self.traffic)
        return future.then(lambda done: _completed_buffer(done, buffer))

    def record_dense_layers(self, layout: BucketLayout, buffer: torch.Tensor, label: str) -> None:
        """Count every layer of ``layout`` as sent uncompressed in ``buffer``'s dtype."""
        for slot in layout.layers:
            nbytes = slot.numel * buffer.element_size()
            self.traffic.record_layer(slot.name, slot.shape, label, nbytes, nbytes)

    def _apply_gradient_scale(self, scale: Optional[float]) -> None:
        """Bring the stored gradient-valued tensors to the loss scale of the gradients at hand."""
        if scale is not None and scale != self._gradient_scale:
            if self._gradient_scale is not None:
                for store in self._stores():
                    store.rescale_gradient_valued(scale / self._gradient_scale)
            self._gradient_scale = scale

    def _reduce_job(
        self, buffer: torch.Tensor, layout: BucketLayout, step: int, is_last: bool, scale: Optional[float],
        submitted: Optional[Any] = None,
    ) -> torch.Tensor:
        started = self.worker.runtime.mark(buffer.device) if submitted is not None else None
        self._apply_gradient_scale(scale)
        if not self._config_verified:
            self._verify_config(buffer.device)
        fingerprint = layout.fingerprint
        if fingerprint not in self._verified_layouts:
            check_agreement(
                self.transport, self.worker.runtime, "the layers of a gradient bucket", layout.describe(), buffer.device,
                hint="Different models, parameter names or bucket_cap_mb on different ranks?",
            )
            self._verified_layouts.add(fingerprint)
        self.traffic.bytes_uncompressed += buffer.numel() * buffer.element_size()
        if self.preconditioner is not None:
            self.preconditioner.direction_(buffer, layout, self.store, self._gradient_scale)
        if self.node_groups is None:
            result = self._average(buffer, layout, step)
        else:
            result = reduce_within_nodes(self, buffer, layout, step)
        if submitted is not None:
            self.time_controller.record_bucket(step, layout, submitted, started, self.worker.runtime.mark(buffer.device))
        if is_last:
            self.lifecycle.finish(self._stores(), self.traffic)
            if step == 0:
                self._check_override_names()
            if self.controller is not None or self.time_controller is not None:
                # Queued behind this bucket, so the step's last future completes first: the
                # training thread goes on (optimizer step, next forward) while the controller
                # profiles or decides, and the next step's buckets queue behind it in the same
                # order on every rank (its collectives cannot interleave with theirs).
                compressed_steps = self.traffic.compressed_steps
                self.worker.submit(lambda: self._controller_step_end(step, compressed_steps, buffer.device), buffer.device)
        return result

    def _average(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        """Average ``buffer`` over :attr:`codec_transport`: densely during warm-up, else with the codec."""
        if self.lifecycle.in_warmup(step):
            self.record_dense_layers(layout, buffer, "dense (warm-up)")
            result = self.dense_average_(buffer)
            if self.preconditioner is not None and not self.worker.runtime.all_finite(result):
                self.skip_step(result, layout, step)  # the moments staged this step are dropped
            return result
        self.lifecycle.mark_compressed()
        return self.reduce(buffer, layout, step)

    def _choose_path(self, device: torch.device) -> None:
        """Flat or hierarchical (see :mod:`gcomp.comm.topology`): decided once, from one allgather,
        identically on every rank (or a ``ValueError`` on every rank)."""
        self.node_groups, reason = discover(self.transport, self.worker.runtime, device, self.hierarchical, self.controller is not None)
        if self.node_groups is None:
            self.path_reason = reason
            logger.info("gcomp: %s runs the flat path over %d ranks: %s", self.method, self.transport.world_size, reason)
            return
        self.codec_transport = self.node_groups.leaders
        topology = self.node_groups.topology
        self.path_reason = "multi-node topology"
        logger.info(
            "gcomp: %s runs the hierarchical path: %d nodes x %d processes; dense reduce and broadcast inside each node, "
            "compressed exchange among the %d node leaders (this rank: node %d, %s)",
            self.method, len(topology.nodes), topology.processes_per_node, len(topology.nodes), self.node_groups.node,
            "leader" if self.node_groups.is_leader else "not a leader",
        )

    def _path_description(self) -> dict[str, Any]:
        if self.node_groups is None:
            return {"path": "flat", "reason": self.path_reason}
        return {"path": "hierarchical", **self.node_groups.describe()}

    def _controller_step_end(self, step: int, compressed_steps: int, device: torch.device) -> torch.Tensor:
        if self.time_controller is not None:
            self.time_controller.on_step_end(step, device)
        if self.controller is not None:
            self.controller.on_step_end(compressed_steps)
        return torch.zeros((), device=device)

    def synchronize(self) -> None:
        """Wait until every queued communication job (and a pending controller decision) has
        run; the state may then be read or saved consistently (``state_dict`` and
        ``load_state_dict`` call it; ``stats`` does not wait, its counters are complete once a
        step's backward has returned)."""
        self.worker.drain()

    def _verify_config(self, device: torch.device) -> None:
        """Every rank must run the same method with the same hyperparameters and overrides, and
        the overrides must name layers of the model."""
        unknown = self._unknown_override_names() if self.names.source == "module" else []
        check_agreement(
            self.transport, self.worker.runtime, "the compression configuration",
            {"method": self.method, **self.config(), "overrides": dict(self.layer_overrides()), **self.decided_settings(),
             "unknown_layer_names": unknown},
            device,
            hint="Use the same method and options on every rank.",
        )
        self._config_verified = True
        self._raise_unknown(unknown)
        if self.names.source == "module":
            orphans = sorted(set(self.store.layers) - set(self.names.known))
            if orphans:
                logger.warning(
                    "gcomp: stored state for %d layer(s) that this model does not have (e.g. %s): a checkpoint of "
                    "another model, or one saved with position names; that state is not used",
                    len(orphans), orphans[:3],
                )

    def _check_override_names(self) -> None:
        """Without module names, overrides can only be checked once every bucket was seen."""
        if self.names.source != "module":
            self._raise_unknown(self._unknown_override_names())

    def _unknown_override_names(self) -> list[str]:
        known = set(self.names.known)
        return sorted(name for name in self.layer_overrides() if name not in known)

    def _raise_unknown(self, unknown: list[str]) -> None:
        if unknown:
            known = list(self.names.known)
            shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
            raise ValueError(f"gcomp: per-layer overrides name unknown layers {unknown}; known layers: {shown}")


def _completed_buffer(done: torch.futures.Future, buffer: torch.Tensor) -> torch.Tensor:
    """The averaged bucket once its in-place allreduce finished (``value()`` raises its error)."""
    done.value()
    return buffer


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def make_hook(state_type: type, name: str) -> Callable[..., torch.futures.Future]:
    """The DDP comm hook of one method: it accepts only that method's state, so a state of
    another method passed by mistake fails at once instead of silently running that method.

    (Real, not postponed, annotations: DDP checks them when the hook is registered.)
    """

    def hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not isinstance(state, state_type):
            raise TypeError(f"gcomp.{name} needs a gcomp.{state_type.__name__}; got {type(state).__name__}")
        return state.submit_bucket(bucket)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"DDP comm hook of :class:`{state_type.__name__}`: ``ddp.register_comm_hook(state, gcomp.{name})``."
    return hook
