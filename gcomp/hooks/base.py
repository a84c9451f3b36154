"""The DDP adapter every gcomp hook shares: bucket -> layers -> codec -> collectives -> bucket.

A gcomp hook is ``hook(state, bucket) -> Future``. The hook itself does almost nothing on the
autograd thread: it reads the bucket's layout, stamps it with the current sync step and queues the
reduction on the state's communication thread (:mod:`gcomp.comm.worker`), which

1. checks once that every rank runs the same method and hyperparameters, and once per new bucket
   layout that every rank holds the same layers (a clear ``ValueError`` on every rank instead of a
   hang or of silently mixed buckets);
2. averages densely during the first ``warmup_steps`` sync steps, then calls the subclass's
   :meth:`HookState.reduce` (the codec: compression + collectives + decompression);
3. at the end of each step commits the state updates the codec staged, or drops them when any
   bucket of the step was non-finite (so a GradScaler-skipped step leaves no trace in error
   buffers or warm-start factors).

State that must survive DDP's bucket rebuilds and checkpoint/restore is kept per layer name
(:mod:`gcomp.hooks.layout`), split into *replicated* tensors (identical on every rank, e.g.
PowerSGD's Q) and *per-rank* tensors (e.g. error-feedback residuals).
"""
import math
import warnings
import zlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.distributed as dist

from ..comm import CommWorker, Transport
from ..metrics import TrafficStats
from .layout import BucketLayout, check_bucket_buffer

STATE_FORMAT_VERSION = 1


class HookState(ABC):
    """Base class of every gcomp hook state.

    Subclasses set ``method``, implement :meth:`reduce` and :meth:`config`, and list the names of
    their per-layer tensors in ``replicated_tensors`` / ``per_rank_tensors``, and among those the
    ones measured in gradient units (error-feedback residuals, gradient estimates, momenta) in
    ``gradient_valued_tensors``: :meth:`set_gradient_scale` rescales them when the loss scale
    changes.
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
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (sync steps of plain allreduce); got {warmup_steps!r}")
        self.transport = Transport(process_group)
        self.worker = worker if worker is not None else CommWorker(name=f"gcomp-{self.method}")
        self.warmup_steps = warmup_steps
        self.step = 0  # sync steps started; advanced when DDP hands over its last bucket
        self.traffic = TrafficStats()
        # Per-layer state: layer name -> tensor name -> tensor.
        self.layer_state: dict[str, dict[str, torch.Tensor]] = {}
        self._param_names: dict[int, str] = {}
        self._layouts: dict[tuple[int, int, int, int], BucketLayout] = {}
        self._verified_layouts: set[int] = set()
        self._config_verified = False
        # Touched only by the communication thread while a step runs.
        self._staged: list[Callable[[], None]] = []
        self._step_finite = True
        self._step_compressed = False
        # Optional plug-ins, both called on the communication thread: ``observer(name, shape,
        # tensor)`` sees each layer's input to the compressor (for error profiling), and
        # ``controller.on_step_end(steps)`` runs after every completed step (adaptive settings).
        self.observer: Optional[Callable[[str, tuple[int, ...], torch.Tensor], None]] = None
        self.controller: Optional[Any] = None
        # Loss scale of the gradients DDP hands over (see set_gradient_scale): the one asked for
        # next, and the one the stored gradient-valued tensors are in (None: not known yet).
        self._requested_gradient_scale: Optional[float] = None
        self._gradient_scale: Optional[float] = None

    # ------------------------------------------------------------------ to implement in subclasses
    def config(self) -> dict[str, Any]:
        """Hyperparameters that must agree on every rank (plain values)."""
        return {"warmup_steps": self.warmup_steps}

    @abstractmethod
    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        """Average ``buffer`` over ranks (compressed). Runs on the communication thread; may block.

        Must issue the same collectives in the same order on every rank, write the averaged
        gradient into ``buffer`` (or return a tensor of its shape), and defer state updates with
        :meth:`stage` so they can be dropped if the step turns out non-finite.
        """

    # ------------------------------------------------------------------ public interface
    def attach(self, module: torch.nn.Module) -> "HookState":
        """Learn parameter names from ``module`` (the DDP model or the module it wraps), so that
        state is keyed by name and survives bucket rebuilds and checkpoint/restore."""
        target = module.module if hasattr(module, "module") and isinstance(module.module, torch.nn.Module) else module
        self._param_names = {id(param): name for name, param in target.named_parameters()}
        self._layouts.clear()
        return self

    def stats(self) -> dict[str, Any]:
        """Cumulative traffic: ``steps``, ``bytes_sent``, ``bytes_received``, ``bytes_uncompressed``,
        ``compression_ratio`` and per-layer detail under ``layers`` (see :mod:`gcomp.metrics`)."""
        out = self.traffic.summary()
        out["method"] = self.method
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: tensors and plain values only (loads with ``weights_only=True``).
        Every rank saves its own; error-feedback residuals differ between ranks."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "method": self.method,
            "config": self.config(),
            "world_size": self.transport.world_size if dist.is_initialized() else None,
            "step": self.step,
            "traffic": self.traffic.state_dict(),
            "layers": {
                name: {key: tensor.detach().clone() for key, tensor in tensors.items()}
                for name, tensors in self.layer_state.items()
            },
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "gradient_scale": self._gradient_scale,
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
        if state.get("config") != self.config():
            warnings.warn(
                f"gcomp: checkpoint hyperparameters {state.get('config')} differ from {self.config()}; "
                "state that no longer fits is re-initialised",
                stacklevel=2,
            )
        keep = set(self.replicated_tensors) | set(self.per_rank_tensors)
        saved_world = state.get("world_size")
        if saved_world is not None and dist.is_initialized() and saved_world != self.transport.world_size:
            warnings.warn(
                f"gcomp: checkpoint from world size {saved_world} loaded into world size "
                f"{self.transport.world_size}; per-rank error buffers are reset, replicated state is kept",
                stacklevel=2,
            )
            keep = set(self.replicated_tensors)
        self.step = int(state["step"])
        self.traffic.load_state_dict(state.get("traffic", {}))
        self.layer_state = {
            name: {key: tensor.clone() for key, tensor in tensors.items() if key in keep}
            for name, tensors in state.get("layers", {}).items()
        }
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        saved_scale = state.get("gradient_scale")
        self._gradient_scale = float(saved_scale) if saved_scale is not None else None
        self._requested_gradient_scale = self._gradient_scale

    def close(self) -> None:
        """Stop the communication thread (call before ``destroy_process_group``)."""
        self.worker.close()

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
    def stage(self, commit: Callable[[], None]) -> None:
        """Defer a state update to the end of the step; it is dropped if the step is non-finite."""
        self._staged.append(commit)

    def mark_non_finite(self) -> None:
        """Called by a codec when the agreed (all-reduced) data of a bucket is non-finite."""
        self._step_finite = False

    def layer_tensor(self, layer: str, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The stored tensor ``key`` of ``layer`` if it exists with this shape and dtype, else None
        (a stale entry, e.g. from a checkpoint with another rank setting, is forgotten)."""
        tensors = self.layer_state.get(layer)
        if tensors is None or key not in tensors:
            return None
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            del tensors[key]
            return None
        return tensor

    def set_layer_tensor(self, layer: str, key: str, tensor: torch.Tensor) -> None:
        self.layer_state.setdefault(layer, {})[key] = tensor

    def dense_average_(self, buffer: torch.Tensor) -> torch.Tensor:
        """Plain averaging allreduce, in place (divide first: safe for half precision)."""
        buffer.div_(self.transport.world_size)
        return self.transport.allreduce_sum_(buffer, self.traffic)

    def shared_generator(self, *keys: Any) -> torch.Generator:
        """A CPU generator seeded from ``keys`` alone, so every rank draws the same numbers
        without touching the global RNG."""
        seed = zlib.crc32("|".join(str(k) for k in keys).encode("utf-8"))
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ the adapter
    def submit_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """What every gcomp hook does: queue this bucket's reduction, return its future."""
        buffer = bucket.buffer()
        check_bucket_buffer(buffer)
        self.transport.ensure_group()
        layout = self._layout_for(bucket)
        step = self.step
        is_last = bucket.is_last()
        if is_last:
            self.step += 1
        scale = self._requested_gradient_scale  # read here: every bucket of a backward sees the same
        return self.worker.submit(lambda: self._reduce_job(buffer, layout, step, is_last, scale))

    def _layout_for(self, bucket: dist.GradBucket) -> BucketLayout:
        params = bucket.parameters()
        key = (bucket.index(), bucket.buffer().numel(), id(params[0]), id(params[-1]))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = BucketLayout.from_bucket(bucket, self._param_names)
        return layout

    def _reduce_job(
        self, buffer: torch.Tensor, layout: BucketLayout, step: int, is_last: bool, scale: Optional[float]
    ) -> torch.Tensor:
        if scale is not None and scale != self._gradient_scale:
            self._rescale_gradient_valued(scale)
        if not self._config_verified:
            self._verify_config()
        fingerprint = layout.fingerprint()
        if fingerprint not in self._verified_layouts:
            self._verify_layout(layout, fingerprint)
        self.traffic.bytes_uncompressed += buffer.numel() * buffer.element_size()
        if step < self.warmup_steps:
            for slot in layout.layers:
                nbytes = slot.numel * buffer.element_size()
                self.traffic.record_layer(slot.name, slot.shape, "dense (warm-up)", nbytes, nbytes)
            result = self.dense_average_(buffer)
        else:
            self._step_compressed = True
            result = self.reduce(buffer, layout, step)
        if is_last:
            self._finish_step()
        return result

    def _rescale_gradient_valued(self, scale: float) -> None:
        """Bring the stored gradient-valued tensors to loss scale ``scale`` (communication thread,
        between steps: the previous step's updates are committed, this step's not yet staged)."""
        if self._gradient_scale is not None:
            ratio = scale / self._gradient_scale
            for tensors in self.layer_state.values():
                for key in self.gradient_valued_tensors:
                    if key in tensors:
                        tensors[key].mul_(ratio)
        self._gradient_scale = scale

    def _finish_step(self) -> None:
        if self._step_finite:
            for commit in self._staged:
                commit()
        else:
            self.traffic.skipped_steps += 1
        self.traffic.steps += 1
        if self._step_compressed:
            self.traffic.compressed_steps += 1
        self._staged.clear()
        self._step_finite = True
        self._step_compressed = False
        if self.controller is not None:
            self.controller.on_step_end(self.traffic.steps)

    def _verify_config(self) -> None:
        """Every rank must run the same method with the same hyperparameters."""
        mine = {"method": self.method, **self.config()}
        everyone: list[Any] = [None] * self.transport.world_size
        dist.all_gather_object(everyone, mine, group=self.transport.process_group)
        self._config_verified = True
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                raise ValueError(
                    "gcomp: ranks disagree on the compression configuration: "
                    f"rank 0 has {everyone[0]}, rank {rank} has {theirs}. Use the same method and options on every rank."
                )

    def _verify_layout(self, layout: BucketLayout, fingerprint: int) -> None:
        """Every rank must hold the same layers in this bucket before data is exchanged."""
        mine = torch.tensor([fingerprint, layout.length], dtype=torch.int64)
        everyone = self.transport.allgather(mine, traffic=None)
        if not bool((everyone == everyone[0]).all()):
            raise ValueError(
                "gcomp: ranks hold different gradient buckets (different models, parameter names or "
                f"bucket_cap_mb?): bucket fingerprints/lengths per rank {everyone.tolist()}"
            )
        self._verified_layouts.add(fingerprint)


def comm_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook of every gcomp method: ``ddp.register_comm_hook(state, comm_hook)``.

    (Real, not postponed, annotations: DDP checks them when the hook is registered.)

    The method is chosen by the state (``PowerSGDState``, ``AllreduceState``, ...); the hook only
    queues the bucket on the state's communication thread and returns the future DDP waits on.
    """
    if not isinstance(state, HookState):
        raise TypeError(f"gcomp hooks need a gcomp state (e.g. gcomp.PowerSGDState); got {type(state).__name__}")
    return state.submit_bucket(bucket)
