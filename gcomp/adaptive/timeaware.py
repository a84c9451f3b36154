"""The time-aware choice: compress only where it pays in step time.

Compression saves bytes and costs compute. On a slow link that is a good trade; on a fast one a
dense allreduce hidden behind backward costs nothing, and compressing only adds compute and
error (measured on two emulated nodes: top-k 1 % 23 % slower than no compression unshaped,
PowerSGD 10x faster at 100 Mbit/s; benchmarks/RESULTS.md §5b, §15). This controller measures
what a step costs on *this* run and decides, per layer, dense or compressed:

1. **Dense steps** (the warm-up, after ``skip_steps`` that DDP's bucket rebuild and the first
   agreement checks disturb): per bucket, when backward hands it over and how long its dense
   allreduce takes; per step, the step time and the communication backward did not hide.
2. **Trial steps** (``trial_steps`` compressed steps per candidate method, the first of them not
   measured: it allocates and initialises): how long each bucket's compressed reduction takes.
3. **Decision** at the end of the last trial step, on the communication thread, identically on
   every rank: a latency probe (``probe_repeats`` tiny allreduces), then one allgather of every
   rank's summary, combined alike on every rank (:func:`gcomp.adaptive.timing.combine`); the
   link and the compute per element are fitted and :func:`gcomp.adaptive.cost.choose_dense`
   picks the layers to compress; the choice is proven equal on every rank
   (:func:`gcomp.comm.check_agreement`) and applied between two steps (``set_dense_layers``;
   for ``"auto"`` also the method, :class:`gcomp.hooks.auto.AutoState`).

With one method (``gcomp.register(ddp, "topk", time_aware=True)``) the candidates are that
method's per-layer settings and "dense"; with ``"auto"`` the dense method and each candidate
method's best per-layer mix compete, and among those predicted within ``tolerance`` of the
fastest the first in the candidate order wins (dense first: exact gradients when it costs
nothing). The decision is made once; it is in ``stats()["time_aware"]``, in a log line, and in
the checkpoint (a resumed run keeps it, bit for bit).

Tests inject measurements with :meth:`TimeAwareController.inject` (the collectives of the decision
still run, so the agreement path is the real one).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..comm import check_agreement
from ..hooks.auto import AutoState
from ..hooks.base import HookState
from ..hooks.layout import BucketLayout
from ..hooks.message import MessageState
from ..hooks.powersgd import PowerSGDState
from ..metrics import TrafficStats
from .cost import BucketCost, CostModel, LayerCost, choose_dense, fit_compute, fit_link
from .timing import LocalMeasurements, StepClock, StepTiming, combine, median_base, summarise_steps

logger = logging.getLogger(__name__)

COMPRESSING_METHODS = ("powersgd", "topk", "quantize")


@dataclass(frozen=True)
class TimeAwareConfig:
    """Settings of the time-aware choice.

    Tuning guide: the decision needs ``warmup_steps >= skip_steps + 1`` dense steps (more give
    steadier medians; 10 is plenty) and ``trial_steps`` compressed steps per candidate method.
    ``tolerance`` is how much slower (a fraction of the step) a setting with more dense layers may
    be predicted to be and still be preferred: raise it to favour exact gradients.
    """

    skip_steps: int = 2
    trial_steps: int = 3
    tolerance: float = 0.02
    probe_repeats: int = 5

    def __post_init__(self) -> None:
        for name, low in (("skip_steps", 0), ("trial_steps", 2), ("probe_repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not (
            math.isfinite(self.tolerance) and self.tolerance >= 0
        ):
            raise ValueError(f"tolerance must be a finite number >= 0; got {self.tolerance!r}")


def _element(layout: BucketLayout) -> int:
    return torch.finfo(layout.dtype).bits // 8


def dense_bucket(layout: BucketLayout) -> BucketCost:
    """A bucket averaged by one dense allreduce in its own dtype."""
    element = _element(layout)
    return BucketCost(tuple(LayerCost(s.name, s.numel, s.numel * element) for s in layout.layers))


def describe_bucket(state: HookState, layout: BucketLayout) -> BucketCost:
    """What each layer of ``layout`` would add to ``state``'s collectives, dense or compressed,
    read off the state's own plan with no layer forced dense (so the wire format is defined once,
    in the hook)."""
    if isinstance(state, PowerSGDState):
        element = 8 if layout.dtype == torch.float64 else 4  # PowerSGD's messages are float32/64
        # With a half-precision factor_dtype, P and Q travel in it and P in an allreduce of its own.
        factor = element if state.factor_dtype is None else torch.finfo(state.factor_dtype).bits // 8
        plan = state._build_plan(layout, dense_layers=frozenset())
        compressed = {slot.name: (group.n * group.rank, group.m * group.rank) for group in plan.groups for slot in group.layers}
        layers = []
        for slot in layout.layers:
            if slot.name in compressed:
                p, q = compressed[slot.name]
                layers.append(LayerCost(slot.name, slot.numel, slot.numel * element, True, p * factor, q * factor))
            else:
                layers.append(LayerCost(slot.name, slot.numel, slot.numel * element))
        return BucketCost(tuple(layers), second="allreduce", first_apart=state.factor_dtype is not None)
    if isinstance(state, MessageState):
        element = _element(layout)
        plan = state._build_plan(layout, dense_layers=frozenset())
        messages = {layer.slot.name: layer.message_bytes for layer in plan.compressed}
        layers = []
        for slot in layout.layers:
            if slot.name in messages:
                layers.append(LayerCost(slot.name, slot.numel, slot.numel * element, True, 0, messages[slot.name]))
            else:
                layers.append(LayerCost(slot.name, slot.numel, slot.numel * element))
        return BucketCost(tuple(layers), first_extra_bytes=element, second="allgather")  # + the health flag
    return dense_bucket(layout)


class TimeAwareController:
    """Attach to a PowerSGD, top-k or quantize state (``TimeAwareController(state, config)``, or
    ``gcomp.register(..., time_aware=True)``); ``"auto"`` builds its own."""

    def __init__(self, state: HookState, config: TimeAwareConfig = TimeAwareConfig()) -> None:
        if isinstance(state, AutoState):
            self.methods = [name for name in state.candidates if name != "allreduce"]
        elif state.method in COMPRESSING_METHODS:
            self.methods = [state.method]
        else:
            raise TypeError(f"the time-aware choice needs a compressing method ({', '.join(COMPRESSING_METHODS)}) or 'auto'; got {state.method!r}")
        if state.time_controller is not None:
            raise ValueError("this hook state already has a time-aware controller")
        if state.warmup_steps < config.skip_steps + 1:
            raise ValueError(
                f"the time-aware choice measures dense warm-up steps: warmup_steps must be >= skip_steps + 1 = "
                f"{config.skip_steps + 1}; got {state.warmup_steps}"
            )
        self.state = state
        self.config = config
        self.clock = StepClock(state.worker.runtime)
        self.timings: list[StepTiming] = []
        self.decision: Optional[dict[str, Any]] = None
        self._injected: Optional[Callable[[Sequence[BucketLayout]], LocalMeasurements]] = None
        state.time_controller = self

    # ------------------------------------------------------------------ schedule
    @property
    def decision_step(self) -> int:
        """The sync step at whose end the choice is made."""
        return self.state.warmup_steps + len(self.methods) * self.config.trial_steps - 1

    def trial_start(self, method: str) -> int:
        return self.state.warmup_steps + self.methods.index(method) * self.config.trial_steps

    def wants_timing(self, step: int) -> bool:
        """Whether ``step``'s buckets are timed (a function of the step alone, read on the autograd
        thread: every bucket of a step gets the same answer)."""
        return self.decision is None and self.config.skip_steps <= step <= self.decision_step

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "methods": list(self.methods)}

    def inject(self, measurements: Callable[[Sequence[BucketLayout]], LocalMeasurements]) -> None:
        """Test-only: decide from ``measurements(layouts of the decision step's buckets)`` instead
        of this rank's own (every collective of the decision still runs)."""
        self._injected = measurements

    # ------------------------------------------------------------------ called by the hook state
    def record_bucket(self, step: int, layout: BucketLayout, submitted: Any, started: Any, finished: Any) -> None:
        self.clock.record_bucket(step, layout, submitted, started, finished)

    def on_step_end(self, step: int, device: torch.device) -> None:
        """After each step, on the communication thread: close the step's measurement, move
        ``"auto"`` to its next trial method, decide at :attr:`decision_step`."""
        timing = self.clock.finish_step(step, self.timings[-1] if self.timings else None)
        if timing is not None:
            self.timings.append(timing)
        if self.decision is not None:
            return
        if isinstance(self.state, AutoState):
            for method in self.methods:
                if step + 1 == self.trial_start(method):
                    self.state.select(method)
        if step == self.decision_step:
            with TrafficStats.timed(self.state.traffic, "decide"):
                self._decide(step, device)

    # ------------------------------------------------------------------ decision
    def _decide(self, step: int, device: torch.device) -> None:
        state = self.state
        transport, runtime = state.transport, state.worker.runtime
        small = transport.small_tensor_device(device)
        latency = self._probe(small)  # on every rank, injected or not: the same collectives
        layouts = list(self.clock.layouts)
        fingerprints = [layout.fingerprint for layout in layouts]
        check_agreement(
            transport, runtime, "the time-aware measurements (buckets and candidate methods)",
            {"buckets": fingerprints, "methods": self.methods}, device,
        )
        local = self._injected(layouts) if self._injected is not None else self._local(latency, fingerprints)
        size = 2 + (2 + len(self.methods)) * len(layouts)
        vector = local.to_vector(self.methods) if local is not None else [math.nan] * size
        if len(vector) != size:
            raise ValueError(f"gcomp time-aware: {len(vector)} measurements for {len(layouts)} buckets and methods {self.methods}")
        gathered = transport.allgather(torch.tensor(vector, dtype=torch.float64, device=small), traffic=None)
        values = runtime.to_list(gathered.flatten())
        rows = [LocalMeasurements.from_vector(values[r * size : (r + 1) * size], len(layouts), self.methods)
                for r in range(transport.world_size)]
        if not layouts or any(not math.isfinite(v) for row in rows for v in row.to_vector(self.methods)):
            self.decision = {"step": step, "choice": None, "reason": "some rank has no usable measurements; settings kept"}
            logger.warning("gcomp time-aware: some rank has no usable measurements at step %d; the settings stay as configured", step)
            return
        record, dense = self._choose(combine(rows), layouts)
        record["step"] = step
        check_agreement(
            transport, runtime, "the time-aware decision", [record["choice"], sorted(dense)], device,
            hint="Identical gathered measurements should give identical decisions; is the same gcomp version used on every rank?",
        )
        self._apply(record["choice"], dense)
        self.decision = json.loads(json.dumps(record))
        self._log(record)

    def _probe(self, device: torch.device) -> float:
        """Median seconds of a tiny allreduce, read back each time (the read waits for it on CUDA)."""
        tensor = torch.zeros(1, dtype=torch.float64, device=device)
        seconds = []
        for _ in range(self.config.probe_repeats):
            started = time.perf_counter()
            self.state.transport.allreduce_sum_(tensor, traffic=None)
            self.state.worker.runtime.to_list(tensor)
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)

    def _local(self, latency: float, fingerprints: list[int]) -> Optional[LocalMeasurements]:
        """This rank's summary of the steps measured with the decision step's buckets."""
        usable = [t for t in self.timings if list(t.fingerprints) == fingerprints]
        dense = [t for t in usable if t.step < self.state.warmup_steps]
        base = median_base(dense)
        if not dense or base is None:
            return None
        summary = summarise_steps(dense)
        trial = {}
        for method in self.methods:
            start = self.trial_start(method)
            steps = [t for t in usable if start + 1 <= t.step < start + self.config.trial_steps]
            if not steps:
                return None
            trial[method] = summarise_steps(steps)["jobs"]
        return LocalMeasurements(latency, base, summary["ready"], summary["jobs"], trial)

    def _candidate(self, method: str) -> HookState:
        return self.state.children[method] if isinstance(self.state, AutoState) else self.state

    def _choose(self, measured: LocalMeasurements, layouts: list[BucketLayout]) -> tuple[dict[str, Any], frozenset[str]]:
        world = self.state.transport.world_size
        link = fit_link(measured.latency, [(l.length * _element(l), s) for l, s in zip(layouts, measured.dense_jobs)], world)
        ready = tuple(measured.ready)
        everything = frozenset(slot.name for layout in layouts for slot in layout.layers)
        options: dict[str, tuple[float, frozenset[str]]] = {}
        if isinstance(self.state, AutoState) and "allreduce" in self.state.candidates:
            dense_model = CostModel(link, ready, measured.base)
            options["allreduce"] = (dense_model.step_seconds([dense_bucket(l) for l in layouts], everything), everything)
        compute, models, buckets = {}, {}, {}
        for method in self.methods:
            buckets[method] = [describe_bucket(self._candidate(method), layout) for layout in layouts]
            per_layer, per_element = fit_compute(link, list(zip(buckets[method], measured.trial_jobs[method])))
            compute[method] = {"per_layer_s": per_layer, "per_element_s": per_element}
            models[method] = CostModel(link, ready, measured.base, per_element=per_element, per_layer=per_layer)
            choice = choose_dense(models[method], buckets[method], self.config.tolerance)
            options[method] = (choice.step_seconds, choice.dense)
        fastest = min(seconds for seconds, _ in options.values())
        chosen = next(name for name, (seconds, _) in options.items() if seconds <= fastest * (1 + self.config.tolerance))
        seconds, dense = options[chosen]
        layers: dict[str, Any] = {}
        if chosen in models:
            model = models[chosen]
            for bucket in buckets[chosen]:
                for layer in bucket.layers:
                    layers[layer.name] = {
                        "setting": "compressed" if layer.compressible and layer.name not in dense else "dense",
                        "dense_s": model.layer_seconds(layer, False),
                        "compressed_s": model.layer_seconds(layer, True, bucket.second) if layer.compressible else None,
                    }
        else:
            layers = {name: {"setting": "dense"} for name in sorted(everything)}
        compressed = sorted(name for name, layer in layers.items() if layer["setting"] == "compressed")
        record = {
            "choice": chosen,
            "predicted_step_s": seconds,
            "predicted_step_s_by_option": {name: value for name, (value, _) in options.items()},
            "link": {"latency_s": link.latency, "rate_bytes_per_s": link.rate if math.isfinite(link.rate) else None},
            "base_step_s": measured.base,
            "backward_window_s": ready[-1] if ready else 0.0,
            "compute": compute,
            "compressed_layers": compressed,
            "dense_layer_count": len(everything) - len(compressed),
            "layers": layers,
        }
        return record, dense

    def _apply(self, choice: str, dense: frozenset[str]) -> None:
        if isinstance(self.state, AutoState):
            if choice != "allreduce":
                self.state.children[choice].set_dense_layers(dense)
            self.state.select(choice)
            self.state.release_unchosen()
        else:
            self.state.set_dense_layers(dense)

    def _log(self, record: dict[str, Any]) -> None:
        if self.state.transport.rank != 0:
            return
        rate = record["link"]["rate_bytes_per_s"]
        logger.info(
            "gcomp time-aware: %s chosen at step %d, %d of %d layers compressed; predicted %.4f s/step (%s); "
            "link %s, latency %.3f ms; backward window %.4f s",
            record["choice"], record["step"], len(record["compressed_layers"]),
            len(record["compressed_layers"]) + record["dense_layer_count"], record["predicted_step_s"],
            ", ".join(f"{name} {value:.4f}" for name, value in record["predicted_step_s_by_option"].items()),
            "unlimited" if rate is None else f"{rate / 1e6:.1f} MB/s", record["link"]["latency_s"] * 1e3, record["backward_window_s"],
        )

    # ------------------------------------------------------------------ reporting and checkpoint
    def summary(self) -> dict[str, Any]:
        """For ``stats()["time_aware"]``: the schedule and, once made, the decision."""
        return {"decision_step": self.decision_step, "measured_steps": len(self.timings), "decided": self.decision is not None,
                "decision": self.decision}

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_dict(),
            "timings": [t.to_dict() for t in self.timings],
            "decision": json.loads(json.dumps(self.decision)) if self.decision is not None else None,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.timings = [StepTiming.from_dict(t) for t in saved.get("timings", [])]
        self.decision = saved.get("decision")
