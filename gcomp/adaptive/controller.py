"""L-GreCo's controller: every N compressed sync steps (or when told, e.g. at each epoch end) re-pick each
layer's rank / density / bit width so that the bytes sent are minimal while the total compression error stays
within that of the uniform setting.

One decision, on every rank alike:

1. During the last ``accumulate_steps`` compressed steps before a decision the hook shows the
   controller each compressed layer's input to the compressor (error-feedback corrected); the
   controller sums them per layer.
2. Each rank computes the error of every candidate on its sums; **one allreduce averages the error
   table**, so every rank solves the same problem (the reference code used rank 0's gradient alone).
3. :func:`gcomp.adaptive.solver.solve`: fewest bytes with ``total error <= alpha * uniform error``,
   uniform as the fallback.
4. The choice is applied to the hook state between two steps (PowerSGD keeps the leading columns
   of its warm-start factors; error buffers are kept) and logged with its predicted and, at the
   next decision, measured bytes.

``AdaptiveConfig(policy="accordion")`` replaces steps 2-3 with Accordion's rule (Agarwal et al.,
MLSys 2021), the baseline the L-GreCo paper compares with: a layer whose summed gradient norm
changed by at least ``critical_threshold`` (relative) since the previous decision is in a
"critical regime" and gets the uniform setting, every other layer the most compressed candidate.
The norms are averaged by the same one allreduce, so every rank switches alike.

The decision runs on the communication thread as a job queued right behind a step's last bucket:
the step's futures complete first, so the training thread goes on with the optimizer step and the
next forward pass while the controller profiles and decides, and its collectives are ordered
before the next step's buckets on every rank. Its cost is measured: ``stats()["seconds"]`` has
``profile`` (summing the profiled tensors) and ``decide`` (errors, the table's allreduce, the
solver); each decision record has its ``seconds`` and per-layer ``error_seconds``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ..comm import check_agreement
from ..hooks.base import HookState
from ..metrics import TrafficStats
from .families import Family, family_for
from .solver import solve

logger = logging.getLogger(__name__)


ERROR_MEASURES = ("absolute", "relative")
POLICIES = ("lgreco", "accordion")


@dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of the adaptive controller.

    Tuning guide: ``alpha`` 1.0 keeps the uniform setting's total error (the paper's default);
    below 1 trades bytes for accuracy, above 1 the opposite. Decide about once per epoch
    (``every_steps`` = steps per epoch) or at least every few hundred steps: each decision costs a
    few SVDs / sorts per layer. The candidate range (``rank_range`` for PowerSGD, ``density_factors``
    for top-k, ``bit_widths`` for quantization) bounds how far a layer can move from the uniform
    setting in one decision.
    """

    every_steps: Optional[int] = 100  # compressed sync steps; None: only on decide_now() / epoch_end()
    accumulate_steps: int = 10
    alpha: float = 1.0
    rank_range: tuple[float, float] = (0.5, 2.0)
    density_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    bit_widths: tuple[int, ...] = (1, 2, 4, 8)
    resolution: int = 10_000
    log_path: Optional[str] = None  # JSON lines, written by rank 0
    # "absolute": a layer's error is ||x - C(x)|| (the paper); "relative": divided by ||x||, so a
    # layer with small gradients weighs as much as one with large ones (what an optimizer that
    # normalises each coordinate, such as AdamW, sees).
    error_measure: str = "absolute"
    # Damping: a decision moves each layer at most this many places along its sorted candidate
    # list (its "ladder") from the setting it has, e.g. 1: rank 4 -> 3, 4 or 5 only. A decision
    # taken on one profiling window then cannot throw a layer from one end of the range to the
    # other; several decisions in a row still reach any candidate. None: no limit (the paper).
    max_ladder_steps: Optional[int] = None
    # "lgreco": the dynamic program above; "accordion": uniform setting in critical regimes, the
    # most compressed candidate elsewhere (critical: the layer's summed gradient norm changed by
    # at least critical_threshold, relative, since the previous decision; always at the first).
    policy: str = "lgreco"
    critical_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.every_steps is not None and (isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ValueError(f"every_steps must be an integer >= 1 or None; got {self.every_steps!r}")
        if isinstance(self.accumulate_steps, bool) or not isinstance(self.accumulate_steps, int) or self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be an integer >= 1; got {self.accumulate_steps!r}")
        if self.every_steps is not None and self.accumulate_steps > self.every_steps:
            raise ValueError(f"accumulate_steps ({self.accumulate_steps}) cannot exceed every_steps ({self.every_steps})")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0; got {self.alpha!r}")
        if len(self.rank_range) != 2:
            raise ValueError(f"rank_range must be (low, high); got {self.rank_range!r}")
        if not self.density_factors:
            raise ValueError("density_factors must not be empty (the candidate set would be empty)")
        if not self.bit_widths or any(isinstance(w, bool) or w not in (1, 2, 4, 8) for w in self.bit_widths):
            raise ValueError(f"bit_widths must be a non-empty list drawn from 1, 2, 4, 8; got {self.bit_widths!r}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution must be an integer >= 1; got {self.resolution!r}")
        if self.error_measure not in ERROR_MEASURES:
            raise ValueError(f"error_measure must be one of {list(ERROR_MEASURES)}; got {self.error_measure!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}; got {self.policy!r}")
        if not (isinstance(self.critical_threshold, (int, float)) and math.isfinite(self.critical_threshold) and self.critical_threshold > 0):
            raise ValueError(f"critical_threshold must be a finite number > 0; got {self.critical_threshold!r}")
        if self.max_ladder_steps is not None and (
            isinstance(self.max_ladder_steps, bool) or not isinstance(self.max_ladder_steps, int) or self.max_ladder_steps < 1
        ):
            raise ValueError(f"max_ladder_steps must be an integer >= 1 or None; got {self.max_ladder_steps!r}")


class AdaptiveController:
    """Attach to a PowerSGD, top-k or quantize hook state: ``AdaptiveController(state, AdaptiveConfig(...))``."""

    def __init__(self, state: HookState, config: AdaptiveConfig = AdaptiveConfig()) -> None:
        options: dict[str, Any]
        if state.method == "powersgd":
            options = {"low": config.rank_range[0], "high": config.rank_range[1]}
        elif state.method == "quantize":
            options = {"widths": tuple(int(w) for w in config.bit_widths)}
        else:
            options = {"factors": config.density_factors}
        self.family: Family = family_for(state, **options)
        if state.controller is not None:
            raise ValueError("this hook state already has an adaptive controller")
        self.state = state
        self.config = config
        self.decisions = 0
        self.last_decision_step = 0
        self.accumulated: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.observed_steps = 0
        self.history: list[dict[str, Any]] = []
        self._bytes_at_last_decision = 0
        self._steps_at_last_decision = 0
        self.previous_norms: dict[str, float] = {}  # Accordion: each layer's norm at the last decision
        self._device = torch.device("cpu")  # where the profiled tensors live (the buckets' device)
        state.controller = self
        self._compressed_seen = state.traffic.compressed_steps
        self._update_observer(state.traffic.compressed_steps)

    # ------------------------------------------------------------------ schedule
    def _next_decision(self) -> Optional[int]:
        if self.config.every_steps is None:
            return None
        return self.last_decision_step + self.config.every_steps

    def _update_observer(self, completed_steps: int) -> None:
        """Observe the coming step if it falls in the accumulation window: the last
        ``accumulate_steps`` compressed steps before a scheduled decision, or, when decisions are
        only made on request, the first ``accumulate_steps`` compressed steps after the last one."""
        next_decision = self._next_decision()
        if next_decision is None:
            observing = self.observed_steps < self.config.accumulate_steps
        else:
            observing = completed_steps >= next_decision - self.config.accumulate_steps
        self.state.observer = self._observe if observing else None

    def on_step_end(self, completed_steps: int) -> None:
        """Called by the hook state on the communication thread after each step, with the number
        of *compressed* steps so far: the schedule counts those (warm-up steps send no
        compressed data, so there is nothing to profile or decide about in them)."""
        if completed_steps == self._compressed_seen:
            return  # a warm-up step (or a skipped one that never reached the codec)
        self._compressed_seen = completed_steps
        if self.state.observer is not None:
            self.observed_steps += 1
        next_decision = self._next_decision()
        if next_decision is not None and completed_steps >= next_decision:
            self._decide(completed_steps)
        self._update_observer(completed_steps)

    def decide_now(self) -> dict[str, Any]:
        """Decide between two steps (e.g. at the end of an epoch). Call on every rank."""
        record: dict[str, Any] = {}

        def job() -> torch.Tensor:
            record.update(self._decide(self.state.traffic.compressed_steps))
            self._update_observer(self.state.traffic.compressed_steps)
            return torch.zeros((), device=self._device)

        self.state.worker.run_now(job, self._device)  # after every queued bucket, on the communication thread
        return record

    epoch_end = decide_now

    def _observe(self, name: str, shape: tuple[int, ...], tensor: torch.Tensor) -> None:
        with TrafficStats.timed(self.state.traffic, "profile"):
            self._accumulate(name, shape, tensor)

    def _accumulate(self, name: str, shape: tuple[int, ...], tensor: torch.Tensor) -> None:
        self._device = tensor.device
        if name in self.accumulated:
            self.accumulated[name].add_(tensor.reshape(-1))
        else:
            # Summed in the gradients' own precision (float32 for float32 and half buckets): ten
            # steps lose nothing the error estimates can see, and a checkpoint taken inside the
            # window holds half the bytes of a float64 copy. The errors are computed in float64.
            self.accumulated[name] = tensor.reshape(-1).clone()
            self.shapes[name] = tuple(shape)

    # ------------------------------------------------------------------ decision
    def _decide(self, completed_steps: int) -> dict[str, Any]:
        with TrafficStats.timed(self.state.traffic, "decide"):
            return self._decide_timed(completed_steps)

    def _decide_timed(self, completed_steps: int) -> dict[str, Any]:
        decision_started = time.perf_counter()
        names = sorted(self.accumulated)
        candidates = [self.family.candidates(self.shapes[name]) for name in names]
        self._agree("the adaptive problem (profiled layers and their candidates)", list(zip(names, candidates)))
        sizes = [[self.family.size(self.shapes[name], option) for option in options] for name, options in zip(names, candidates)]
        uniform = [options.index(_closest(options, self._uniform_for(name))) for name, options in zip(names, candidates)]
        # On any failure (a non-finite table entry, no feasible choice) the previous choice stays.
        current = self.state.layer_overrides()
        previous = [
            options.index(_closest(options, current.get(name, self._uniform_for(name)))) for name, options in zip(names, candidates)
        ]
        if self.config.policy == "accordion":
            picks, outcome = self._accordion(names, uniform, previous)
        else:
            picks, outcome = self._lgreco(names, candidates, sizes, uniform, previous)
        choices = {name: options[choice] for name, options, choice in zip(names, candidates, picks)}
        # Identical tables give identical choices; proven before the choice changes any
        # collective's size (a disagreement would otherwise hang or mix data).
        self._agree("the adaptive decision", sorted(choices.items()))
        measured = self._measured_bytes_per_step(self.state.traffic.steps)
        if choices:
            self.family.apply(choices)
        record = {
            "decision": self.decisions,
            "step": self.state.traffic.steps,
            "compressed_step": completed_steps,
            "setting": self.family.setting,
            "policy": self.config.policy,
            "choices": choices,
            "uniform": self.family.uniform(),
            "predicted_bytes": float(sum(sizes[layer][choice] for layer, choice in enumerate(picks))),
            "uniform_bytes": float(sum(sizes[layer][choice] for layer, choice in enumerate(uniform))),
            **outcome,
            "measured_bytes_per_step_since_last": measured,
            "observed_steps": self.observed_steps,
            "seconds": time.perf_counter() - decision_started,
        }
        self.decisions += 1
        self.last_decision_step = completed_steps
        self.accumulated.clear()
        self.observed_steps = 0
        self.history.append(record)
        self._log(record)
        return record

    def _lgreco(
        self, names: list[str], candidates: list[list[float]], sizes: list[list[float]], uniform: list[int], previous: list[int]
    ) -> tuple[list[int], dict[str, Any]]:
        """L-GreCo: every candidate's error on every rank, averaged; fewest bytes within the budget."""
        rows, error_seconds = [], {}
        for name, options in zip(names, candidates):
            started = time.perf_counter()
            rows.append(self._errors(name, options))
            error_seconds[name] = time.perf_counter() - started  # host time (kernel launches only on a GPU)
        errors = self._average_rows(rows, [len(options) for options in candidates])
        budget = self.config.alpha * sum(errors[layer][choice] for layer, choice in enumerate(uniform)) if names else 0.0
        unusable = sorted(name for name, row in zip(names, errors) if not all(math.isfinite(e) for e in row))
        if unusable:
            logger.warning("gcomp adaptive: non-finite compression errors for %s; those layers keep their setting where needed", unusable)
        if self.config.max_ladder_steps is not None:
            # The budget stays that of the uniform setting; only the reachable candidates change.
            errors = [damp_row(row, index, self.config.max_ladder_steps) for row, index in zip(errors, previous)]
        solution = solve(sizes, errors, budget, previous, resolution=self.config.resolution)
        outcome = {"predicted_error": solution.total_error, "error_budget": budget, "used_fallback": solution.used_fallback,
                   "error_seconds": error_seconds}
        return list(solution.choices), outcome

    def _accordion(self, names: list[str], uniform: list[int], previous: list[int]) -> tuple[list[int], dict[str, Any]]:
        """Accordion: the uniform setting where a layer's summed gradient norm moved by at least
        ``critical_threshold`` since the last decision (and at the first), else the most
        compressed candidate (index 0). A non-finite norm keeps the layer's setting."""
        rows = [self.accumulated[name].double().norm().reshape(1) for name in names]
        norms = [row[0] for row in self._average_rows(rows, [1] * len(names))]
        picks, critical = [], []
        for name, norm, uniform_index, previous_index in zip(names, norms, uniform, previous):
            before = self.previous_norms.get(name)
            if not math.isfinite(norm):
                picks.append(previous_index)
                continue
            if before is None or before <= 0 or abs(norm - before) >= self.config.critical_threshold * before:
                critical.append(name)
                picks.append(uniform_index)
            else:
                picks.append(0)
            self.previous_norms[name] = norm
        unusable = sorted(name for name, norm in zip(names, norms) if not math.isfinite(norm))
        if unusable:
            logger.warning("gcomp adaptive: non-finite gradient norms for %s; those layers keep their setting", unusable)
        return picks, {"predicted_error": None, "error_budget": None, "used_fallback": bool(unusable), "critical_layers": critical}

    def _average_rows(self, rows: list[torch.Tensor], lengths: list[int]) -> list[list[float]]:
        """One small allreduce averages a table of per-layer rows, so every rank decides on the same
        numbers (a row that could not be measured is NaN on its rank, hence NaN everywhere)."""
        if not rows:
            return []
        flat = torch.cat(rows).to(device=self.state.transport.small_tensor_device(self._device), dtype=torch.float64)
        self.state.transport.allreduce_sum_(flat, traffic=None)
        flat.div_(self.state.transport.world_size)
        values = self.state.worker.runtime.to_list(flat)
        table, position = [], 0
        for length in lengths:
            table.append(values[position : position + length])
            position += length
        return table

    def _errors(self, name: str, options: list[float]) -> torch.Tensor:
        """One layer's row of the error table. A failure here (e.g. an SVD that does not converge)
        must not leave this rank out of the table's allreduce: the row becomes NaN, which the sum
        spreads to every rank, so every rank treats the layer alike."""
        try:
            tensor = self.accumulated[name]
            row = self.family.errors(tensor, self.shapes[name], options)
            if self.config.error_measure == "relative":
                size = tensor.double().norm()
                row = torch.where(size > 0, row / size, torch.zeros_like(row))
            return row
        except Exception as error:  # noqa: BLE001 - reported, and agreed on through the allreduce
            logger.warning("gcomp adaptive: could not measure compression errors of layer %s: %r", name, error)
            return torch.full((len(options),), math.nan, dtype=torch.float64, device=self._device)

    def _uniform_for(self, name: str) -> float:
        return self.family.uniform()

    def _measured_bytes_per_step(self, completed_steps: int) -> Optional[float]:
        steps = completed_steps - self._steps_at_last_decision
        sent = self.state.traffic.bytes_sent - self._bytes_at_last_decision
        self._steps_at_last_decision, self._bytes_at_last_decision = completed_steps, self.state.traffic.bytes_sent
        return sent / steps if steps > 0 else None

    def _agree(self, topic: str, value: Any) -> None:
        check_agreement(self.state.transport, self.state.worker.runtime, topic, value, self._device)

    def _log(self, record: dict[str, Any]) -> None:
        if self.config.log_path is None or self.state.transport.rank != 0:
            return
        with open(self.config.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"method": self.state.method, **record}) + "\n")

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": {**asdict(self.config), "rank_range": list(self.config.rank_range), "density_factors": list(self.config.density_factors),
                       "bit_widths": list(self.config.bit_widths)},
            "decisions": self.decisions,
            "last_decision_step": self.last_decision_step,
            "observed_steps": self.observed_steps,
            "accumulated": {name: tensor.clone() for name, tensor in self.accumulated.items()},
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "bytes_at_last_decision": self._bytes_at_last_decision,
            "steps_at_last_decision": self._steps_at_last_decision,
            "history": json.loads(json.dumps(self.history)),
            "previous_norms": dict(self.previous_norms),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.decisions = int(saved["decisions"])
        self.last_decision_step = int(saved["last_decision_step"])
        self.observed_steps = int(saved["observed_steps"])
        self.accumulated = {name: tensor.clone() for name, tensor in saved["accumulated"].items()}
        self.shapes = {name: tuple(shape) for name, shape in saved["shapes"].items()}
        self._bytes_at_last_decision = int(saved["bytes_at_last_decision"])
        self._steps_at_last_decision = int(saved["steps_at_last_decision"])
        self.history = list(saved["history"])
        self.previous_norms = {str(name): float(norm) for name, norm in saved.get("previous_norms", {}).items()}
        self._compressed_seen = self.state.traffic.compressed_steps
        self._update_observer(self.state.traffic.compressed_steps)


def damp_row(errors: list[float], current: int, max_ladder_steps: int) -> list[float]:
    """One layer's error row with every candidate more than ``max_ladder_steps`` places away from
    index ``current`` marked unusable (infinite error: the solver skips it)."""
    return [error if abs(index - current) <= max_ladder_steps else math.inf for index, error in enumerate(errors)]


def _closest(options: list[float], value: float) -> float:
    return min(options, key=lambda option: (abs(option - value), option))
